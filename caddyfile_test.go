package authmail

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	"github.com/caddyserver/certmagic"
)

// hashedUnitKey is how the adapter writes the literal key of the test
// configs: sha256:<hex>, never the secret itself.
const hashedUnitKey = "sha256:1bd8fd47297046f993e608e398d5905b00a33e163c6b1172dd38887fed05ed6a"

const minimalBlock = `
	from no-reply@example.com
	key app 0123456789abcdef0123
	capture /tmp/mail`

func TestUnmarshalCaddyfile(t *testing.T) {
	cases := []struct {
		name  string
		input string
		want  Handler
	}{
		{
			name:  "minimal capture",
			input: "authmail {" + minimalBlock + "\n}",
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail",
				Keys: []Key{{ID: "app", Secret: hashedUnitKey}}},
		},
		{
			name: "everything",
			input: `authmail {
				path_prefix /api/mail
				smtp smtp.example.com:465 {
					username {env.SMTP_USER}
					password {env.SMTP_PASSWORD}
					tls implicit
					ca /etc/ssl/extra.pem
					helo mail.example.com
					timeout 30s
					connections 8
					rate 14/1s burst 3
				}
				from no-reply@example.com "Example App"
				reply_to support@example.com
				app_name Example
				base_url https://app.example.com
				link password-reset https://app.example.com/reset?t={token}
				link magic-link https://app.example.com/m/{token}
				key web {env.WEB_KEY}
				key batch {file./run/secrets/batch}
				templates /etc/authmail/templates
				security_alerts {
					new_login on
					account_locked off
				}
				max_body_size 512KiB
			}`,
			want: Handler{
				PathPrefix: "/api/mail",
				SMTP: &SMTP{Host: "smtp.example.com", Port: 465, Username: "{env.SMTP_USER}", Password: "{env.SMTP_PASSWORD}",
					TLS: "implicit", CA: "/etc/ssl/extra.pem", HELO: "mail.example.com",
					Timeout: caddy.Duration(30 * time.Second), Connections: 8, Rate: "14/1s", Burst: 3},
				From: "no-reply@example.com", FromName: "Example App", ReplyTo: "support@example.com",
				AppName: "Example", BaseURL: "https://app.example.com",
				Links:     map[string]string{"password-reset": "https://app.example.com/reset?t={token}", "magic-link": "https://app.example.com/m/{token}"},
				Keys:      []Key{{ID: "web", Secret: "{env.WEB_KEY}"}, {ID: "batch", Secret: "{file./run/secrets/batch}"}},
				Templates: "/etc/authmail/templates", SecurityAlerts: map[string]bool{"new_login": true, "account_locked": false},
				MaxBodySize: 512 * 1024,
			},
		},
		{
			name: "delivery, storage and webhooks",
			input: `authmail {` + minimalBlock + `
				delivery {
					wait 5s
					retry_backoff 1m
					max_backoff 1h
					max_age 48h
					retention 30d
					replay_window 15m
					max_queued 5000
					auth_reserve 800
					max_queued_per_key 1000
					bulk_share 20%
					retry_uncertain on
					idempotency_ttl 12h
					lease 45s
					drain_timeout 20s
				}
				storage file_system /var/lib/authmail
				webhook_secret {env.HOOK_SECRET}
				webhook_allow_hosts hooks.internal 10.0.0.5
				webhook_allow_hosts other.internal
			}`,
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail", Keys: []Key{{ID: "app", Secret: hashedUnitKey}},
				Delivery: &Delivery{Wait: caddy.Duration(5 * time.Second), RetryBackoff: caddy.Duration(time.Minute), MaxBackoff: caddy.Duration(time.Hour),
					MaxAge: caddy.Duration(48 * time.Hour), Retention: caddy.Duration(30 * 24 * time.Hour), ReplayWindow: caddy.Duration(15 * time.Minute), MaxQueued: 5000, AuthReserve: 800, MaxQueuedPerKey: 1000, BulkShare: 20, RetryUncertain: true,
					IdempotencyTTL: caddy.Duration(12 * time.Hour), Lease: caddy.Duration(45 * time.Second), DrainTimeout: caddy.Duration(20 * time.Second)},
				StorageRaw:        json.RawMessage(`{"module":"file_system","root":"/var/lib/authmail"}`),
				WebhookSecret:     "{env.HOOK_SECRET}",
				WebhookAllowHosts: []string{"hooks.internal", "10.0.0.5", "other.internal"},
			},
		},
		{
			name: "scoped keys, limits, origins, privacy",
			input: `authmail {
				from no-reply@example.com
				capture /tmp/mail
				key web {env.WEB_KEY} {
					allow otp magic-link password-reset
					rate 100/1m
				}
				key ops sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8 {
					allow status test admin preview
				}
				key batch {env.BATCH_KEY}
				base_url https://app.example.com
				allow_origin https://accounts.example.com http://localhost:3000
				link_policy enforce
				auth_failures 5/1m
				recipient_rate 3/10m
				recipient_rate otp 10/15m
				log_recipients on
			}`,
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail", BaseURL: "https://app.example.com",
				Keys: []Key{
					{ID: "web", Secret: "{env.WEB_KEY}", Allow: []string{"otp", "magic-link", "password-reset"}, Rate: "100/1m"},
					{ID: "ops", Secret: "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8", Allow: []string{"status", "test", "admin", "preview"}},
					{ID: "batch", Secret: "{env.BATCH_KEY}"},
				},
				AllowOrigins: []string{"https://accounts.example.com", "http://localhost:3000"}, LinkPolicy: "enforce",
				AuthFailures: "5/1m", RecipientRate: map[string]string{"default": "3/10m", "otp": "10/15m"}, LogRecipients: true,
			},
		},
		{
			name:  "recipient_rate default, named as in JSON",
			input: "authmail {" + minimalBlock + "\n recipient_rate default 2/1m\n recipient_rate security-alert off\n}",
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail", Keys: []Key{{ID: "app", Secret: hashedUnitKey}},
				RecipientRate: map[string]string{"default": "2/1m", "security-alert": "off"}},
		},
		{
			name:  "allow_local_recipients",
			input: "authmail {" + minimalBlock + "\n allow_local_recipients on\n}",
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail", Keys: []Key{{ID: "app", Secret: hashedUnitKey}},
				AllowLocalRecipients: true},
		},
		{
			name:  "wait 0 answers at once",
			input: "authmail {" + minimalBlock + "\n delivery {\n wait 0\n }\n}",
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail", Keys: []Key{{ID: "app", Secret: hashedUnitKey}},
				Delivery: &Delivery{Wait: -1}},
		},
		{
			name:  "smtp without port or block",
			input: "authmail {\n from a@example.com\n key k 0123456789abcdef0123\n smtp localhost\n}",
			want:  Handler{From: "a@example.com", Keys: []Key{{ID: "k", Secret: hashedUnitKey}}, SMTP: &SMTP{Host: "localhost"}},
		},
		{
			name:  "ipv6 smtp host",
			input: "authmail {\n from a@example.com\n key k 0123456789abcdef0123\n smtp [::1]:2525 {\n tls none\n }\n}",
			want:  Handler{From: "a@example.com", Keys: []Key{{ID: "k", Secret: hashedUnitKey}}, SMTP: &SMTP{Host: "::1", Port: 2525, TLS: "none"}},
		},
		{
			name:  "root prefix and multi-word names",
			input: "authmail {" + minimalBlock + "\n path_prefix /\n app_name Acme Cloud Console\n}",
			want: Handler{From: "no-reply@example.com", Capture: "/tmp/mail", PathPrefix: "/", AppName: "Acme Cloud Console",
				Keys: []Key{{ID: "app", Secret: hashedUnitKey}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(h, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", h, tc.want)
			}
		})
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	cases := map[string]struct{ input, want string }{
		"argument on directive":           {"authmail foo {" + minimalBlock + "\n}", "wrong argument count"},
		"unknown subdirective":            {"authmail {" + minimalBlock + "\n frobnicate yes\n}", "unrecognized subdirective 'frobnicate'"},
		"duplicate path_prefix":           {"authmail {" + minimalBlock + "\n path_prefix /a\n path_prefix /b\n}", "path_prefix already specified"},
		"relative path_prefix":            {"authmail {" + minimalBlock + "\n path_prefix mail\n}", "must start with '/'"},
		"duplicate from":                  {"authmail {" + minimalBlock + "\n from other@example.com\n}", "from already specified"},
		"from missing":                    {"authmail {\n key app 0123456789abcdef0123\n capture /tmp/x\n}", "from is required"},
		"from not an address":             {"authmail {\n from nope\n key app 0123456789abcdef0123\n capture /tmp/x\n}", "is not a valid email address"},
		"from with angle name":            {"authmail {\n from \"A <a@example.com>\"\n key app 0123456789abcdef0123\n capture /tmp/x\n}", "bare address"},
		"no key":                          {"authmail {\n from a@example.com\n capture /tmp/x\n}", "at least one key is required"},
		"duplicate key":                   {"authmail {" + minimalBlock + "\n key app 0123456789abcdef9999\n}", "key 'app' already specified"},
		"short key":                       {"authmail {\n from a@example.com\n capture /tmp/x\n key app short\n}", "shorter than 16"},
		"bad key id":                      {"authmail {\n from a@example.com\n capture /tmp/x\n key \"my key\" 0123456789abcdef0123\n}", "invalid key id"},
		"key missing secret":              {"authmail {\n from a@example.com\n capture /tmp/x\n key app\n}", "wrong argument count"},
		"neither smtp nor capture":        {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n}", "configure smtp or capture"},
		"both smtp and capture":           {"authmail {" + minimalBlock + "\n smtp localhost\n}", "mutually exclusive"},
		"bad smtp port":                   {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h:99999\n}", "invalid smtp port"},
		"bad tls":                         {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n tls maybe\n }\n}", "must be starttls, implicit or none"},
		"plaintext credentials":           {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp mail.example.com {\n tls none\n username u\n password p\n }\n}", "refusing to send credentials without TLS"},
		"password without user":           {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n password p\n }\n}", "password is set but username is not"},
		"bad timeout":                     {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n timeout soon\n }\n}", "invalid smtp timeout"},
		"bad connections":                 {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n connections 0\n }\n}", "connections must be a number from 1 to 100"},
		"bad smtp rate":                   {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n rate 14\n }\n}", "rate '14' must look like <n>/<duration>"},
		"smtp rate off":                   {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n rate off\n }\n}", "off is the default"},
		"smtp rate window":                {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n rate 14/1ms\n }\n}", "the window must be a duration from 1s to 7d"},
		"smtp burst missing":              {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n rate 14/1s burst\n }\n}", "expected <n>/<window> [burst <n>]"},
		"smtp burst misspelt":             {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n rate 14/1s bust 3\n }\n}", "expected burst <n>"},
		"smtp burst zero":                 {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n rate 14/1s burst 0\n }\n}", "expected burst <n>"},
		"unknown smtp option":             {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n port 25\n }\n}", "unrecognized smtp subdirective 'port'"},
		"duplicate smtp option":           {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp h {\n helo a\n helo b\n }\n}", "smtp helo already specified"},
		"bad base_url":                    {"authmail {" + minimalBlock + "\n base_url ftp://x.example.com\n}", "must be an http or https URL"},
		"base_url with query":             {"authmail {" + minimalBlock + "\n base_url https://x.example.com/?a=1\n}", "must not have a query"},
		"link unknown flow":               {"authmail {" + minimalBlock + "\n link otp https://x.example.com/{token}\n}", "unknown flow 'otp'"},
		"link without token":              {"authmail {" + minimalBlock + "\n link magic-link https://x.example.com/\n}", "must contain {token}"},
		"link not a url":                  {"authmail {" + minimalBlock + "\n link magic-link /relative/{token}\n}", "absolute http or https URL"},
		"duplicate recipient_rate":        {"authmail {" + minimalBlock + "\n recipient_rate 2/1m\n recipient_rate default 3/1m\n}", "recipient_rate for default already specified"},
		"duplicate link":                  {"authmail {" + minimalBlock + "\n link magic-link https://x.example.com/{token}\n link magic-link https://y.example.com/{token}\n}", "link for magic-link already specified"},
		"unknown alert event":             {"authmail {" + minimalBlock + "\n security_alerts {\n coffee_spilled on\n }\n}", "unknown security alert event 'coffee_spilled'"},
		"bad alert value":                 {"authmail {" + minimalBlock + "\n security_alerts {\n new_login yes\n }\n}", "must be on or off"},
		"bad max_body_size":               {"authmail {" + minimalBlock + "\n max_body_size lots\n}", "invalid max_body_size"},
		"bad reply_to":                    {"authmail {" + minimalBlock + "\n reply_to a@b@c\n}", "reply_to"},
		"app_name missing":                {"authmail {" + minimalBlock + "\n app_name\n}", "wrong argument count"},
		"unencodable from name":           {"authmail {\n from a@example.com \"CORP\\\\Jürgen\"\n key app 0123456789abcdef0123\n capture /tmp/x\n}", "from display name has a backslash together with non-ASCII"},
		"max_backoff below default retry": {"authmail {" + minimalBlock + "\n delivery {\n max_backoff 1s\n }\n}", "max_backoff (1s) must not be shorter than retry_backoff (30s)"},
		"retry above default max":         {"authmail {" + minimalBlock + "\n delivery {\n retry_backoff 1h\n }\n}", "max_backoff (30m0s) must not be shorter than retry_backoff (1h0m0s)"},
		"bulk_share above half":           {"authmail {" + minimalBlock + "\n delivery {\n bulk_share 60%\n }\n}", "delivery bulk_share must be a percentage from 1% to 50%, not '60%'"},
		"bulk_share not a number":         {"authmail {" + minimalBlock + "\n delivery {\n bulk_share some\n }\n}", "delivery bulk_share must be a percentage from 1% to 50%, not 'some'"},
		"auth_reserve over max_queued":    {"authmail {" + minimalBlock + "\n delivery {\n max_queued 100\n auth_reserve 100\n }\n}", "delivery auth_reserve (100) must be less than max_queued (100)"},
		"max_queued_per_key zero":         {"authmail {" + minimalBlock + "\n delivery {\n max_queued_per_key 0\n }\n}", "delivery max_queued_per_key must be a positive number, not '0'"},
		"block after alert event":         {"authmail {" + minimalBlock + "\n security_alerts {\n new_login on {\n x\n }\n }\n}", "security alert new_login takes no block"},
		"bad allow_local_recipients":      {"authmail {" + minimalBlock + "\n allow_local_recipients yes\n}", "allow_local_recipients must be on or off, not 'yes'"},
		"comma-joined webhook hosts":      {"authmail {" + minimalBlock + "\n webhook_allow_hosts 127.0.0.1,localhost\n}", "webhook_allow_hosts '127.0.0.1,localhost': give one value per argument, separated by spaces, not commas: webhook_allow_hosts 127.0.0.1 localhost"},
		"comma-joined origins":            {"authmail {" + minimalBlock + "\n allow_origin https://a.example.com,https://b.example.com\n}", "allow_origin 'https://a.example.com,https://b.example.com': give one value per argument, separated by spaces, not commas: allow_origin https://a.example.com https://b.example.com"},
		"comma-joined allow":              {"authmail {" + minimalBlock + "\n key web 0123456789abcdef9999 {\n allow otp,magic-link\n }\n}", "key web: allow 'otp,magic-link': give one value per argument, separated by spaces, not commas: allow otp magic-link"},
		"bad compat":                      {"authmail {" + minimalBlock + "\n compat relay\n}", "compat must be authmail-relay, not 'relay'"},
		"placeholder in smtp host":        {"authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp {env.SMTP_HOST}\n}", "placeholders are not expanded here"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("expected an error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("error %q has no file:line", err)
			}
		})
	}
}

