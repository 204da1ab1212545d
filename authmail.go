// Package authmail is a Caddy HTTP handler that sends authentication email
// (one-time codes, magic links, password resets, email verification,
// email-change confirmation, security alerts and arbitrary transactional
// mail) through the operator's SMTP account, behind API keys.
package authmail

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults.
const (
	defaultPathPrefix  = "/authmail"
	defaultMaxBodySize = 1 << 20
	defaultSMTPPort    = 587
	defaultSMTPTimeout = 15 * time.Second
	defaultConnections = 4
	minSecretLength    = 16

	// defaultWait stays below common HTTP client timeouts (10 s in
	// authmail-relay's client and many SDKs), so that with a slow SMTP
	// server the client gets 202 queued for mail that will be sent,
	// instead of a read timeout it may answer with a second send
	defaultWait           = 8 * time.Second
	defaultRetryBackoff   = 30 * time.Second
	defaultMaxBackoff     = 30 * time.Minute
	defaultMaxAge         = 24 * time.Hour
	defaultRetention      = 7 * 24 * time.Hour
	defaultMaxQueued      = 100000
	defaultIdempotencyTTL = 24 * time.Hour
	defaultLease          = 30 * time.Second
	defaultDrainTimeout   = 10 * time.Second
	maxPreferWait         = 5 * time.Minute
)

