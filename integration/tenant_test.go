package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// twoSites renders a Caddyfile with two authmail site blocks on Caddy's
// default storage (no storage directive, so one outbox), each with a key
// named "app" but its own secret: site A on localhost, site B on
// 127.0.0.1.
func twoSites(secretA, secretB, rate string) string {
	site := func(addr, env string) string {
		return fmt.Sprintf(`
http://%s:9080 {
	authmail {
		smtp 127.0.0.1:%d {
			username mailer
			password {env.AUTHMAIL_IT_SMTP_PASSWORD}
			ca %s
			helo it.example
			timeout 3s
			connections 2
		}
		from no-reply@example.com "Example App"
		base_url https://app.example.com
		key app {env.%s} {
			rate %s
		}
		auth_failures 1000/1m
		recipient_rate off
	}
}
`, addr, smtpSrv.Port, smtpSrv.CAFile, env, rate)
	}
	return fmt.Sprintf(`{
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1ns
	skip_install_trust
	log {
		output file %s
		format json
		level DEBUG
	}
}
`, logFile) + site("localhost", secretA) + site("127.0.0.1", secretB)
}

// callSite is call for a site given by its origin.
func callSite(t *testing.T, origin, key, method, path, body string, headers ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, origin+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := response{status: res.StatusCode, header: res.Header, raw: string(raw)}
	if strings.HasPrefix(res.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(raw, &r.json); err != nil {
			t.Fatalf("%s %s: invalid JSON response %q: %v", method, path, raw, err)
		}
	}
	return r
}

