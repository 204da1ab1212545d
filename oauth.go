package authmail

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/wneessen/go-mail/smtp"
	"golang.org/x/oauth2"
)

// SASL mechanisms that authenticate with an OAuth2 access token.
const (
	authXOAUTH2     = "xoauth2"
	authOAUTHBEARER = "oauthbearer"
)

// OAuth2 configures the refresh-token grant (RFC 6749 6) that gives
// authmail the access tokens for AUTH XOAUTH2 or OAUTHBEARER.
type OAuth2 struct {
	// TokenURL is the authorization server's token endpoint, e.g.
	// https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token or
	// https://oauth2.googleapis.com/token. https, or http to a loopback
	// address. Required.
	TokenURL string `json:"token_url,omitempty"`

	// ClientID is the OAuth2 client (application) id. Required.
	ClientID string `json:"client_id,omitempty"`

	// ClientSecret is the client secret. It accepts {env.*} and {file.*}
	// placeholders, expanded when the config loads. Default: none (a
	// public client).
	ClientSecret string `json:"client_secret,omitempty"`

	// RefreshToken is the long-lived refresh token obtained once by
	// consent. It accepts {env.*} and {file.*} placeholders. When the
	// server rotates it, authmail uses the new one from then on but keeps
	// it in memory only: after a restart it starts again from this value.
	// Required.
	RefreshToken string `json:"refresh_token,omitempty"`

	// Scopes are sent with each refresh, e.g.
	// https://outlook.office365.com/SMTP.Send offline_access. Default:
	// none (the scopes of the grant).
	Scopes []string `json:"scopes,omitempty"`
}

// Tunables; tests shorten them.
var (
	// tokenEarly: an access token is refreshed this long before it
	// expires, so that a connection never authenticates with one that
	// runs out during the exchange
	tokenEarly = 60 * time.Second
)

func (o *OAuth2) check() error {
	if o.TokenURL == "" {
		return errors.New("smtp oauth2: token_url is required")
	}
	u, err := url.Parse(o.TokenURL)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") || u.User != nil {
		return errors.New("smtp oauth2: token_url must be an absolute https URL")
	}
	if u.Scheme == "http" && !isLoopbackHost(u.Hostname()) {
		return errors.New("smtp oauth2: token_url must use https (http is only allowed to a loopback address)")
	}
	if o.ClientID == "" {
		return errors.New("smtp oauth2: client_id is required")
	}
	if o.RefreshToken == "" {
		return errors.New("smtp oauth2: refresh_token is required")
	}
	return nil
}

// checkOAuth validates the OAuth2 settings of an smtp block.
func (s *SMTP) checkOAuth() error {
	switch s.Auth {
	case "":
		if s.OAuth2 != nil || s.AccessToken != "" {
			return errors.New("smtp: oauth2 and access_token need auth xoauth2 or oauthbearer")
		}
		return nil
	case authXOAUTH2, authOAUTHBEARER:
	default:
		return fmt.Errorf("smtp: auth must be xoauth2 or oauthbearer (or unset for a password), not '%s'", s.Auth)
	}
	if s.Username == "" {
		return fmt.Errorf("smtp: auth %s needs the username (the mailbox the token belongs to)", s.Auth)
	}
	if s.Password != "" {
		return fmt.Errorf("smtp: auth %s authenticates with a token; remove the password", s.Auth)
	}
	switch {
	case s.OAuth2 != nil && s.AccessToken != "":
		return errors.New("smtp: give either oauth2 or access_token, not both")
	case s.OAuth2 != nil:
		return s.OAuth2.check()
	case s.AccessToken == "":
		return fmt.Errorf("smtp: auth %s needs an oauth2 block or an access_token", s.Auth)
	case !hasPlaceholder(s.AccessToken):
		return errors.New("smtp: access_token must be a {file.*} (or {env.*}) placeholder, read each time a connection authenticates")
	}
	return nil
}

// oauthSettings are the resolved token settings of an SMTP sender.
type oauthSettings struct {
	mech         string // authXOAUTH2 or authOAUTHBEARER
	tokenURL     string
	clientID     string
	clientSecret string
	refreshToken string
	scopes       []string
	// accessToken is the placeholder expanded at every authentication,
	// when tokens come from a file another agent refreshes
	accessToken string
}

// resolveOAuth expands the secrets of the OAuth2 settings.
func (s *SMTP) resolveOAuth(repl *caddy.Replacer) (*oauthSettings, error) {
	if s.Auth == "" {
		return nil, nil
	}
	o := &oauthSettings{mech: s.Auth, accessToken: s.AccessToken}
	if c := s.OAuth2; c != nil {
		o.tokenURL, o.clientID, o.scopes = c.TokenURL, c.ClientID, c.Scopes
		var err error
		if o.clientSecret, err = expandSecret(repl, "smtp oauth2 client_secret", c.ClientSecret); err != nil {
			return nil, err
		}
		if o.refreshToken, err = expandSecret(repl, "smtp oauth2 refresh_token", c.RefreshToken); err != nil {
			return nil, err
		}
		if o.refreshToken == "" {
			return nil, errors.New("smtp oauth2: refresh_token is empty")
		}
	} else if _, err := expandSecret(repl, "smtp access_token", s.AccessToken); err != nil {
		// checked now so that a typo fails the load; read again at each
		// authentication
		return nil, err
	}
	return o, nil
}