// Handler serves authmail's HTTP API: authenticated endpoints that render
// authentication email from templates and deliver it through the
// operator's SMTP server (or, for development, into a capture directory).
//
// Requests whose path is outside `path_prefix` are passed to the next
// handler; with `path_prefix /`, so is every path that is no endpoint
// (except a misspelt flow below /send/ or /verify/). The endpoints, relative to the prefix, are `GET /health`,
// `POST /send`, `POST /send/otp`, `POST /send/magic-link`,
// `POST /send/password-reset`, `POST /send/verify-email`,
// `POST /send/email-change`, `POST /send/security-alert`,
// `GET /messages/{id}`, for keys allowed to use them `POST /verify/otp`
// and `POST /verify/token`, and the admin endpoints `GET /status` and
// `POST /test`.
//
// Every accepted message is written to Caddy's storage before the answer,
// delivered by a per-storage outbox engine with retries, and its state is
// kept for `delivery.retention`. Instances that share a storage form a
// cluster: each message is delivered by one of them, and the others adopt
// the work of an instance whose heartbeat lapses.
//
// After a request the handler sets these placeholders for access logs and
// later handlers: `{http.authmail.id}`, `{http.authmail.message_id}`,
// `{http.authmail.flow}`, `{http.authmail.key_id}`,
// `{http.authmail.status}` and `{http.authmail.error_code}`.
type Handler struct {
	// PathPrefix is the path under which the endpoints are served. "/"
	// serves them at the site root. Default: "/authmail".
	PathPrefix string `json:"path_prefix,omitempty"`

	// SMTP configures delivery through an SMTP server. Exactly one of
	// smtp and capture must be set. Default: unset.
	SMTP *SMTP `json:"smtp,omitempty"`

	// SMTPServers, instead of smtp, lists several SMTP servers in
	// priority order: each message goes to the first healthy one, and
	// one that cannot take it (connection, TLS, authentication, timeout,
	// 4xx) passes it to the next at once. Default: unset.
	SMTPServers []SMTP `json:"smtp_servers,omitempty"`

	// Capture, instead of smtp, writes every message as an .eml file into
	// this directory (created on first use, mode 0700; files 0600). Meant
	// for development. Default: unset.
	Capture string `json:"capture,omitempty"`

	// From is the sender address, used in the From header and as the
	// envelope sender. Its domain is also the domain of every Message-ID.
	// Required.
	From string `json:"from,omitempty"`

	// FromName is the display name of the From header. Default: none.
	FromName string `json:"from_name,omitempty"`

	// ReplyTo is the Reply-To address of every templated message; /send
	// requests may give their own. Default: none.
	ReplyTo string `json:"reply_to,omitempty"`

	// AppName is the application name shown in templates and subjects.
	// Default: from_name, or else the domain of from.
	AppName string `json:"app_name,omitempty"`

	// BaseURL is the origin (optionally with a path) used to build links
	// from tokens: `<base_url>/<flow>?token=<token>`. Callers may pass
	// their own base_url or link only on this origin or one of
	// allow_origins. Default: none, which means tokens need a per-flow
	// link template and callers may pass links only on allow_origins.
	BaseURL string `json:"base_url,omitempty"`

	// Links maps a link flow (magic-link, password-reset, verify-email,
	// email-change) to a URL template that must contain `{token}`, which
	// is replaced by the query-escaped token. Default: none, so links are
	// built from base_url.
	Links map[string]string `json:"links,omitempty"`

	// Keys are the API keys allowed to call the send endpoints, as
	// `Authorization: Bearer <secret>`. At least one is required.
	Keys []Key `json:"keys,omitempty"`

	// Templates is a directory whose files override the built-in
	// templates one by one (layout.html, layout.txt, and for each flow
	// `<flow>.subject`, `<flow>.txt`, `<flow>.html`), each also per
	// language as `<name>.<locale>.<ext>` (otp.ko.subject). Templates are
	// parsed and rendered against sample data, in every locale they are
	// given in, when the config loads, so a broken template fails the
	// load. Default: the built-in templates only (English and Korean).
	Templates string `json:"templates,omitempty"`

	// Locale is the BCP 47 language tag (e.g. "ko", "de-AT") of templated
	// messages whose request gives no locale, and the fallback of a
	// requested locale without templates. Requested locales resolve as
	// the tag, its parents (de-AT → de), this locale, en. Built in: en
	// and ko. Default: "en".
	Locale string `json:"locale,omitempty"`

	// SecurityAlerts turns security-alert events on or off by name
	// (password_changed, two_factor_enabled, two_factor_disabled,
	// account_locked, new_login). Default: all on except new_login.
	SecurityAlerts map[string]bool `json:"security_alerts,omitempty"`

	// MaxBodySize is the largest accepted request body in bytes; larger
	// requests get 413. Default: 1048576 (1 MiB).
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// Delivery configures the outbox: how long a request waits for the
	// first attempt, retries, retention and limits. Default: the defaults
	// of each field.
	Delivery *Delivery `json:"delivery,omitempty"`

	// StorageRaw is the storage for the outbox and idempotency records,
	// overriding Caddy's configured storage. Instances that share a
	// storage form a cluster. Default: Caddy's storage.
	StorageRaw json.RawMessage `json:"storage,omitempty" caddy:"namespace=caddy.storage inline_key=module"`

	// WebhookSecret signs webhooks of requests that give no
	// webhook_secret of their own. Accepts {env.*} and {file.*}
	// placeholders. A secret starting with "whsec_" must be base64 after
	// the prefix: the Standard Webhooks signature uses the decoded key,
	// the authmail-relay signatures the secret as written (any other
	// secret: both use its bytes). Default: none, so requests that ask for
	// a webhook must give a webhook_secret (except in compat
	// authmail-relay mode, where such a webhook goes unsigned).
	WebhookSecret string `json:"webhook_secret,omitempty"`

	// WebhookAllowHosts lists webhook hosts that may resolve to loopback,
	// private, link-local, metadata or other reserved addresses (the IANA
	// special-purpose registries), which are refused otherwise (checked
	// when connecting, after DNS). Default: none.
	WebhookAllowHosts []string `json:"webhook_allow_hosts,omitempty"`

	// AllowOrigins are origins, besides base_url's, that callers may use
	// in link and base_url, and that link_policy accepts. Only https
	// origins, or http for localhost. Default: none.
	AllowOrigins []string `json:"allow_origins,omitempty"`

	// LinkPolicy "enforce" makes /send refuse html_body links (in href,
	// src, srcset, action, formaction, background, poster, cite and
	// xlink:href attributes) and text_body URLs that are not on base_url's
	// origin or an allow_origins origin. Default: off.
	LinkPolicy string `json:"link_policy,omitempty"`

	// AdminScope is what a key with `allow admin` may list (GET
	// /messages, the preview page's outbox tab and dev mailbox), read
	// (GET /messages/{id}) and retry besides its own messages: "site",
	// the messages of every key configured in this authmail block, or
	// "storage", the messages of every key of every site that shares the
	// storage (Caddy's default storage is shared by all sites of a
	// server). Keys are told apart by their secrets (tenants), not by
	// their ids, so another block's key named like one of this block's is
	// outside "site". Default: site.
	AdminScope string `json:"admin_scope,omitempty"`

	// AuthFailures throttles clients that fail to authenticate: after
	// this many failures from one client IP within the window (as
	// "<n>/<duration>", or "off"), the client gets 429 for the rest of
	// the window, even with a valid key. The client IP honours the
	// server's trusted_proxies. Default: "10/1m".
	AuthFailures string `json:"auth_failures,omitempty"`

	// RecipientRate limits the auth flows (otp, magic-link,
	// password-reset, verify-email, email-change, security-alert) per
	// recipient and flow, as "<n>/<duration>" or "off". The key "default"
	// applies to every flow without its own entry. /send is not limited.
	// It is there to stop a mail bomb (a public "resend" or "forgot
	// password" form driven at one address) and to bound fresh codes per
	// recipient, not to pace users: ten in a quarter hour lets a user press
	// "resend" many times. Default: {"default": "10/15m"}.
	RecipientRate map[string]string `json:"recipient_rate,omitempty"`

	// LogRecipients logs full recipient addresses. Default: false, which
	// logs a salted hash of each address plus its domain.
	LogRecipients bool `json:"log_recipients,omitempty"`

	// AllowLocalRecipients accepts recipients (to, cc, bcc, old_email,
	// and the address of POST /test) at domain literals
	// (user@[192.0.2.1]), single-label domains (user@localhost) and IP
	// addresses written as domains (user@127.0.0.1), which are refused
	// with 422 otherwise: the SMTP relay would deliver to whatever host
	// they name, internal ones included. Turn it on only when the relay
	// must deliver to such hosts. Default: false.
	AllowLocalRecipients bool `json:"allow_local_recipients,omitempty"`

	// Compat "authmail-relay" makes the handler answer as authmail-relay
	// did wherever the two differ: a send with a webhook_url is answered
	// at once with 200 {"sent":false,"status":"accepted"} and reported by
	// webhook (which needs no secret); webhooks carry the relay's payload
	// (status "delivered", refused, error_code null, sent_at with
	// +00:00); magic links built from base_url go to
	// <base_url>/set-password?token=; templated mail defaults to Korean;
	// error answers add FastAPI's "detail". Default: none, authmail's own
	// behaviour.
	Compat string `json:"compat,omitempty"`

	// Codes lets authmail issue OTP codes and link tokens and check them
	// at /verify/otp and /verify/token (see Codes). Default: unset, so
	// callers supply every code and token.
	Codes *Codes `json:"codes,omitempty"`

	// DKIM signs every message with the operator's domain key (see DKIM).
	// Default: unset, so messages are not signed.
	DKIM *DKIM `json:"dkim,omitempty"`

	logger     *zap.Logger
	transport  mailer.Transport
	poolKey    string   // acquired smtpPool key, released in Cleanup
	poolKeys   []string // smtpPool keys of the smtp_servers senders
	failKey    string   // acquired failoverPool key
	keys       []apiKey
	siteTenant map[string]bool // the tenants of keys: what admin_scope site covers
	tmpl       *templateSet
	from       mailAddr
	replyTo    []mailAddr
	appName    string
	locale     string // resolved default locale (canonical Locale, or en)
	baseURL    string
	baseOrigin string
	prefix     string
	authFail   ratelimit.Spec            // resolved auth_failures
	rcptRates  map[string]ratelimit.Spec // resolved recipient_rate by flow
	origins    []string                  // allowed origins: base_url's and allow_origins
	profile    string                    // sender profile: From address and route (senderProfile)
	reg        *outbox.Registration      // this handler's hold on the engine's settings
	shared     *shared                   // the engine and limiter of this handler's storage
	engine     *outbox.Engine            // shared.engine: the outbox for this handler's storage
	sharedKey  string                    // acquired sharedPool key, released in Cleanup
	dcfg       *outbox.Config            // resolved delivery settings
	codes      *issuer                   // resolved codes; nil when not configured
	dkim       *dkimKey                  // resolved dkim; nil when not configured
	// storageOverride replaces the storage in unit tests.
	storageOverride certmagic.Storage
}