// TestCaddyfileHashesLiteralKeys: a key secret written literally, or
// substituted from {$VAR} while adapting, reaches the JSON config only as
// sha256:<hex>; placeholders stay as written; the hashed key still
// authenticates the original bearer secret.
func TestCaddyfileHashesLiteralKeys(t *testing.T) {
	const literal, fromEnv, braced, braced2 = "literal-key-0123456789", "env-substituted-key-0123456789", "braced{literal-key-0123", "S3cr3t{Pa55w0rd}tail"
	t.Setenv("AUTHMAIL_TEST_ADAPT_KEY", fromEnv)
	src := `:8080 {
	authmail {
		from no-reply@example.com
		capture /tmp/mail
		key lit ` + literal + `
		key sub {$AUTHMAIL_TEST_ADAPT_KEY}
		key ph {env.AUTHMAIL_UNIT_KEY}
		key pre sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
		key brace ` + braced + `
		key brace2 ` + braced2 + `
	}
}`
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{literal, fromEnv, braced, braced2} {
		if strings.Contains(string(adapted), secret) {
			t.Fatalf("the adapted JSON holds the key secret %q:\n%s", secret, adapted)
		}
	}
	sum := func(s string) string { b := sha256.Sum256([]byte(s)); return "sha256:" + hex.EncodeToString(b[:]) }
	for _, want := range []string{sum(literal), sum(fromEnv), sum(braced), sum(braced2), "{env.AUTHMAIL_UNIT_KEY}", "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"} {
		if !strings.Contains(string(adapted), `"secret":"`+want+`"`) {
			t.Fatalf("the adapted JSON lacks secret %q:\n%s", want, adapted)
		}
	}
	h := provisionedHandler(t, func(h *Handler) {
		h.Keys = []Key{{ID: "lit", Secret: sum(literal)}, {ID: "sub", Secret: sum(fromEnv)}}
	})
	for _, secret := range []string{literal, fromEnv} {
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Authorization: Bearer "+secret, "X-Dry-Run: true")
		if rec.Code != 200 || out["dry_run"] != true {
			t.Fatalf("%s: %d %v", secret, rec.Code, out)
		}
	}
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Authorization: Bearer "+sum(literal), "X-Dry-Run: true"); rec.Code != 401 {
		t.Fatalf("the hash itself authenticated: %d", rec.Code)
	}
}