// key lists the fields that make a different token source.
func (o *oauthSettings) key() []string {
	if o == nil {
		return nil
	}
	return []string{o.mech, o.tokenURL, o.clientID, o.clientSecret, o.refreshToken, strings.Join(o.scopes, " "), o.accessToken}
}

// tokenSource hands out access tokens for one SMTP sender. It lives as
// long as the sender, so across config reloads that keep the settings.
type tokenSource struct {
	cfg     *oauthSettings
	timeout time.Duration

	mu      sync.Mutex
	tok     *oauth2.Token // the current token; nil before the first refresh
	refresh string        // the current refresh token (rotated by the server)

	refreshes atomic.Int64 // successful refreshes, for tests and /status
}

func newTokenSource(cfg *oauthSettings, timeout time.Duration) *tokenSource {
	return &tokenSource{cfg: cfg, timeout: timeout, refresh: cfg.refreshToken}
}

// canRenew reports whether a rejected token can be replaced by a new
// one, i.e. tokens come from the refresh grant.
func (ts *tokenSource) canRenew() bool { return ts.cfg.tokenURL != "" }

// token returns an access token that is valid for at least tokenEarly.
// rejected is a token the SMTP server just refused: unless another
// connection has already replaced it, it is refreshed even if it has
// not expired (revoked, or the clock of the issuer is ahead).
//
// Errors never hold a token or secret: the token endpoint's error code
// and description, or the transport error, only.
func (ts *tokenSource) token(ctx context.Context, rejected string) (string, error) {
	if !ts.canRenew() {
		v, err := expandSecret(caddy.NewReplacer(), "smtp access_token", ts.cfg.accessToken)
		if err != nil {
			return "", err
		}
		return strings.TrimSpace(v), nil
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if t := ts.tok; t != nil && t.AccessToken != rejected &&
		(t.Expiry.IsZero() || time.Until(t.Expiry) > tokenEarly) {
		return t.AccessToken, nil
	}
	conf := &oauth2.Config{
		ClientID: ts.cfg.clientID, ClientSecret: ts.cfg.clientSecret, Scopes: ts.cfg.scopes,
		Endpoint: oauth2.Endpoint{TokenURL: ts.cfg.tokenURL, AuthStyle: oauth2.AuthStyleInParams},
	}
	ctx, cancel := context.WithTimeout(ctx, ts.timeout)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, &http.Client{Timeout: ts.timeout, Transport: scopeAdder{ts.cfg.scopes}})
	// an expired token with the current refresh token makes the source
	// refresh at once
	nt, err := conf.TokenSource(ctx, &oauth2.Token{RefreshToken: ts.refresh, Expiry: time.Unix(1, 0)}).Token()
	if err != nil {
		return "", ts.tokenError(err)
	}
	if nt.AccessToken == "" {
		return "", errors.New("fetching an OAuth2 access token: the token endpoint returned no access_token")
	}
	ts.tok = nt
	if nt.RefreshToken != "" {
		ts.refresh = nt.RefreshToken
	}
	ts.refreshes.Add(1)
	return nt.AccessToken, nil
}

// scopeAdder adds the scope parameter to refresh requests: x/oauth2
// sends none when refreshing, and Microsoft's v2.0 endpoint requires it
// (the scopes of the original grant apply elsewhere when it is absent).
type scopeAdder struct{ scopes []string }

func (a scopeAdder) RoundTrip(r *http.Request) (*http.Response, error) {
	if len(a.scopes) == 0 || r.Body == nil || r.Method != http.MethodPost {
		return http.DefaultTransport.RoundTrip(r)
	}
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		return nil, err
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, err
	}
	if form.Get("scope") == "" {
		form.Set("scope", strings.Join(a.scopes, " "))
	}
	enc := form.Encode()
	r = r.Clone(r.Context())
	r.Body = io.NopCloser(strings.NewReader(enc))
	r.ContentLength = int64(len(enc))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(enc)), nil }
	return http.DefaultTransport.RoundTrip(r)
}

// tokenError describes a failed refresh without the response body (it
// may echo what was sent) or any secret.
func (ts *tokenSource) tokenError(err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		msg := "fetching an OAuth2 access token: the token endpoint answered"
		if re.Response != nil {
			msg += " " + re.Response.Status
		}
		if re.ErrorCode != "" {
			msg += ": " + sanitizeLine(re.ErrorCode, 60)
		}
		if re.ErrorDescription != "" {
			msg += " (" + sanitizeLine(ts.scrub(re.ErrorDescription), 200) + ")"
		}
		return errors.New(msg)
	}
	return errors.New("fetching an OAuth2 access token: " + sanitizeLine(ts.scrub(err.Error()), 300))
}