// Delivery configures the durable outbox.
type Delivery struct {
	// Wait is how long a request waits for the first delivery attempt
	// before answering 202 queued. "Prefer: respond-async" answers at once,
	// "Prefer: wait=N" waits N seconds (at most 300). In JSON, 0 means the
	// default and a negative value answers right after the durable write.
	// Default: 8s, below the 10 s timeout of common HTTP clients, so that
	// a slow SMTP server yields 202 queued before the client gives up.
	Wait caddy.Duration `json:"wait,omitempty"`

	// RetryBackoff is the delay before the second attempt; it doubles with
	// every further attempt, with jitter. Default: 30s.
	RetryBackoff caddy.Duration `json:"retry_backoff,omitempty"`

	// MaxBackoff caps the delay between attempts. Default: 30m.
	MaxBackoff caddy.Duration `json:"max_backoff,omitempty"`

	// MaxAge is how long a message is retried before it is failed.
	// Default: 24h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	// Retention is how long the status record of a finished message is
	// kept after its body was deleted. Default: 7d.
	Retention caddy.Duration `json:"retention,omitempty"`

	// ReplayWindow is how long the body of a finished message is kept so
	// that POST /messages/{id}/retry can put a failed or unknown message
	// back in the queue; bodies hold codes and links, so keep it short.
	// At most retention. Default: 0, bodies are deleted at once and a
	// retry of a finished message answers 410 body_gone.
	ReplayWindow caddy.Duration `json:"replay_window,omitempty"`

	// MaxQueued is the number of unfinished messages above which new sends
	// get 503 queue_full. Default: 100000.
	MaxQueued int `json:"max_queued,omitempty"`

	// AuthReserve is the part of max_queued that only codes, links and
	// alerts (the auth flows) may fill: /send mail, bulk or not, gets 503
	// queue_full once max_queued minus auth_reserve messages are
	// unfinished, so that a flood of /send mail cannot lock users out of
	// their codes. Less than max_queued. Default: a tenth of max_queued.
	AuthReserve int `json:"auth_reserve,omitempty"`

	// MaxQueuedPerKey is the number of unfinished messages of one key
	// (one secret) above which its sends get 503 queue_full, so that one
	// key cannot fill the queue for the others. Default: 0, no limit per
	// key.
	MaxQueuedPerKey int `json:"max_queued_per_key,omitempty"`

	// BulkShare is the least share of the sending, in percent, that mail
	// of a lower lane gets while the lanes above it have mail waiting too:
	// the auth flows (codes, links, alerts) leave first, then /send, then
	// /send with "priority": "bulk". 1 to 50. Default: 10.
	BulkShare int `json:"bulk_share,omitempty"`

	// RetryUncertain resends messages whose outcome is unknown (the
	// connection dropped after the whole message was sent, or the instance
	// stopped mid-attempt), at the risk of a duplicate. Default: false.
	RetryUncertain bool `json:"retry_uncertain,omitempty"`

	// IdempotencyTTL is how long an Idempotency-Key is remembered.
	// Default: 24h.
	IdempotencyTTL caddy.Duration `json:"idempotency_ttl,omitempty"`

	// Lease is how long an instance's heartbeat may lapse before another
	// instance sharing the storage adopts its unfinished messages. Default:
	// 30s.
	Lease caddy.Duration `json:"lease,omitempty"`

	// DrainTimeout is how long a stopping Caddy waits for deliveries in
	// flight; unsent messages stay in storage. Default: 10s.
	DrainTimeout caddy.Duration `json:"drain_timeout,omitempty"`
}

// SMTP configures the SMTP server that authmail delivers through.
type SMTP struct {
	// Host is the SMTP server's host name or IP address. Required.
	Host string `json:"host,omitempty"`

	// Port is the SMTP server's port. Default: 587.
	Port int `json:"port,omitempty"`

	// Username is the user name for SMTP AUTH. It accepts {env.*} and
	// {file.*} placeholders. Default: none, so no authentication.
	Username string `json:"username,omitempty"`

	// Password is the password for SMTP AUTH. It accepts {env.*} and
	// {file.*} placeholders, expanded when the config loads; use them so
	// that the password never appears in the JSON config. Default: none;
	// required with username.
	Password string `json:"password,omitempty"`

	// TLS is "starttls", "implicit" or "none". With starttls the server
	// must offer STARTTLS: authmail never falls back to plaintext. none
	// is only for relays you trust on the path (credentials are refused
	// unless the host is a loopback address). Default: implicit for port
	// 465, otherwise starttls.
	TLS string `json:"tls,omitempty"`

	// CA is a PEM file with extra root certificates to trust for the SMTP
	// server's certificate, in addition to the system roots. Default: the
	// system roots only.
	CA string `json:"ca,omitempty"`

	// HELO is the name sent in EHLO/HELO. Default: the machine's host
	// name, or "localhost" when it cannot be determined.
	HELO string `json:"helo,omitempty"`

	// Timeout bounds connecting and every SMTP command. Default: 15s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Connections is the maximum number of parallel SMTP connections,
	// from 1 to 100. They stay open, are reused across requests and config
	// reloads, and close after a minute of idleness. Default: 4.
	Connections int `json:"connections,omitempty"`

	// Rate caps how fast messages leave for this server, as
	// "<n>/<window>" ("14/1s" for Amazon SES's starting quota, "30/1m"
	// for a Microsoft 365 mailbox). Messages over the cap wait in the
	// queue; the wait is not an attempt. Replies that mean "slow down"
	// (454 4.7.0 Throttling failure, 421 4.7.0 … rate, 4.7.x, 4.3.2 and
	// the providers' own texts) lower the current rate at once and
	// successful sends raise it back slowly; the throttled message is
	// retried as soon as the lowered rate allows, not after
	// retry_backoff. Default: no cap; throttling replies still slow the
	// sending down the same way.
	Rate string `json:"rate,omitempty"`

	// Burst is how many messages may leave back to back under rate after
	// a pause. Default: a tenth of a second's worth of the rate, at least
	// 1 (14/1s and 30/1m send evenly spaced; 50/1s lets 5 go at once).
	Burst int `json:"burst,omitempty"`

	// Auth "xoauth2" or "oauthbearer" authenticates username with an
	// OAuth2 access token (Microsoft 365, Google Workspace) from oauth2 or
	// access_token instead of a password. Default: unset, so a password
	// with the best mechanism the server offers (PLAIN, LOGIN, SCRAM,
	// CRAM-MD5).
	Auth string `json:"auth,omitempty"`

	// OAuth2 lets authmail fetch and refresh the access tokens itself with
	// the refresh-token grant (see OAuth2). Default: unset.
	OAuth2 *OAuth2 `json:"oauth2,omitempty"`

	// AccessToken, instead of oauth2, is a {file.*} (or {env.*})
	// placeholder whose value is the access token, read again each time
	// a connection authenticates, for setups where another agent keeps
	// the file fresh. Default: unset.
	AccessToken string `json:"access_token,omitempty"`
}

