package authmail

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("authmail", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("authmail", httpcaddyfile.Before, "respond")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	authmail [<matcher>] {
//		path_prefix <path>
//		smtp <host>[:<port>] {
//			username <user>
//			password <password>
//			tls starttls|implicit|none
//			ca <pem file>
//			helo <name>
//			timeout <duration>
//			connections <n>
//			auth xoauth2|oauthbearer
//			oauth2 {
//				token_url <url>
//				client_id <id>
//				client_secret <secret>
//				refresh_token <token>
//				scopes <scope>...
//			}
//			access_token <{file.*}|{env.*}>
//		}
//		capture <dir>
//		dkim {
//			domain <domain>
//			selector <selector>
//			key <pem file|{file.*}|{env.*}>
//			headers <field>...
//		}
//		from <address> [<display name>]
//		reply_to <address>
//		app_name <name>
//		locale <BCP 47 tag>
//		base_url <url>
//		link <flow> <url template with {token}>
//		key <id> <secret|sha256:<hex>> [{
//			allow <endpoint>...
//			rate <n>/<duration>|off
//		}]
//		templates <dir>
//		security_alerts {
//			<event> on|off
//		}
//		max_body_size <size>
//		delivery {
//			wait <duration>
//			retry_backoff <duration>
//			max_backoff <duration>
//			max_age <duration>
//			retention <duration>
//			replay_window <duration>
//			max_queued <n>
//			auth_reserve <n>
//			max_queued_per_key <n>
//			bulk_share <percent>
//			retry_uncertain on|off
//			idempotency_ttl <duration>
//			lease <duration>
//			drain_timeout <duration>
//		}
//		storage <module> [<args…>] { … }
//		webhook_secret <secret>
//		webhook_allow_hosts <host>...
//		allow_origin <origin>...
//		link_policy enforce|off
//		admin_scope site|storage
//		auth_failures <n>/<duration>|off
//		recipient_rate [<flow>] <n>/<duration>|off
//		log_recipients on|off
//		allow_local_recipients on|off
//		compat authmail-relay
//		codes [issue] {
//			secret <secret>
//			length <n>
//			alphabet <characters>
//		}
//	}
//
// Exactly one of smtp and capture is required, as are from and at least
// one key. Secrets (password, key secrets) accept {env.*} and {file.*}
// placeholders, which stay literal in the JSON config. A key secret
// written literally becomes sha256:<hex> in the JSON config.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	start := d.Token()
	if d.NextArg() {
		return d.ArgErr()
	}
	// every subdirective but these may appear once
	repeatable := map[string]bool{"smtp": true, "link": true, "key": true, "webhook_allow_hosts": true, "allow_origin": true, "recipient_rate": true}
	seen := map[string]bool{}
	oneArg := func() (string, error) {
		if !d.NextArg() {
			return "", d.ArgErr()
		}
		v := d.Val()
		if d.NextArg() {
			return "", d.ArgErr()
		}
		return v, nil
	}
	// secretArgErr reports a wrong argument count on a line that holds a
	// secret without quoting any token: Caddy's ArgErr names the last one
	// read ("after 'ZQsecond'"), a fragment of a secret that holds a
	// space. The directive, file and line say where.
	secretArgErr := func(what, usage string) error {
		return d.Errf("%s: wrong argument count; expected %s (quote a secret that holds spaces)", what, usage)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] && !repeatable[sub] {
			return d.Errf("%s already specified", sub)
		}
		seen[sub] = true
		switch sub {
		case "path_prefix":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if err := checkPathPrefix(v); err != nil {
				return d.WrapErr(err)
			}
			h.PathPrefix = v

		case "smtp":
			s, err := unmarshalSMTP(d)
			if err != nil {
				return err
			}
			// one smtp block stays the smtp object; several, in the order
			// written, become smtp_servers
			switch {
			case h.SMTP == nil && h.SMTPServers == nil:
				h.SMTP = s
			case h.SMTP != nil:
				h.SMTPServers = []SMTP{*h.SMTP, *s}
				h.SMTP = nil
			default:
				h.SMTPServers = append(h.SMTPServers, *s)
			}

		case "dkim":
			k, err := unmarshalDKIM(d)
			if err != nil {
				return err
			}
			h.DKIM = k

		case "capture":
			v, err := oneArg()
			if err != nil {
				return err
			}
			h.Capture = v

		case "from":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if err := checkConfigAddress("from", args[0]); err != nil {
				return d.WrapErr(err)
			}
			h.From = args[0]
			h.FromName = strings.Join(args[1:], " ")
			if err := checkConfigText("from display name", h.FromName); err != nil {
				return d.WrapErr(err)
			}

		case "reply_to":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if err := checkConfigAddress("reply_to", v); err != nil {
				return d.WrapErr(err)
			}
			h.ReplyTo = v

		case "app_name":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.AppName = strings.Join(args, " ")
			if err := checkConfigText("app_name", h.AppName); err != nil {
				return d.WrapErr(err)
			}

		case "locale":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if err := checkConfigLocale(v); err != nil {
				return d.WrapErr(err)
			}
			h.Locale = v

		case "base_url":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if err := checkBaseURL(v); err != nil {
				return d.WrapErr(err)
			}
			h.BaseURL = v

		case "link":
			var flow, tpl string
			if !d.Args(&flow, &tpl) || d.NextArg() {
				return d.ArgErr()
			}
			if _, dup := h.Links[flow]; dup {
				return d.Errf("link for %s already specified", flow)
			}
			if err := checkLinkTemplate(flow, tpl); err != nil {
				return d.WrapErr(err)
			}
			if h.Links == nil {
				h.Links = map[string]string{}
			}
			h.Links[flow] = tpl

		case "key":
			var id, secret string
			if !d.Args(&id, &secret) || d.NextArg() {
				return secretArgErr("key", "key <id> <secret> [{ … }]")
			}
			if err := checkKey(id, secret); err != nil {
				return d.WrapErr(err)
			}
			for _, k := range h.Keys {
				if k.ID == id {
					return d.Errf("key '%s' already specified", id)
				}
			}
			k := Key{ID: id, Secret: literalKeyHash(secret)}
			kseen := map[string]bool{}
			for n := d.Nesting(); d.NextBlock(n); {
				opt := d.Val()
				if kseen[opt] {
					return d.Errf("key %s: %s already specified", id, opt)
				}
				kseen[opt] = true
				switch opt {
				case "allow":
					k.Allow = d.RemainingArgs()
					if len(k.Allow) == 0 {
						return d.ArgErr()
					}
					if err := commaList("allow", k.Allow); err != nil {
						return d.Errf("key %s: %v", id, err)
					}
					for _, p := range k.Allow {
						if err := checkPermission(p); err != nil {
							return d.Errf("key %s: %v", id, err)
						}
					}
				case "rate":
					v, err := oneArg()
					if err != nil {
						return err
					}
					if _, err := ratelimit.ParseSpec(v); err != nil {
						return d.Errf("key %s: %v", id, err)
					}
					k.Rate = v
				default:
					return d.Errf("unrecognized key subdirective '%s'", opt)
				}
			}
			h.Keys = append(h.Keys, k)

		case "templates":
			v, err := oneArg()
			if err != nil {
				return err
			}
			h.Templates = v

		case "security_alerts":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.SecurityAlerts = map[string]bool{}
			for n := d.Nesting(); d.NextBlock(n); {
				ev := d.Val()
				if err := checkSecurityEvent(ev); err != nil {
					return d.WrapErr(err)
				}
				if _, dup := h.SecurityAlerts[ev]; dup {
					return d.Errf("security alert %s already specified", ev)
				}
				v, err := oneArg()
				if err != nil {
					return err
				}
				if d.NextBlock(d.Nesting()) {
					return d.Errf("security alert %s takes no block", ev)
				}
				switch v {
				case "on":
					h.SecurityAlerts[ev] = true
				case "off":
					h.SecurityAlerts[ev] = false
				default:
					return d.Errf("security alert %s must be on or off, not '%s'", ev, v)
				}
			}

		case "max_body_size":
			v, err := oneArg()
			if err != nil {
				return err
			}
			size, perr := humanize.ParseBytes(v)
			if perr != nil || size == 0 || size > 1<<40 {
				return d.Errf("invalid max_body_size '%s'", v)
			}
			h.MaxBodySize = int64(size)

		case "delivery":
			dl, err := unmarshalDelivery(d)
			if err != nil {
				return err
			}
			h.Delivery = dl

		case "storage":
			if !d.NextArg() {
				return d.ArgErr()
			}
			name := d.Val()
			unm, err := caddyfile.UnmarshalModule(d, "caddy.storage."+name)
			if err != nil {
				return err
			}
			sc, ok := unm.(caddy.StorageConverter)
			if !ok {
				return d.Errf("module %s is not a storage module", name)
			}
			h.StorageRaw = caddyconfig.JSONModuleObject(sc, "module", name, nil)

		case "webhook_secret":
			if !d.NextArg() {
				return secretArgErr("webhook_secret", "webhook_secret <secret>")
			}
			v := d.Val()
			if d.NextArg() {
				return secretArgErr("webhook_secret", "webhook_secret <secret>")
			}
			h.WebhookSecret = v

		case "webhook_allow_hosts":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if err := commaList("webhook_allow_hosts", args); err != nil {
				return d.WrapErr(err)
			}
			h.WebhookAllowHosts = append(h.WebhookAllowHosts, args...)

		case "allow_origin":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if err := commaList("allow_origin", args); err != nil {
				return d.WrapErr(err)
			}
			for _, o := range args {
				if err := checkOrigin(o); err != nil {
					return d.WrapErr(err)
				}
			}
			h.AllowOrigins = append(h.AllowOrigins, args...)

		case "link_policy":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if v != "enforce" && v != "off" {
				return d.Errf("link_policy must be enforce or off, not '%s'", v)
			}
			h.LinkPolicy = v

		case "admin_scope":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if v != adminScopeSite && v != adminScopeStorage {
				return d.Errf("admin_scope must be %s or %s, not '%s'", adminScopeSite, adminScopeStorage, v)
			}
			h.AdminScope = v

		case "auth_failures":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if _, err := ratelimit.ParseSpec(v); err != nil {
				return d.Errf("auth_failures: %v", err)
			}
			h.AuthFailures = v

		case "recipient_rate":
			args := d.RemainingArgs()
			flow := "default"
			switch len(args) {
			case 1:
			case 2:
				flow = args[0]
				if flow != "default" && !slices.Contains(recipientRateFlows, flow) {
					return d.Errf("recipient_rate: unknown flow '%s' (expected one of %s)", flow, strings.Join(recipientRateFlows, ", "))
				}
			default:
				return d.ArgErr()
			}
			v := args[len(args)-1]
			if _, err := ratelimit.ParseSpec(v); err != nil {
				return d.Errf("recipient_rate: %v", err)
			}
			if _, dup := h.RecipientRate[flow]; dup {
				return d.Errf("recipient_rate for %s already specified", flow)
			}
			if h.RecipientRate == nil {
				h.RecipientRate = map[string]string{}
			}
			h.RecipientRate[flow] = v

		case "compat":
			v, err := oneArg()
			if err != nil {
				return err
			}
			if v != compatRelay {
				return d.Errf("compat must be %s, not '%s'", compatRelay, v)
			}
			h.Compat = v

		case "codes":
			c, err := unmarshalCodes(d)
			if err != nil {
				return err
			}
			h.Codes = c

		case "log_recipients":
			v, err := oneArg()
			if err != nil {
				return err
			}
			switch v {
			case "on":
				h.LogRecipients = true
			case "off":
				h.LogRecipients = false
			default:
				return d.Errf("log_recipients must be on or off, not '%s'", v)
			}

		case "allow_local_recipients":
			v, err := oneArg()
			if err != nil {
				return err
			}
			switch v {
			case "on":
				h.AllowLocalRecipients = true
			case "off":
				h.AllowLocalRecipients = false
			default:
				return d.Errf("allow_local_recipients must be on or off, not '%s'", v)
			}

		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	// Cross-field requirements are reported at the directive's line.
	if err := h.checkConfig(); err != nil {
		return fmt.Errorf("authmail: %w, at %s:%d", err, start.File, start.Line)
	}
	return nil
}

// unmarshalSMTP parses `smtp <host>[:<port>] { … }`.
func unmarshalSMTP(d *caddyfile.Dispenser) (*SMTP, error) {
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	s := &SMTP{}
	addr := d.Val()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		// no port given
		host = strings.Trim(addr, "[]")
	} else {
		p, perr := strconv.Atoi(port)
		if perr != nil || p < 1 || p > 65535 {
			return nil, d.Errf("invalid smtp port in '%s'", addr)
		}
		s.Port = p
	}
	if host == "" {
		return nil, d.Errf("invalid smtp address '%s'", addr)
	}
	s.Host = host
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	blocks := map[string]func() error{
		"oauth2": func() (err error) { s.OAuth2, err = unmarshalOAuth2(d); return err },
		"rate":   func() error { return unmarshalSMTPRate(d, s) },
	}
	err = eachOptionOrBlock(d, "smtp", blocks, func(sub, v string) error {
		switch sub {
		case "auth":
			s.Auth = v
		case "access_token":
			s.AccessToken = v
		case "username":
			s.Username = v
		case "password":
			s.Password = v
		case "tls":
			switch v {
			case mailer.TLSStartTLS, mailer.TLSImplicit, mailer.TLSNone:
				s.TLS = v
			default:
				return d.Errf("smtp tls must be starttls, implicit or none, not '%s'", v)
			}
		case "ca":
			s.CA = v
		case "helo":
			s.HELO = v
		case "timeout":
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("invalid smtp timeout '%s'", v)
			}
			s.Timeout = caddy.Duration(dur)
		case "connections":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 100 {
				return d.Errf("smtp connections must be a number from 1 to 100, not '%s'", v)
			}
			s.Connections = n
		default:
			return d.Errf("unrecognized smtp subdirective '%s'", sub)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.check(); err != nil {
		return nil, d.WrapErr(err)
	}
	return s, nil
}

// eachOption walks the options of a block where each option appears at
// most once and takes exactly one value, and calls set for each. A wrong
// argument count names the option, never a value: smtp's password and
// username are options here, and Caddy's ArgErr would quote the last
// token read, a fragment of a password that holds a space.
func eachOption(d *caddyfile.Dispenser, block string, set func(sub, v string) error) error {
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s %s already specified", block, sub)
		}
		seen[sub] = true
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

// unmarshalDelivery parses `delivery { … }`.
func unmarshalDelivery(d *caddyfile.Dispenser) (*Delivery, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	dl := &Delivery{}
	err := eachOption(d, "delivery", func(sub, v string) error {
		dur := func(allowZero bool) (caddy.Duration, error) {
			t, err := caddy.ParseDuration(v)
			if err != nil || t < 0 || (t == 0 && !allowZero) {
				return 0, d.Errf("invalid delivery %s duration '%s'", sub, v)
			}
			return caddy.Duration(t), nil
		}
		var err error
		switch sub {
		case "wait":
			dl.Wait, err = dur(true)
			if err == nil && dl.Wait == 0 {
				dl.Wait = -1 // explicit zero: answer at once
			}
		case "retry_backoff":
			dl.RetryBackoff, err = dur(false)
		case "max_backoff":
			dl.MaxBackoff, err = dur(false)
		case "max_age":
			dl.MaxAge, err = dur(false)
		case "retention":
			dl.Retention, err = dur(false)
		case "replay_window":
			dl.ReplayWindow, err = dur(true)
		case "idempotency_ttl":
			dl.IdempotencyTTL, err = dur(false)
		case "lease":
			dl.Lease, err = dur(false)
		case "drain_timeout":
			dl.DrainTimeout, err = dur(false)
		case "max_queued":
			n, perr := strconv.Atoi(v)
			if perr != nil || n < 1 {
				return d.Errf("delivery max_queued must be a positive number, not '%s'", v)
			}
			dl.MaxQueued = n
		case "auth_reserve", "max_queued_per_key":
			n, perr := strconv.Atoi(v)
			if perr != nil || n < 1 {
				return d.Errf("delivery %s must be a positive number, not '%s'", sub, v)
			}
			if sub == "auth_reserve" {
				dl.AuthReserve = n
			} else {
				dl.MaxQueuedPerKey = n
			}
		case "bulk_share":
			n, perr := strconv.Atoi(strings.TrimSuffix(v, "%"))
			if perr != nil || n < 1 || n > 50 {
				return d.Errf("delivery bulk_share must be a percentage from 1%% to 50%%, not '%s'", v)
			}
			dl.BulkShare = n
		case "retry_uncertain":
			switch v {
			case "on":
				dl.RetryUncertain = true
			case "off":
				dl.RetryUncertain = false
			default:
				return d.Errf("delivery retry_uncertain must be on or off, not '%s'", v)
			}
		default:
			return d.Errf("unrecognized delivery subdirective '%s'", sub)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return dl, nil
}

// commaList refuses a list setting given as one comma-joined value
// ("webhook_allow_hosts 127.0.0.1,localhost", as authmail-relay's
// WEBHOOK_ALLOW_HOSTS was written), which would otherwise be taken as one
// bogus entry and silently match nothing; the error shows the syntax that
// works.
func commaList(directive string, args []string) error {
	for _, a := range args {
		if strings.Contains(a, ",") {
			parts := strings.FieldsFunc(a, func(r rune) bool { return r == ',' || r == ' ' })
			return fmt.Errorf("%s '%s': give one value per argument, separated by spaces, not commas: %s %s", directive, a, directive, strings.Join(parts, " "))
		}
	}
	return nil
}

// literalKeyHash turns a key secret written literally in the Caddyfile
// (or substituted from {$VAR} while adapting) into sha256:<hex>, so the
// adapted JSON, the admin API's /config/ and autosave.json never hold
// the bearer secret itself; authentication compares SHA-256 hashes
// anyway. Placeholders and sha256: values are kept as written.
func literalKeyHash(secret string) string {
	if hasPlaceholder(secret) || strings.HasPrefix(secret, "sha256:") {
		return secret
	}
	sum := sha256.Sum256([]byte(secret))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// unmarshalSMTPRate parses `rate <n>/<window> [burst <n>]` in an smtp
// block.
func unmarshalSMTPRate(d *caddyfile.Dispenser, s *SMTP) error {
	args := d.RemainingArgs()
	if len(args) != 1 && len(args) != 3 {
		return d.Errf("smtp rate: expected <n>/<window> [burst <n>], e.g. rate 14/1s or rate 30/1m burst 5")
	}
	if args[0] == "off" {
		return d.Errf("smtp rate: off is the default; leave rate out")
	}
	if _, err := ratelimit.ParseSpec(args[0]); err != nil {
		return d.Errf("smtp %v", err)
	}
	s.Rate = args[0]
	if len(args) == 3 {
		n, err := strconv.Atoi(args[2])
		if args[1] != "burst" || err != nil || n < 1 || n > 1_000_000 {
			return d.Errf("smtp rate: expected burst <n> with n from 1 to 1000000 after the rate, not '%s %s'", args[1], args[2])
		}
		s.Burst = n
	}
	return nil
}