// scrub removes the secrets from a text that might quote them.
func (ts *tokenSource) scrub(s string) string {
	for _, v := range []string{ts.cfg.clientSecret, ts.cfg.refreshToken, ts.refresh} {
		if len(v) >= 4 {
			s = strings.ReplaceAll(s, v, "[redacted]")
		}
	}
	return s
}

// tokenAuth returns the SASL client for the mechanism and token.
func tokenAuth(mech, user, token string) smtp.Auth {
	if mech == authOAUTHBEARER {
		return &oauthBearerAuth{user: user, token: token}
	}
	return smtp.XOAuth2Auth(user, token)
}

// oauthBearerAuth is the client side of OAUTHBEARER (RFC 7628). go-mail
// has none.
type oauthBearerAuth struct{ user, token string }

func (a *oauthBearerAuth) Start(*smtp.ServerInfo) (string, []byte, error) {
	// gs2 header with the authorization identity; no host or port: they
	// are optional, and some servers refuse a mismatch
	return "OAUTHBEARER", []byte("n,a=" + saslName(a.user) + ",\x01auth=Bearer " + a.token + "\x01\x01"), nil
}

// Next answers the server's JSON error challenge with the dummy %x01
// the RFC requires; the server then ends the exchange with an error.
func (a *oauthBearerAuth) Next(_ []byte, more bool) ([]byte, error) {
	if more {
		return []byte{0x01}, nil
	}
	return nil, nil
}

// saslName escapes ',' and '=' in a gs2 authzid (RFC 5801 4).
func saslName(s string) string {
	return strings.NewReplacer("=", "=3D", ",", "=2C").Replace(s)
}

// authToken authenticates the connection with an access token. A
// refused token is returned in the error (rejectedToken) so that send
// can retry once with a fresh one.
func (s *smtpSender) authToken(ctx context.Context, client *smtp.Client, rejected string, deadline func()) *deliveryError {
	cfg := &s.cfg
	mechName := strings.ToUpper(cfg.oauth.mech)
	has, list := client.Extension("AUTH")
	offered := false
	for _, m := range strings.Fields(strings.ToUpper(list)) {
		offered = offered || m == mechName
	}
	if !has || !offered {
		return &deliveryError{Code: codeSMTPAuthFailed, Phase: phaseAuth,
			Err: fmt.Errorf("the SMTP server does not offer AUTH %s (it offers: %s)", mechName, sanitizeLine(list, 100))}
	}
	tok, err := s.tokens.token(ctx, rejected)
	if err != nil {
		return &deliveryError{Code: codeSMTPAuthFailed, Phase: phaseAuth, Err: err}
	}
	// the refresh may have taken most of the command timeout
	deadline()
	if err := client.Auth(tokenAuth(cfg.oauth.mech, cfg.username, tok)); err != nil {
		de := classify(phaseAuth, err)
		if de.Code == codeSMTPAuthFailed && de.Reply != nil && de.Reply.Code >= 500 {
			de.rejectedToken = tok
		}
		return de
	}
	return nil
}

// eachOptionOrBlock is eachOption for a block that also holds nested
// blocks: a subdirective named in blocks takes no value and is parsed by
// its function.
func eachOptionOrBlock(d *caddyfile.Dispenser, block string, blocks map[string]func() error, set func(sub, v string) error) error {
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s %s already specified", block, sub)
		}
		seen[sub] = true
		if parse, ok := blocks[sub]; ok {
			if err := parse(); err != nil {
				return err
			}
			continue
		}
		argErr := func() error {
			return d.Errf("%s %s: wrong argument count; expected one value (quote a value that holds spaces)", block, sub)
		}
		if !d.NextArg() {
			return argErr()
		}
		v := d.Val()
		if d.NextArg() {
			return argErr()
		}
		if err := set(sub, v); err != nil {
			return err
		}
	}
	return nil
}

// unmarshalOAuth2 parses `oauth2 { token_url …; client_id …; … }`. Errors
// never quote a value: client_secret and refresh_token may be literal.
func unmarshalOAuth2(d *caddyfile.Dispenser) (*OAuth2, error) {
	if d.NextArg() {
		return nil, d.Errf("smtp oauth2 takes no arguments, only a block")
	}
	o := &OAuth2{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("smtp oauth2 %s already specified", sub)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		if sub == "scopes" {
			if len(args) == 0 {
				return nil, d.Errf("smtp oauth2 scopes: expected at least one scope")
			}
			o.Scopes = args
			continue
		}
		if len(args) != 1 {
			return nil, d.Errf("smtp oauth2 %s: wrong argument count; expected one value (quote a value that holds spaces)", sub)
		}
		switch sub {
		case "token_url":
			o.TokenURL = args[0]
		case "client_id":
			o.ClientID = args[0]
		case "client_secret":
			o.ClientSecret = args[0]
		case "refresh_token":
			o.RefreshToken = args[0]
		default:
			return nil, d.Errf("unrecognized smtp oauth2 subdirective '%s'", sub)
		}
	}
	if err := o.check(); err != nil {
		return nil, d.WrapErr(err)
	}
	return o, nil
}