// Key is an API key.
type Key struct {
	// ID names the key in logs, placeholders and metrics; it is never
	// secret. It has up to 64 letters, digits, '.', '_' and '-', and starts
	// with a letter or digit. Required.
	ID string `json:"id,omitempty"`

	// Secret is the bearer token, or "sha256:<hex>" of it so that the
	// config never holds the token itself. Accepts {env.*} and {file.*}
	// placeholders, expanded when the config loads. A plain secret has at
	// least 16 characters. The Caddyfile adapter writes a literal secret
	// as its sha256: form. Required.
	Secret string `json:"secret,omitempty"`

	// Allow lists the endpoints the key may call: send, otp, magic-link,
	// password-reset, verify-email, email-change, security-alert, verify
	// (/verify/otp and /verify/token), and the admin endpoints status and
	// test. Default: every send endpoint, neither verify nor an admin
	// endpoint. Any key may read the status of its own messages.
	Allow []string `json:"allow,omitempty"`

	// Rate limits the key's requests, as "<n>/<duration>" or "off".
	// Default: "600/1m".
	Rate string `json:"rate,omitempty"`
}

// apiKey is a provisioned key: only the hash of the secret is kept.
type apiKey struct {
	id     string
	hash   [sha256.Size]byte
	tenant string // tenantOf(hash): the owner of the key's records
	allow  map[string]bool
	rate   ratelimit.Spec
}

// tenantOf names the owner of everything a key leaves behind: the
// messages whose status it may read, its idempotency records and its
// rate-limit window. A key id cannot serve: it is not secret, and two
// site blocks sharing a storage may both name a key "app" with different
// secrets, so scoping by id let one read, replay and throttle the
// other's requests. The tenant is derived from the secret's SHA-256 hash
// alone, so it is the same across reloads and on every instance sharing
// the storage, whatever the key is called there, and two different
// secrets never share one (128 bits). Keys have one secret each: a new
// secret is a new tenant, whether it replaces the old one under the same
// id or comes as a new key (the documented rotation), and the old
// secret's messages are then "not found" for it; their delivery and
// webhooks do not depend on any key. The name is stored in clear (state
// records, authmail/idem/<tenant>, authmail/rl); it is a hash of the
// hash, so it lets a storage reader test guesses of a secret exactly as a
// sha256: value in the config would, and nothing more.
func tenantOf(hash [sha256.Size]byte) string {
	sum := sha256.Sum256(append([]byte("authmail tenant\x00"), hash[:]...))
	return hex.EncodeToString(sum[:16])
}

// Endpoint permissions of keys.
var (
	sendPerms   = permsOf(permSend)
	verifyPerms = permsOf(permVerify)
	// admin (every key's messages in /messages, retry) and preview (the
	// preview page) are the console's permissions: its endpoints
	// register themselves (console.go, preview.go) and are not flows
	adminPerms = append(permsOf(permAdmin), "admin", "preview")
)

// Rate defaults.
const (
	defaultKeyRate       = "600/1m"
	defaultAuthFailures  = "10/1m"
	defaultRecipientRate = "10/15m"
)

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.authmail",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler: defaults, secrets, templates and the
// delivery transport. It never contacts the SMTP server.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := h.checkConfig(); err != nil {
		return err
	}
	h.prefix = strings.TrimSuffix(h.PathPrefix, "/")
	if h.PathPrefix == "" {
		h.prefix = defaultPathPrefix
	}
	if h.MaxBodySize == 0 {
		h.MaxBodySize = defaultMaxBodySize
	}
	h.provisionAddresses()
	if h.relayCompat() {
		h.Links = relayLinks(h.Links, h.baseURL)
	}

	repl := caddy.NewReplacer()
	seen := map[[sha256.Size]byte]string{}
	h.keys = make([]apiKey, 0, len(h.Keys))
	for _, k := range h.Keys {
		secret, err := expandSecret(repl, "key '"+k.ID+"': secret", k.Secret)
		if err != nil {
			return err
		}
		var sum [sha256.Size]byte
		if hexHash, hashed := strings.CutPrefix(secret, "sha256:"); hashed {
			b, err := hex.DecodeString(strings.ToLower(hexHash))
			if err != nil || len(b) != sha256.Size {
				return fmt.Errorf("key '%s': a sha256: secret must be followed by 64 hex digits", k.ID)
			}
			copy(sum[:], b)
		} else {
			if len(secret) < minSecretLength {
				return fmt.Errorf("key '%s': secret is shorter than %d characters", k.ID, minSecretLength)
			}
			if !hasPlaceholder(k.Secret) {
				h.logger.Warn("API key secret is written literally in the config; use {env.*}, {file.*} or sha256:<hex> so that it does not appear in the JSON config",
					zap.String("key_id", k.ID))
			}
			sum = sha256.Sum256([]byte(secret))
		}
		if other, dup := seen[sum]; dup {
			return fmt.Errorf("keys '%s' and '%s' have the same secret", other, k.ID)
		}
		seen[sum] = k.ID
		ak := apiKey{id: k.ID, hash: sum, tenant: tenantOf(sum), allow: map[string]bool{}}
		allow := k.Allow
		if len(allow) == 0 {
			allow = sendPerms
		}
		for _, p := range allow {
			ak.allow[p] = true
		}
		ak.rate, _ = ratelimit.ParseSpec(firstNonEmpty(k.Rate, defaultKeyRate))
		h.keys = append(h.keys, ak)
	}
	h.siteTenant = map[string]bool{}
	for _, k := range h.keys {
		h.siteTenant[k.tenant] = true
	}
	h.authFail, _ = ratelimit.ParseSpec(firstNonEmpty(h.AuthFailures, defaultAuthFailures))
	h.rcptRates = map[string]ratelimit.Spec{}
	def, _ := ratelimit.ParseSpec(firstNonEmpty(h.RecipientRate["default"], defaultRecipientRate))
	for _, flow := range recipientRateFlows {
		h.rcptRates[flow] = def
		if v, ok := h.RecipientRate[flow]; ok {
			h.rcptRates[flow], _ = ratelimit.ParseSpec(v)
		}
	}
	h.origins = nil
	if h.baseOrigin != "" {
		h.origins = append(h.origins, h.baseOrigin)
	}
	for _, o := range h.AllowOrigins {
		u, _ := url.Parse(o)
		if oo := origin(u); !slices.Contains(h.origins, oo) {
			h.origins = append(h.origins, oo)
		}
	}

	var err error
	if err := h.provisionMessages(repl); err != nil {
		return err
	}

	conns := 4
	var route, transportDesc string
	if len(h.SMTPServers) > 0 {
		if route, conns, err = h.provisionFailover(repl); err != nil {
			return err
		}
		hosts := make([]string, len(h.SMTPServers))
		for i, s := range h.SMTPServers {
			port := s.Port
			if port == 0 {
				port = 587
			}
			hosts[i] = fmt.Sprintf("%s:%d", s.Host, port)
		}
		transportDesc = "smtp failover " + strings.Join(hosts, ", ")
	} else if h.Capture != "" {
		h.transport = &mailer.Capture{Dir: h.Capture}
		route = "capture " + h.Capture
		if abs, err := filepath.Abs(h.Capture); err == nil {
			route = "capture " + abs
		}
		transportDesc = route
	} else {
		settings, err := h.SMTP.resolve(repl, h.logger)
		if err != nil {
			return err
		}
		key := settings.PoolKey()
		val, _, err := smtpPool.LoadOrNew(key, func() (caddy.Destructor, error) {
			return mailer.NewSender(settings), nil
		})
		if err != nil {
			return err
		}
		h.poolKey = key
		h.transport = val.(*mailer.Sender)
		conns = settings.Connections
		route = settings.Route()
		transportDesc = fmt.Sprintf("smtp %s:%d (%s)", settings.Host, settings.Port, settings.TLSMode)
	}

	if h.dcfg, err = h.deliveryConfig(repl); err != nil {
		return err
	}
	if h.codes, err = h.Codes.resolve(repl, h.logger); err != nil {
		return err
	}
	storage := h.storageOverride
	if storage == nil && h.StorageRaw != nil {
		mod, err := ctx.LoadModule(h, "StorageRaw")
		if err != nil {
			return fmt.Errorf("loading storage module: %v", err)
		}
		if storage, err = mod.(caddy.StorageConverter).CertMagicStorage(); err != nil {
			return fmt.Errorf("creating storage: %v", err)
		}
	}
	if storage == nil {
		storage = ctx.Storage()
	}
	if err := checkStorageOnce(storage); err != nil {
		return err
	}
	iid, err := caddy.InstanceID()
	if err != nil {
		return fmt.Errorf("reading the instance id: %v", err)
	}
	// one engine per storage and instance; a process has one instance id,
	// tests simulate several
	ekey := "authmail.outbox." + iid.String() + "." + outbox.StorageIdentity(storage)
	val, _, err := sharedPool.LoadOrNew(ekey, func() (caddy.Destructor, error) {
		return newShared(ekey, storage, iid.String()), nil
	})
	if err != nil {
		return err
	}
	h.sharedKey = ekey
	h.shared = val.(*shared)
	h.engine = h.shared.engine
	h.profile = outbox.SenderProfile(h.from.Addr, route)
	h.reg = h.engine.Configure(h.dcfg, h.logger, h.profile, h.transport, conns)
	// the engine uses this config's storage value from now on: the one it
	// was created with may be closed when its config is unloaded
	h.shared.live.Attach(h.reg, storage)
	app, err := ctx.App("authmail")
	if err != nil {
		return err
	}
	app.(*App).add(h.shared)
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		h.logger.Warn("registering metrics failed; metrics disabled", zap.Error(err))
	}
	// one line per handler, so that a newcomer sees where mail goes; no
	// secrets: keys by id, the SMTP host without credentials, the storage
	// by kind (and path for file storage, whose other kinds may hold
	// credentials in their settings)
	keyIDs := make([]string, len(h.keys))
	for i, k := range h.keys {
		keyIDs[i] = k.id
	}
	storageDesc := fmt.Sprintf("%T", storage)
	if fs, ok := storage.(*certmagic.FileStorage); ok {
		storageDesc = "file_system " + fs.Path
	}
	fields := []zap.Field{zap.String("path_prefix", firstNonEmpty(h.PathPrefix, defaultPathPrefix)),
		zap.String("transport", transportDesc), zap.Strings("keys", keyIDs), zap.String("storage", storageDesc)}
	if h.Compat != "" {
		fields = append(fields, zap.String("compat", h.Compat))
	}
	h.logger.Info("authmail handler ready", fields...)
	return nil
}

