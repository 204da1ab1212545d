package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestOAuth2SMTPThroughCaddy: a Caddyfile smtp block with auth xoauth2
// and an oauth2 block whose secrets come from {env.*}; authmail fetches a
// token from the local endpoint, authenticates with it, and neither
// /status nor the log shows the client secret, the refresh tokens or
// the access token.
func TestOAuth2SMTPThroughCaddy(t *testing.T) {
	clientSecret := secret("it-oauth-client-s3cret")
	refresh0 := secret("it-oauth-refresh-0-abcdef")
	t.Setenv("AUTHMAIL_IT_OAUTH_SECRET", clientSecret)
	t.Setenv("AUTHMAIL_IT_OAUTH_REFRESH", refresh0)
	var mu sync.Mutex
	valid, refresh, n := map[string]bool{}, refresh0, 0
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		mu.Lock()
		defer mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if r.Form.Get("client_id") != "it-client" || r.Form.Get("client_secret") != clientSecret || r.Form.Get("refresh_token") != refresh ||
			r.Form.Get("scope") != "https://outlook.office365.com/SMTP.Send offline_access" {
			w.WriteHeader(400)
			fmt.Fprint(w, `{"error":"invalid_grant"}`)
			return
		}
		n++
		at := secret(fmt.Sprintf("it-access-token-%d-xyz", n))
		valid[at] = true
		refresh = secret(fmt.Sprintf("it-oauth-refresh-%d-abcdef", n))
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": at, "token_type": "Bearer", "expires_in": 3600, "refresh_token": refresh})
	}))
	defer ts.Close()
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "mailer@example.com", Mechanisms: []string{"XOAUTH2"},
		CheckToken: func(u, tok string) bool { mu.Lock(); defer mu.Unlock(); return valid[tok] }})
	load(t, config{
		Keys: `key app {env.AUTHMAIL_IT_KEY} {
			allow otp status
			rate off
		}`,
		Delivery: fmt.Sprintf(`smtp 127.0.0.1:%d {
			username mailer@example.com
			auth xoauth2
			oauth2 {
				token_url %s/token
				client_id it-client
				client_secret {env.AUTHMAIL_IT_OAUTH_SECRET}
				refresh_token {env.AUTHMAIL_IT_OAUTH_REFRESH}
				scopes https://outlook.office365.com/SMTP.Send offline_access
			}
			ca %s
			helo it.example
			timeout 3s
		}`, srv.Port, ts.URL, srv.CAFile)})
	r := post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"492817"}`)
	if r.status != 200 || r.str("status") != "sent" {
		t.Fatalf("%d %s", r.status, r.raw)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || msgs[0].AuthMechanism != "XOAUTH2" || msgs[0].AuthUser != "mailer@example.com" {
		t.Fatalf("messages %d %+v", len(msgs), msgs)
	}
	st := call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keyApp)
	d, _ := st.json["delivery"].(map[string]any)
	if d["auth"] != "xoauth2" || d["token_source"] != "refresh_token" {
		t.Fatalf("/status delivery %v", d)
	}
	secretsMu.Lock()
	defer secretsMu.Unlock()
	for s := range secrets {
		if strings.Contains(st.raw, s) {
			t.Fatalf("/status shows a secret: %s", st.raw)
		}
	}
	// the adapted JSON keeps the placeholders
	res, err := http.Get(adminURL + "/config/")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	if !strings.Contains(string(raw), `"refresh_token":"{env.AUTHMAIL_IT_OAUTH_REFRESH}"`) {
		t.Fatalf("config JSON lacks the placeholder: %s", raw)
	}
	for s := range secrets {
		if strings.Contains(string(raw), s) {
			t.Fatalf("config JSON shows a secret")
		}
	}
}