// TestSecretsWithBraces: a secret is expanded only for its {env.*} and
// {file.*} placeholders; other braces are literal text, and an error
// about a placeholder never quotes the secret's literal part.
func TestSecretsWithBraces(t *testing.T) {
	const braced = "S3cr3t{Pa55w0rd}tail-0123"
	h := provisionedHandler(t, func(h *Handler) { h.Keys = []Key{{ID: "app", Secret: braced}} })
	if rec, _ := call(t, h, http.MethodPost, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`, "Authorization: Bearer "+braced); rec.Code != http.StatusOK {
		t.Fatalf("a literal secret with braces: %d %s", rec.Code, rec.Body)
	}
	for _, mod := range []func(*Handler){
		func(h *Handler) { h.Keys = []Key{{ID: "app", Secret: "lit{eral}-{env.AUTHMAIL_UNSET_FOR_TEST}"}} },
		func(h *Handler) { h.WebhookSecret = "lit{eral}-{env.AUTHMAIL_UNSET_FOR_TEST}" },
	} {
		h := &Handler{Capture: t.TempDir(), From: "no-reply@example.com", Keys: []Key{{ID: "app", Secret: "0123456789abcdef0123"}},
			storageOverride: &certmagic.FileStorage{Path: t.TempDir()}}
		mod(h)
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		err := h.Provision(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "{env.AUTHMAIL_UNSET_FOR_TEST}") || strings.Contains(err.Error(), "eral") {
			t.Errorf("provision error %v", err)
		}
		_ = h.Cleanup()
	}
}

// TestConfigErrorsHoldNoSecrets: a wrong argument count on a line that
// holds a secret (a password, key secret or webhook_secret with an
// unquoted space) named the last token read, a piece of the secret:
// "wrong argument count … after 'ZQsecond'". Errors from the real
// Caddyfile adapter name the directive and file:line, never a value; the
// JSON config checks never quote a secret either.
func TestConfigErrorsHoldNoSecrets(t *testing.T) {
	site := func(lines string) string {
		return ":8080 {\n\tauthmail {\n\t\tfrom no-reply@example.com\n" + lines + "\n\t}\n}\n"
	}
	smtp := func(opt string) string {
		return "\t\tkey app {env.K}\n\t\tsmtp mail.example.com {\n\t\t\tusername u\n\t\t\tpassword p\n" + opt + "\n\t\t}"
	}
	oauth := func(secrets string) string {
		return "\t\tkey app {env.K}\n\t\tsmtp mail.example.com {\n\t\t\tusername u\n\t\t\tauth xoauth2\n\t\t\toauth2 {\n\t\t\t\ttoken_url https://login.example.com/token\n\t\t\t\tclient_id c\n\t\t\t\t" + secrets + "\n\t\t\t}\n\t\t}"
	}
	for name, tc := range map[string]struct{ src, want string }{
		"password with a space": {site(strings.Replace(smtp(""), "password p", "password ZQfirst ZQsecond", 1)), "smtp password: wrong argument count, at Caddyfile:7"},
		"username with a space": {site(strings.Replace(smtp(""), "username u", "username ZQfirst ZQsecond", 1)), "smtp username: wrong argument count, at Caddyfile:6"},
		"key with a space":      {site("\t\tcapture /tmp/x\n\t\tkey app ZQfirst-0123456789 ZQsecond"), "key: wrong argument count, at Caddyfile:5"},
		"key without an id":     {site("\t\tcapture /tmp/x\n\t\tkey ZQlonesecret-0123456789"), "key: wrong argument count, at Caddyfile:5"},
		"secret as the id":      {site("\t\tcapture /tmp/x\n\t\tkey ZQ+secret/0123456789= app"), "invalid key id"},
		"key with a block arg":  {site("\t\tcapture /tmp/x\n\t\tkey app ZQfirst-0123456789 ZQsecond {\n\t\t\trate off\n\t\t}"), "key: wrong argument count, at Caddyfile:5"},
		"webhook_secret":        {site("\t\tcapture /tmp/x\n\t\tkey app {env.K}\n\t\twebhook_secret ZQfirst ZQsecond"), "webhook_secret: wrong argument count, at Caddyfile:6"},
		"oauth2 client_secret":  {site(oauth("client_secret ZQfirst ZQsecond\n\t\t\t\trefresh_token {env.RT}")), "smtp oauth2 client_secret: wrong argument count, at Caddyfile:11"},
		"oauth2 refresh_token":  {site(oauth("refresh_token ZQfirst ZQsecond")), "smtp oauth2 refresh_token: wrong argument count, at Caddyfile:11"},
		"access_token":          {site("\t\tkey app {env.K}\n\t\tsmtp mail.example.com {\n\t\t\tusername u\n\t\t\tauth xoauth2\n\t\t\taccess_token ZQfirst ZQsecond\n\t\t}"), "smtp access_token: wrong argument count, at Caddyfile:8"},
		"codes secret":          {site("\t\tcapture /tmp/x\n\t\tkey app {env.K}\n\t\tcodes {\n\t\t\tsecret ZQfirst ZQsecond\n\t\t}"), "codes secret: wrong argument count, at Caddyfile:7"},
		"dkim key":              {site("\t\tcapture /tmp/x\n\t\tkey app {env.K}\n\t\tdkim {\n\t\t\tdomain example.com\n\t\t\tselector s1\n\t\t\tkey ZQfirst ZQsecond\n\t\t}"), "dkim key: wrong argument count, at Caddyfile:9"},
		"dkim key as a heredoc": {site("\t\tcapture /tmp/x\n\t\tkey app {env.K}\n\t\tdkim {\n\t\t\tdomain example.com\n\t\t\tselector s1\n\t\t\tkey <<PEM\n-----BEGIN PRIVATE KEY-----\nZQsecondline0123456789\n-----END PRIVATE KEY-----\nPEM\n\t\t}"), "dkim: key holds the key's text"},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(tc.src), nil)
			if err == nil {
				t.Fatalf("adapted:\n%s", tc.src)
			}
			if strings.Contains(err.Error(), "ZQ") {
				t.Fatalf("the error quotes the secret: %v", err)
			}
			if head, _, _ := strings.Cut(tc.want, ", at "); !strings.Contains(err.Error(), head) {
				t.Fatalf("error %q lacks %q", err, head)
			}
			if _, place, ok := strings.Cut(tc.want, ", at "); ok && !strings.Contains(err.Error(), "at "+place) {
				t.Fatalf("error %q does not name %s", err, place)
			}
		})
	}
	// JSON configs: the checks at provision name fields, not values
	for name, mod := range map[string]func(*Handler){
		"secret as key id":     func(h *Handler) { h.Keys = []Key{{ID: "ZQ secret 0123456789", Secret: "0123456789abcdef0123"}} },
		"bad sha256 key":       func(h *Handler) { h.Keys = []Key{{ID: "app", Secret: "sha256:ZQnothex"}} },
		"short key":            func(h *Handler) { h.Keys = []Key{{ID: "app", Secret: "ZQshort"}} },
		"bad whsec_":           func(h *Handler) { h.WebhookSecret = "whsec_ZQ%%%" },
		"unset webhook_secret": func(h *Handler) { h.WebhookSecret = "ZQ{env.AUTHMAIL_UNSET_FOR_TEST}" },
		"short codes secret":   func(h *Handler) { h.Codes = &Codes{Secret: "ZQshort"} },
		"unset codes secret":   func(h *Handler) { h.Codes = &Codes{Secret: "ZQ-0123456789-{env.AUTHMAIL_UNSET_FOR_TEST}"} },
		"unset oauth2 client_secret": func(h *Handler) {
			h.Capture = ""
			h.SMTP = &SMTP{Host: "mail.example.com", Username: "u", Auth: "xoauth2", OAuth2: &OAuth2{TokenURL: "https://login.example.com/token",
				ClientID: "c", ClientSecret: "ZQ{env.AUTHMAIL_UNSET_FOR_TEST}", RefreshToken: "ZQrefresh-0123456789"}}
		},
		"unset oauth2 refresh_token": func(h *Handler) {
			h.Capture = ""
			h.SMTP = &SMTP{Host: "mail.example.com", Username: "u", Auth: "xoauth2", OAuth2: &OAuth2{TokenURL: "https://login.example.com/token",
				ClientID: "c", ClientSecret: "ZQclient-0123456789", RefreshToken: "ZQ{env.AUTHMAIL_UNSET_FOR_TEST}"}}
		},
		"literal access_token": func(h *Handler) {
			h.Capture = ""
			h.SMTP = &SMTP{Host: "mail.example.com", Username: "u", Auth: "xoauth2", AccessToken: "ZQaccess-token-0123456789"}
		},
		"inline dkim key": func(h *Handler) {
			h.DKIM = &DKIM{Domain: "example.com", Selector: "s1", Key: "-----BEGIN PRIVATE KEY-----\nZQsecondline0123456789\n-----END PRIVATE KEY-----\n"}
		},
		"base64 dkim key": func(h *Handler) {
			h.DKIM = &DKIM{Domain: "example.com", Selector: "s1", Key: "ZQMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"}
		},
		"unset password": func(h *Handler) {
			h.Capture = ""
			h.SMTP = &SMTP{Host: "mail.example.com", Username: "u", Password: "ZQ{env.AUTHMAIL_UNSET_FOR_TEST}"}
		},
	} {
		h := &Handler{Capture: t.TempDir(), From: "no-reply@example.com", Keys: []Key{{ID: "app", Secret: "0123456789abcdef0123"}},
			storageOverride: &certmagic.FileStorage{Path: t.TempDir()}}
		mod(h)
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		err := h.Provision(ctx)
		cancel()
		_ = h.Cleanup()
		if err == nil || strings.Contains(err.Error(), "ZQ") {
			t.Errorf("%s: provision error %v", name, err)
		}
	}
}