// durOr is a configured duration, or def when it is not set.
func durOr(v caddy.Duration, def time.Duration) time.Duration {
	if v > 0 {
		return time.Duration(v)
	}
	return def
}

// deliveryConfig resolves the delivery settings with their defaults.
func (h *Handler) deliveryConfig(repl *caddy.Replacer) (*outbox.Config, error) {
	d := h.Delivery
	if d == nil {
		d = &Delivery{}
	}
	cfg := &outbox.Config{
		Wait:            durOr(d.Wait, defaultWait),
		RetryBackoff:    durOr(d.RetryBackoff, defaultRetryBackoff),
		MaxBackoff:      durOr(d.MaxBackoff, defaultMaxBackoff),
		MaxAge:          durOr(d.MaxAge, defaultMaxAge),
		Retention:       durOr(d.Retention, defaultRetention),
		ReplayWindow:    time.Duration(d.ReplayWindow),
		IdemTTL:         durOr(d.IdempotencyTTL, defaultIdempotencyTTL),
		Lease:           durOr(d.Lease, defaultLease),
		Drain:           durOr(d.DrainTimeout, defaultDrainTimeout),
		MaxQueued:       d.MaxQueued,
		BulkShare:       float64(d.BulkShare) / 100,
		AuthReserve:     d.AuthReserve,
		MaxQueuedPerKey: d.MaxQueuedPerKey,
		RetryUncertain:  d.RetryUncertain,
		WebhookAllow:    h.WebhookAllowHosts,
	}
	if h.relayCompat() {
		// webhooks carry the relay's payload, which names a delivered
		// message "delivered" ("captured" in capture mode)
		sent := "delivered"
		if h.Capture != "" {
			sent = "captured"
		}
		cfg.WebhookBody = func(st outbox.State) any { return relayPayloadOf(st, sent) }
	}
	if cfg.MaxQueued == 0 {
		cfg.MaxQueued = defaultMaxQueued
	}
	if d.Wait < 0 {
		cfg.Wait = 0
	}
	if h.WebhookSecret != "" {
		secret, err := expandSecret(repl, "webhook_secret", h.WebhookSecret)
		if err != nil {
			return nil, err
		}
		if _, err := outbox.WebhookKey(secret); err != nil {
			return nil, fmt.Errorf("webhook_secret: %v", err)
		}
		cfg.WebhookSecret = secret
		if !hasPlaceholder(h.WebhookSecret) {
			h.logger.Warn("webhook_secret is written literally in the config; use {env.*} or {file.*} so that it does not appear in the JSON config")
		}
	}
	return cfg, nil
}

