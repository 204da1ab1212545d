package authmail

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/redact/redacttest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestTokenEndpointEchoReachesNoApp: an OAuth2 token endpoint that
// answers 400 with the refresh request echoed in error_description —
// the form as it came (the secrets URL-encoded), JSON-escaped with \/
// and \u002b, and base64'd — and an error code that holds the client
// secret. The client secret and the Google-style refresh token (its
// slashes make %2F%2F) show in no encoding in what any app key reads —
// the send's answer, GET /messages/{id}, GET /messages —, in the
// webhook's body or in any log field, while last_error still says what
// went wrong.
func TestTokenEndpointEchoReachesNoApp(t *testing.T) {
	const (
		clientSecret = "ZQcsecretA1b2/C3d4+E5"
		refreshToken = "1//0gZQrefresh-Tok_en+42/xyz"
	)
	t.Setenv("AUTHMAIL_UNIT_OAUTH_SECRET", clientSecret)
	t.Setenv("AUTHMAIL_UNIT_OAUTH_REFRESH", refreshToken)
	t.Setenv("AUTHMAIL_UNIT_HOOK_SECRET", "hook-secret-0123456789")
	fastWebhooks(t)
	var requests atomic.Int32
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		form := string(body)
		js, _ := json.Marshal(map[string]string{"client_secret": clientSecret, "refresh_token": refreshToken})
		jsonEscaped := strings.NewReplacer("/", `\/`, "+", `\u002b`).Replace(string(js))
		requests.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(map[string]string{
			"error": "invalid_client:" + clientSecret,
			"error_description": "bad request " + form + " parsed " + jsonEscaped +
				" raw " + base64.StdEncoding.EncodeToString(body) + " " + base64.RawURLEncoding.EncodeToString([]byte("x"+form)),
			"error_uri": "https://login.example.com/err?client_secret=" + clientSecret,
		})
	}))
	t.Cleanup(tokens.Close)
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "mailer@example.com", Mechanisms: []string{"XOAUTH2"},
		CheckToken: func(string, string) bool { return false }})
	recv := newHookReceiver(t, func(int) int { return 204 })
	h := newInstance(t, "").handler(func(h *Handler) {
		h.Capture = ""
		h.SMTP = &SMTP{Host: "127.0.0.1", Port: srv.Port, Username: "mailer@example.com", Auth: "xoauth2", CA: srv.CAFile,
			Timeout: caddy.Duration(2 * time.Second), OAuth2: &OAuth2{TokenURL: tokens.URL + "/token", ClientID: "app-client",
				ClientSecret: "{env.AUTHMAIL_UNIT_OAUTH_SECRET}", RefreshToken: "{env.AUTHMAIL_UNIT_OAUTH_REFRESH}", Scopes: []string{"https://mail.google.com/"}}}
		// retried twice or so, then failed, so that the webhook goes
		h.Delivery = &Delivery{RetryBackoff: caddy.Duration(40 * time.Millisecond), MaxBackoff: caddy.Duration(80 * time.Millisecond),
			MaxAge: caddy.Duration(300 * time.Millisecond)}
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "{env.AUTHMAIL_UNIT_HOOK_SECRET}"
	})
	core, logs := observer.New(zap.DebugLevel)
	h.engine.SetLogger(zap.New(core))
	h.logger = zap.New(core)

	rec, out := call(t, h, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":"jane@example.org","code":"123456","webhook_url":%q}`, recv.srv.URL+"/hook"))
	id, _ := out["id"].(string)
	if id == "" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	seen := map[string]string{"the send's answer": rec.Body.String()}
	st := waitState(t, h, id, status(outbox.Failed))
	if st.LastCode != "smtp_auth_failed" || !strings.Contains(st.LastError, "400 Bad Request: unrecognized_error (bad request ") ||
		!strings.Contains(st.LastError, "client_secret=[redacted]") || strings.Contains(st.LastError, "invalid_client") {
		t.Errorf("last_error %q (%s): want the status, a generic code for the one that held the secret, and the description with the secrets redacted", st.LastError, st.LastCode)
	}
	if requests.Load() == 0 {
		t.Fatal("the token endpoint was not asked")
	}
	rec, _ = call(t, h, "GET", "/authmail/messages/"+id, "")
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "[redacted]") {
		t.Fatalf("GET /messages/%s: %d %s", id, rec.Code, rec.Body)
	}
	seen["GET /messages/{id}"] = rec.Body.String()
	rec, _ = call(t, h, "GET", "/authmail/messages", "")
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), id) {
		t.Fatalf("GET /messages: %d %s", rec.Code, rec.Body)
	}
	seen["GET /messages"] = rec.Body.String()
	calls := recv.wait(t, 1)
	if len(calls) == 0 {
		t.Fatal("no webhook")
	}
	seen["the webhook"] = string(calls[0].body)
	for i, e := range logs.All() {
		line, _ := json.Marshal(map[string]any{"msg": e.Message, "fields": e.ContextMap()})
		seen[fmt.Sprintf("log line %d", i)] = string(line)
	}
	for where, text := range seen {
		// JSON answers escape what they carry: look in the decoded text too
		var v any
		decoded := ""
		if json.Unmarshal([]byte(text), &v) == nil {
			b, _ := json.Marshal(v)
			decoded = strings.NewReplacer(`\u0026`, "&", `\u003c`, "<", `\u003e`, ">").Replace(string(b))
		}
		for _, s := range []string{text, decoded} {
			if l := redacttest.Leak(s, clientSecret, refreshToken); l != "" {
				t.Errorf("%s shows a secret as %q:\n%s", where, l, text)
			}
		}
	}
}