// TestKeysOfTheSameIDOnTwoSitesAreSeparateTenants: two site blocks share
// Caddy's default storage, and so one outbox, each with a key "app" of its
// own secret. Neither may read the other's messages, replay or block the
// other's Idempotency-Keys, or spend the other's rate limit; the key id
// they share is not an identity. After a reload, each still reads its own
// messages.
func TestKeysOfTheSameIDOnTwoSitesAreSeparateTenants(t *testing.T) {
	siteA, siteB := baseURL, fmt.Sprintf("http://127.0.0.1:%d", httpPort)
	loadRaw(t, twoSites("AUTHMAIL_IT_KEY", "AUTHMAIL_IT_KEY2", "off"))

	// 1. status: B's key gets exactly the answer of an id that does not exist
	var idA string
	wantNotFound := `{"error_code":"not_found","message":"no message with this id for this key"}` + "\n"
	t.Run("status", func(t *testing.T) {
		a := callSite(t, siteA, keyApp, "POST", "/authmail/send/otp", `{"to":"tenant-a@example.org","code":"424242"}`)
		if a.status != 200 || a.str("status") != "sent" {
			t.Fatalf("A's send: %d %s", a.status, a.raw)
		}
		idA = a.str("id")
		if r := callSite(t, siteA, keyApp, "GET", "/authmail/messages/"+idA, ""); r.status != 200 || r.str("id") != idA || r.str("status") != "sent" {
			t.Fatalf("A reads its own message: %d %s", r.status, r.raw)
		}
		unknown := callSite(t, siteB, keyOther, "GET", "/authmail/messages/"+idA[:len(idA)-1]+"z", "")
		if unknown.status != 404 || unknown.raw != wantNotFound {
			t.Fatalf("unknown id: %d %q", unknown.status, unknown.raw)
		}
		if r := callSite(t, siteB, keyOther, "GET", "/authmail/messages/"+idA, ""); r.status != 404 || r.raw != wantNotFound {
			t.Fatalf("B reads A's message: %d %s, want 404 %s", r.status, r.raw, wantNotFound)
		}

	})

	// 2. idempotency: the same Idempotency-Key and body from B is B's own
	// request, sent as B's message
	t.Run("idempotency", func(t *testing.T) {
		smtpSrv.ClearMessages()
		body := `{"to":"tenant-idem@example.org","code":"515151"}`
		a := callSite(t, siteA, keyApp, "POST", "/authmail/send/otp", body, "Idempotency-Key: signup-42")
		if a.status != 200 || a.header.Get("Idempotent-Replayed") != "" {
			t.Fatalf("A's idempotent send: %d %v %s", a.status, a.header, a.raw)
		}
		b := callSite(t, siteB, keyOther, "POST", "/authmail/send/otp", body, "Idempotency-Key: signup-42")
		if b.status != 200 || b.str("status") != "sent" || b.header.Get("Idempotent-Replayed") != "" || b.str("id") == a.str("id") {
			t.Fatalf("B's request with A's Idempotency-Key: %d replayed=%q %s (A's id %s)", b.status, b.header.Get("Idempotent-Replayed"), b.raw, a.str("id"))
		}
		if n := len(smtpSrv.Messages()); n != 2 {
			t.Fatalf("the SMTP server got %d messages, want 2 (A's and B's)", n)
		}
		// B's replay is B's own answer
		if r := callSite(t, siteB, keyOther, "POST", "/authmail/send/otp", body, "Idempotency-Key: signup-42"); r.status != 200 || r.header.Get("Idempotent-Replayed") != "true" || r.str("id") != b.str("id") {
			t.Fatalf("B's replay: %d %s", r.status, r.raw)
		}
		// a key B used first with another body does not make A's request a conflict
		if r := callSite(t, siteB, keyOther, "POST", "/authmail/send/otp", `{"to":"tenant-b@example.org","code":"1"}`, "Idempotency-Key: signup-43"); r.status != 200 {
			t.Fatalf("B's send: %d %s", r.status, r.raw)
		}
		if r := callSite(t, siteA, keyApp, "POST", "/authmail/send/otp", body, "Idempotency-Key: signup-43"); r.status != 200 || r.header.Get("Idempotent-Replayed") != "" {
			t.Fatalf("A's request with a key B used: %d %s, want 200 and a new message", r.status, r.raw)
		}
		if n := len(smtpSrv.Messages()); n != 4 {
			t.Fatalf("the SMTP server got %d messages, want 4", n)
		}

	})

	// 3. rate limit: B spending its 3/1m leaves A's allowance whole; new
	// secrets, so that the windows start empty
	t.Run("rate", func(t *testing.T) {
		keyA, keyB := secret("it-tenant-a-key-0123456789"), secret("it-tenant-b-key-0123456789")
		t.Setenv("AUTHMAIL_IT_TENANT_A", keyA)
		t.Setenv("AUTHMAIL_IT_TENANT_B", keyB)
		loadRaw(t, twoSites("AUTHMAIL_IT_TENANT_A", "AUTHMAIL_IT_TENANT_B", "3/1m"))
		for i := range 3 {
			if r := callSite(t, siteB, keyB, "POST", "/authmail/send/otp", `{"to":"tenant-b@example.org","code":"1"}`, "Prefer: respond-async"); r.status != 202 {
				t.Fatalf("B's request %d: %d %s", i+1, r.status, r.raw)
			}
		}
		r := callSite(t, siteB, keyB, "POST", "/authmail/send/otp", `{"to":"tenant-b@example.org","code":"1"}`, "Prefer: respond-async")
		if r.status != 429 || r.str("error_code") != "rate_limited" {
			t.Fatalf("B's 4th request: %d %s, want 429 rate_limited", r.status, r.raw)
		}
		if r := callSite(t, siteA, keyA, "POST", "/authmail/send/otp", `{"to":"tenant-a@example.org","code":"1"}`, "Prefer: respond-async"); r.status != 202 {
			t.Fatalf("A's request after B used up its limit: %d %s, want 202", r.status, r.raw)
		}

	})

	// 4. across the reload, the first key still reads its message (the
	// tenant comes from the secret, not from the running config)
	loadRaw(t, twoSites("AUTHMAIL_IT_KEY", "AUTHMAIL_IT_KEY2", "off"))
	if idA == "" {
		t.FailNow()
	}
	if r := callSite(t, siteA, keyApp, "GET", "/authmail/messages/"+idA, ""); r.status != 200 || r.str("id") != idA {
		t.Fatalf("A's message after reloads: %d %s", r.status, r.raw)
	}
	if r := callSite(t, siteB, keyOther, "GET", "/authmail/messages/"+idA, ""); r.status != 404 || r.raw != wantNotFound {
		t.Fatalf("B reads A's message after reloads: %d %s", r.status, r.raw)
	}
}