// resolve expands secrets, reads the CA file and fills in defaults.
func (s *SMTP) resolve(repl *caddy.Replacer, logger *zap.Logger) (mailer.SMTPSettings, error) {
	out := mailer.SMTPSettings{
		Host:        s.Host,
		Port:        s.Port,
		TLSMode:     s.TLS,
		HELO:        s.HELO,
		Timeout:     time.Duration(s.Timeout),
		Connections: s.Connections,
		Burst:       s.Burst,
	}
	if s.Rate != "" {
		r, err := ratelimit.ParseSpec(s.Rate)
		if err != nil {
			return out, fmt.Errorf("smtp: %v", err)
		}
		out.Rate = r
	}
	if out.Port == 0 {
		out.Port = defaultSMTPPort
	}
	if out.TLSMode == "" {
		out.TLSMode = mailer.TLSStartTLS
		if out.Port == 465 {
			out.TLSMode = mailer.TLSImplicit
		}
	}
	if out.Timeout == 0 {
		out.Timeout = defaultSMTPTimeout
	}
	if out.Connections == 0 {
		out.Connections = defaultConnections
	}
	if out.HELO == "" {
		out.HELO = "localhost"
		if hn, err := os.Hostname(); err == nil && hn != "" && headerProblem(hn) == "" && !strings.ContainsAny(hn, " ") {
			out.HELO = hn
		}
	}
	var err error
	if s.Username != "" {
		if out.Username, err = repl.ReplaceOrErr(s.Username, true, true); err != nil {
			return out, fmt.Errorf("smtp: expanding username: %v", err)
		}
		if out.Password, err = expandSecret(repl, "smtp password", s.Password); err != nil {
			return out, err
		}
		if out.OAuth, err = s.resolveOAuth(repl); err != nil {
			return out, err
		}
		if out.OAuth != nil {
			if o := s.OAuth2; o != nil && (!hasPlaceholder(o.RefreshToken) || (o.ClientSecret != "" && !hasPlaceholder(o.ClientSecret))) {
				logger.Warn("SMTP OAuth2 refresh_token or client_secret is written literally in the config; use {env.*} or {file.*} so that it does not appear in the JSON config")
			}
		} else if !hasPlaceholder(s.Password) {
			logger.Warn("SMTP password is written literally in the config; use {env.*} or {file.*} so that it does not appear in the JSON config")
		}
	}
	if out.TLSMode == mailer.TLSNone && out.Username != "" && !isLoopbackHost(out.Host) {
		return out, errors.New("smtp: refusing to send credentials without TLS to a non-loopback host; use tls starttls or implicit")
	}
	pool, perr := x509.SystemCertPool()
	if perr != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if s.CA != "" {
		pem, err := os.ReadFile(s.CA)
		if err != nil {
			return out, fmt.Errorf("smtp: reading ca: %w", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return out, fmt.Errorf("smtp: ca %s holds no PEM certificate", s.CA)
		}
		out.CAPEM = pem
	}
	out.TLSConfig = &tls.Config{
		ServerName:         out.Host,
		RootCAs:            pool,
		MinVersion:         tls.VersionTLS12,
		ClientSessionCache: tls.NewLRUClientSessionCache(64),
	}
	return out, nil
}

// Validate checks the provisioned handler.
func (h *Handler) Validate() error {
	if h.transport == nil {
		return errors.New("no delivery transport: configure smtp or capture")
	}
	if len(h.keys) == 0 {
		return errors.New("at least one key is required")
	}
	return nil
}

// Cleanup releases the SMTP sender reference taken in Provision. The
// sender itself closes its connections once no config uses it; sends in
// flight finish first.
func (h *Handler) Cleanup() error {
	var errs []error
	if h.sharedKey != "" {
		h.engine.Release(h.reg)
		h.shared.live.Detach(h.reg)
		h.reg = nil
		if _, err := sharedPool.Delete(h.sharedKey); err != nil {
			errs = append(errs, err)
		}
		h.sharedKey = ""
	}
	errs = append(errs, h.cleanupFailover()...)
	if h.poolKey != "" {
		if _, err := smtpPool.Delete(h.poolKey); err != nil {
			errs = append(errs, err)
		}
		h.poolKey = ""
	}
	return errors.Join(errs...)
}

// placeholderPattern matches the placeholders a secret may use, expanded
// at provision time: {env.API_KEY}, {file./run/secrets/key},
// {file.C:/keys/app}.
var placeholderPattern = regexp.MustCompile(`\{(?:env|file)\.[^{}\s]+\}`)

// hasPlaceholder reports whether a secret is (or holds) an {env.*} or
// {file.*} placeholder rather than being a literal value: a literal may
// contain braces too ("ab{cd", "S3cr3t{Pa55}").
func hasPlaceholder(s string) bool { return placeholderPattern.MatchString(s) }

// expandSecret expands the {env.*} and {file.*} placeholders of a secret;
// a secret without any is literal and used as written, braces and all.
// An error names the placeholders, never the secret's literal text.
func expandSecret(repl *caddy.Replacer, what, s string) (string, error) {
	if !hasPlaceholder(s) {
		return s, nil
	}
	out, err := repl.ReplaceOrErr(s, true, true)
	if err != nil {
		return "", fmt.Errorf("%s: %s is empty or cannot be read", what, strings.Join(placeholderPattern.FindAllString(s, -1), ", "))
	}
	return out, nil
}

var keyIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// checkConfig validates the configuration without I/O. Provision runs it
// for JSON configs; the Caddyfile adapter runs the same checks so that
// mistakes are reported with the file and line.
func (h *Handler) checkConfig() error {
	if h.PathPrefix != "" {
		if err := checkPathPrefix(h.PathPrefix); err != nil {
			return err
		}
	}
	switch {
	case len(h.SMTPServers) > 0:
		if err := h.checkSMTPServers(); err != nil {
			return err
		}
	case h.SMTP != nil && h.Capture != "":
		return errors.New("smtp and capture are mutually exclusive; configure exactly one")
	case h.SMTP == nil && h.Capture == "":
		return errors.New("a delivery method is required: configure smtp or capture")
	case h.SMTP != nil:
		if err := h.SMTP.check(); err != nil {
			return err
		}
	}
	if h.From == "" {
		return errors.New("from is required")
	}
	if err := checkConfigAddress("from", h.From); err != nil {
		return err
	}
	if p := displayNameProblem(h.FromName); p != "" {
		return fmt.Errorf("from display name %s", p)
	}
	if err := checkConfigText("from display name", h.FromName); err != nil {
		return err
	}
	if h.ReplyTo != "" {
		if err := checkConfigAddress("reply_to", h.ReplyTo); err != nil {
			return err
		}
	}
	if err := checkConfigText("app_name", h.AppName); err != nil {
		return err
	}
	if err := checkConfigLocale(h.Locale); err != nil {
		return err
	}
	if h.BaseURL != "" {
		if err := checkBaseURL(h.BaseURL); err != nil {
			return err
		}
	}
	for flow, tpl := range h.Links {
		if err := checkLinkTemplate(flow, tpl); err != nil {
			return err
		}
	}
	if len(h.Keys) == 0 {
		return errors.New("at least one key is required")
	}
	ids := map[string]bool{}
	for _, k := range h.Keys {
		if err := checkKey(k.ID, k.Secret); err != nil {
			return err
		}
		if ids[k.ID] {
			return fmt.Errorf("key '%s' is defined twice", k.ID)
		}
		ids[k.ID] = true
		for _, p := range k.Allow {
			if err := checkPermission(p); err != nil {
				return fmt.Errorf("key '%s': %v", k.ID, err)
			}
		}
		if k.Rate != "" {
			if _, err := ratelimit.ParseSpec(k.Rate); err != nil {
				return fmt.Errorf("key '%s': %v", k.ID, err)
			}
		}
	}
	if h.AuthFailures != "" {
		if _, err := ratelimit.ParseSpec(h.AuthFailures); err != nil {
			return fmt.Errorf("auth_failures: %v", err)
		}
	}
	for flow, v := range h.RecipientRate {
		if flow != "default" && !slices.Contains(recipientRateFlows, flow) {
			return fmt.Errorf("recipient_rate: unknown flow '%s' (expected one of %s)", flow, strings.Join(recipientRateFlows, ", "))
		}
		if _, err := ratelimit.ParseSpec(v); err != nil {
			return fmt.Errorf("recipient_rate: %v", err)
		}
	}
	for _, o := range h.AllowOrigins {
		if err := checkOrigin(o); err != nil {
			return err
		}
	}
	switch h.Compat {
	case "", compatRelay:
	default:
		return fmt.Errorf("compat must be %s, not '%s'", compatRelay, h.Compat)
	}
	switch h.LinkPolicy {
	case "", "off", "enforce":
	default:
		return fmt.Errorf("link_policy must be enforce or off, not '%s'", h.LinkPolicy)
	}
	switch h.AdminScope {
	case "", adminScopeSite, adminScopeStorage:
	default:
		return fmt.Errorf("admin_scope must be %s or %s, not '%s'", adminScopeSite, adminScopeStorage, h.AdminScope)
	}
	for ev := range h.SecurityAlerts {
		if err := checkSecurityEvent(ev); err != nil {
			return err
		}
	}
	if h.MaxBodySize < 0 {
		return errors.New("max_body_size must not be negative")
	}
	if d := h.Delivery; d != nil {
		for name, v := range map[string]caddy.Duration{"retry_backoff": d.RetryBackoff, "max_backoff": d.MaxBackoff,
			"max_age": d.MaxAge, "retention": d.Retention, "idempotency_ttl": d.IdempotencyTTL, "lease": d.Lease, "drain_timeout": d.DrainTimeout, "replay_window": d.ReplayWindow} {
			if v < 0 {
				return fmt.Errorf("delivery %s must not be negative", name)
			}
		}
		if d.BulkShare < 0 || d.BulkShare > 50 {
			return fmt.Errorf("delivery bulk_share must be between 1 and 50 (percent), not %d", d.BulkShare)
		}
		if d.MaxQueued < 0 {
			return errors.New("delivery max_queued must not be negative")
		}
		if d.AuthReserve < 0 || d.MaxQueuedPerKey < 0 {
			return errors.New("delivery auth_reserve and max_queued_per_key must not be negative")
		}
		maxQ := d.MaxQueued
		if maxQ == 0 {
			maxQ = defaultMaxQueued
		}
		if d.AuthReserve >= maxQ {
			// /send mail could never be accepted
			return fmt.Errorf("delivery auth_reserve (%d) must be less than max_queued (%d)", d.AuthReserve, maxQ)
		}
		if d.ReplayWindow > 0 && time.Duration(d.ReplayWindow) > durOr(d.Retention, defaultRetention) {
			return errors.New("delivery replay_window must not be longer than retention: a body outliving its status record could not be retried")
		}
		// with the defaults filled in: "max_backoff 1s" alone is below the
		// default retry_backoff (30s), "retry_backoff 1h" alone above the
		// default max_backoff (30m)
		retry, maxB := durOr(d.RetryBackoff, defaultRetryBackoff), durOr(d.MaxBackoff, defaultMaxBackoff)
		if maxB < retry {
			return fmt.Errorf("delivery max_backoff (%s) must not be shorter than retry_backoff (%s); set both", maxB, retry)
		}
	}
	if h.Codes != nil {
		if err := h.Codes.check(); err != nil {
			return err
		}
	}
	if h.DKIM != nil {
		if err := h.DKIM.check(); err != nil {
			return err
		}
	}
	for _, host := range h.WebhookAllowHosts {
		if strings.Contains(host, ",") {
			return fmt.Errorf("invalid webhook_allow_hosts entry '%s': give one host per entry, not a comma-joined list (JSON: [\"%s\"]; Caddyfile: webhook_allow_hosts %s)",
				host, strings.Join(strings.Split(host, ","), `", "`), strings.Join(strings.Split(host, ","), " "))
		}
		if host == "" || strings.ContainsAny(host, "/ :@?#") && !strings.HasPrefix(host, "[") {
			return fmt.Errorf("invalid webhook_allow_hosts entry '%s': give a host name or IP address", host)
		}
	}
	return nil
}

func (s *SMTP) check() error {
	if s.Host == "" {
		return errors.New("smtp: host is required")
	}
	if strings.ContainsAny(s.Host, " /\\@\r\n\t{}") {
		// braces: a placeholder ({env.SMTP_HOST}) is not expanded in the
		// host; use {$SMTP_HOST} in the Caddyfile
		return fmt.Errorf("smtp: invalid host '%s' (placeholders are not expanded here; in a Caddyfile use {$VAR})", s.Host)
	}
	if s.Port < 0 || s.Port > 65535 {
		return fmt.Errorf("smtp: invalid port %d", s.Port)
	}
	switch s.TLS {
	case "", mailer.TLSStartTLS, mailer.TLSImplicit, mailer.TLSNone:
	default:
		return fmt.Errorf("smtp: tls must be starttls, implicit or none, not '%s'", s.TLS)
	}
	if s.Password != "" && s.Username == "" {
		return errors.New("smtp: password is set but username is not")
	}
	if err := s.checkOAuth(); err != nil {
		return err
	}
	if s.Username != "" && s.Password == "" && s.Auth == "" {
		return errors.New("smtp: username is set but password is not")
	}
	if s.TLS == mailer.TLSNone && s.Username != "" && !isLoopbackHost(s.Host) {
		return errors.New("smtp: refusing to send credentials without TLS to a non-loopback host; use tls starttls or implicit")
	}
	if s.HELO != "" && (headerProblem(s.HELO) != "" || strings.ContainsAny(s.HELO, " ")) {
		return fmt.Errorf("smtp: invalid helo '%s'", s.HELO)
	}
	if s.Timeout < 0 {
		return errors.New("smtp: timeout must not be negative")
	}
	if s.Connections < 0 || s.Connections > 100 {
		return fmt.Errorf("smtp: connections must be between 1 and 100, not %d", s.Connections)
	}
	if s.Rate != "" && s.Rate != "off" {
		if _, err := ratelimit.ParseSpec(s.Rate); err != nil {
			return fmt.Errorf("smtp: %v", err)
		}
	}
	if s.Burst < 0 || s.Burst > 1_000_000 {
		return fmt.Errorf("smtp: burst must be between 1 and 1000000, not %d", s.Burst)
	}
	if s.Burst > 0 && (s.Rate == "" || s.Rate == "off") {
		return errors.New("smtp: burst needs a rate")
	}
	return nil
}

func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

func checkPathPrefix(p string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("path_prefix must start with '/': '%s'", p)
	}
	if strings.ContainsAny(p, "?#*{} \t\r\n") || strings.Contains(p, "//") {
		return fmt.Errorf("invalid path_prefix '%s'", p)
	}
	return nil
}

func checkConfigAddress(what, v string) error {
	a, p := parseAddress(v)
	if p != "" {
		return fmt.Errorf("%s '%s' %s", what, v, p)
	}
	if a.Name != "" && what == "from" {
		return fmt.Errorf("from must be a bare address; give the display name as a separate argument (from_name in JSON)")
	}
	return nil
}

func checkConfigText(what, v string) error {
	if p := headerProblem(v); p != "" {
		return fmt.Errorf("%s %s", what, p)
	}
	// from_name and app_name go into From and subjects
	if p := encodedWordProblem(v); p != "" {
		return fmt.Errorf("%s %s", what, p)
	}
	if utf8.RuneCountInString(v) > 200 {
		return fmt.Errorf("%s is longer than 200 characters", what)
	}
	return nil
}

func checkBaseURL(v string) error {
	u, p := parseHTTPURL(v)
	if p != "" {
		return fmt.Errorf("base_url '%s' %s", v, p)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return fmt.Errorf("base_url '%s' must not have a query or a fragment", v)
	}
	return nil
}

func checkLinkTemplate(flow, tpl string) error {
	if !slices.Contains(linkFlows, flow) {
		return fmt.Errorf("link: unknown flow '%s' (expected one of %s)", flow, strings.Join(linkFlows, ", "))
	}
	if !strings.Contains(tpl, "{token}") {
		return fmt.Errorf("link %s: the URL template must contain {token}", flow)
	}
	if _, p := parseHTTPURL(strings.ReplaceAll(tpl, "{token}", "sample")); p != "" {
		return fmt.Errorf("link %s: the URL template %s", flow, p)
	}
	return nil
}

func checkKey(id, secret string) error {
	if !keyIDPattern.MatchString(id) {
		// not quoted: a secret given where the id belongs would be
		return errors.New("invalid key id: use up to 64 letters, digits, '.', '_' and '-', starting with a letter or digit, and give the id before the secret")
	}
	if secret == "" {
		return fmt.Errorf("key '%s': secret is required", id)
	}
	if hexHash, hashed := strings.CutPrefix(secret, "sha256:"); hashed && !hasPlaceholder(secret) {
		if b, err := hex.DecodeString(strings.ToLower(hexHash)); err != nil || len(b) != sha256.Size {
			return fmt.Errorf("key '%s': a sha256: secret must be followed by 64 hex digits", id)
		}
		return nil
	}
	if !hasPlaceholder(secret) && len(secret) < minSecretLength {
		return fmt.Errorf("key '%s': secret is shorter than %d characters", id, minSecretLength)
	}
	return nil
}

// recipientRateFlows are the flows limited per recipient.
var recipientRateFlows = flowNames(func(f *flowDef) bool { return f.recipientLimit })

func checkPermission(p string) error {
	if strings.Contains(p, ",") {
		return commaList("allow", []string{p})
	}
	if slices.Contains(sendPerms, p) || slices.Contains(verifyPerms, p) || slices.Contains(adminPerms, p) {
		return nil
	}
	return fmt.Errorf("unknown endpoint '%s' in allow (expected %s)", p, strings.Join(slices.Concat(sendPerms, verifyPerms, adminPerms), ", "))
}

// checkOrigin validates an allow_origins entry: an https origin, or http
// for localhost, without path, query or user info.
func checkOrigin(o string) error {
	if strings.Contains(o, ",") {
		return commaList("allow_origin", []string{o})
	}
	u, p := parseHTTPURL(o)
	if p != "" {
		return fmt.Errorf("allow_origin '%s' %s", o, p)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("allow_origin '%s' must be an origin (scheme and host) without a path", o)
	}
	if u.Scheme == "http" && !isLoopbackHost(u.Hostname()) {
		return fmt.Errorf("allow_origin '%s' must use https (http is only allowed for localhost)", o)
	}
	return nil
}

func checkSecurityEvent(ev string) error {
	if _, ok := securityEvents[ev]; !ok {
		return fmt.Errorf("unknown security alert event '%s' (expected one of %s)", ev, strings.Join(securityEventNames(), ", "))
	}
	return nil
}

func firstNonEmpty(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
	_ caddy.Destructor            = (*mailer.Sender)(nil)
	_ caddy.Destructor            = (*shared)(nil)
)

// provisionMessages loads what builds a message besides its addresses:
// the templates, the default locale and the DKIM key. Provision and
// `caddy authmail test` share it, so that the command's message is built
// and signed as the running handler builds and signs every message.
func (h *Handler) provisionMessages(repl *caddy.Replacer) error {
	var err error
	if h.tmpl, err = loadTemplates(h.Templates); err != nil {
		return err
	}
	if err := h.provisionLocale(); err != nil {
		return err
	}
	h.dkim, err = h.DKIM.resolve(repl, h.logger, h.from.domain())
	return err
}

// provisionAddresses resolves the sender, the reply-to address, the app
// name and the base URL, which checkConfig has validated: Provision and
// the commands that render mail without a server share it.
func (h *Handler) provisionAddresses() {
	h.from, _ = parseAddress(h.From)
	h.from.Name = h.FromName
	if h.ReplyTo != "" {
		rt, _ := parseAddress(h.ReplyTo)
		h.replyTo = []mailAddr{rt}
	}
	h.appName = firstNonEmpty(h.AppName, h.FromName, h.from.domain())
	if h.BaseURL != "" {
		h.baseURL = strings.TrimRight(h.BaseURL, "/")
		u, _ := url.Parse(h.baseURL)
		h.baseOrigin = origin(u)
	}
}
