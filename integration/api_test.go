package integration

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

func TestHealthRoutingAndMethods(t *testing.T) {
	load(t, config{})

	r := call(t, http.MethodGet, "/authmail/health", nil)
	if r.status != 200 || r.raw != "{\"status\":\"ok\"}\n" {
		t.Fatalf("health: %d %q", r.status, r.raw)
	}
	if r.header.Get("Cache-Control") != "no-store" || r.header.Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("headers %v", r.header)
	}
	if r := call(t, http.MethodHead, "/authmail/health", nil); r.status != 200 || r.raw != "" {
		t.Fatalf("HEAD health: %d %q", r.status, r.raw)
	}

	// requests outside the prefix reach the next handler
	for _, p := range []string{"/", "/other", "/authmailx", "/authmail-send", "/app/authmail/send"} {
		if r := call(t, http.MethodGet, p, nil); r.status != 200 || r.raw != "next handler" {
			t.Errorf("GET %s: %d %q, want the next handler", p, r.status, r.raw)
		}
	}

	// unknown paths under the prefix
	for _, p := range []string{"/authmail", "/authmail/", "/authmail/nope", "/authmail/send/otp/extra", "/authmail/send/"} {
		r := post(t, p, "{}")
		expectError(t, r, 404, "not_found", "")
	}

	// wrong methods
	r = call(t, http.MethodGet, "/authmail/send/otp", nil, "Authorization: Bearer "+keyApp)
	expectError(t, r, 405, "method_not_allowed", "")
	if r.header.Get("Allow") != "POST" {
		t.Errorf("Allow %q", r.header.Get("Allow"))
	}
	r = call(t, http.MethodPost, "/authmail/health", strings.NewReader("{}"))
	expectError(t, r, 405, "method_not_allowed", "")
	if r.header.Get("Allow") != "GET, HEAD" {
		t.Errorf("Allow %q", r.header.Get("Allow"))
	}
	for _, m := range []string{http.MethodPut, http.MethodDelete, http.MethodPatch, http.MethodOptions} {
		expectError(t, call(t, m, "/authmail/send", nil), 405, "method_not_allowed", "")
	}
}

func TestRootPathPrefix(t *testing.T) {
	load(t, config{PathPrefix: "/"})
	if r := call(t, http.MethodGet, "/health", nil); r.status != 200 || r.str("status") != "ok" {
		t.Fatalf("GET /health: %d %s", r.status, r.raw)
	}
	r := post(t, "/send/otp", `{"to":"jane@example.org","code":"424242"}`)
	expectSent(t, r)
	// the app's paths (the respond after authmail in the same site block)
	for _, p := range []string{"/", "/app/page", "/authmail/send/otp", "/healthz", "/sender"} {
		for _, m := range []string{http.MethodGet, http.MethodPost} {
			if r := call(t, m, p, nil); r.status != 200 || r.raw != "next handler" || r.header.Get("X-Request-ID") != "" {
				t.Fatalf("%s %s: %d %s, want the next handler's answer", m, p, r.status, r.raw)
			}
		}
	}
	// near misses: a wrong method on an endpoint, a misspelt flow
	expectError(t, call(t, http.MethodGet, "/send/otp", nil), 405, "method_not_allowed", "")
	expectError(t, call(t, http.MethodPost, "/health", nil), 405, "method_not_allowed", "")
	expectError(t, post(t, "/send/opt", `{}`), 404, "not_found", "")
	expectError(t, post(t, "/verify/code", `{}`), 404, "not_found", "")
}

func TestCustomPathPrefixAndMatcher(t *testing.T) {
	load(t, config{PathPrefix: "/api/mail/"})
	expectSent(t, post(t, "/api/mail/send/otp", `{"to":"jane@example.org","code":"424242"}`))
	if r := call(t, http.MethodGet, "/authmail/health", nil); r.raw != "next handler" {
		t.Fatalf("the default prefix still answers: %d %s", r.status, r.raw)
	}
}

func TestAuthentication(t *testing.T) {
	load(t, config{})
	body := `{"to":"jane@example.org","code":"123456"}`
	cases := map[string][]string{
		"no header":         {"Content-Type: application/json"},
		"empty bearer":      {"Authorization: Bearer ", "Content-Type: application/json"},
		"wrong key":         {"Authorization: Bearer " + secret("it-app-key-0123456789abcdeX"), "Content-Type: application/json"},
		"key prefix":        {"Authorization: Bearer it-app-key", "Content-Type: application/json"},
		"basic scheme":      {"Authorization: Basic " + keyApp, "Content-Type: application/json"},
		"no scheme":         {"Authorization: " + keyApp, "Content-Type: application/json"},
		"placeholder":       {"Authorization: Bearer {env.AUTHMAIL_IT_KEY}", "Content-Type: application/json"},
		"non-ascii bearer":  {"Authorization: Bearer " + secret("ключ-0123456789abcdef"), "Content-Type: application/json"},
		"wrong content too": {"Authorization: Bearer nope", "Content-Type: text/plain"},
	}
	for name, hdrs := range cases {
		t.Run(name, func(t *testing.T) {
			r := call(t, http.MethodPost, "/authmail/send/otp", strings.NewReader(body), hdrs...)
			expectError(t, r, 401, "unauthorized", "")
			if r.header.Get("WWW-Authenticate") != "Bearer" {
				t.Errorf("WWW-Authenticate %q", r.header.Get("WWW-Authenticate"))
			}
		})
	}
	// authentication happens before the body is read: an unauthenticated
	// oversized body is a 401, not a 413, and is never consumed
	big := strings.Repeat("x", 200<<10)
	r := call(t, http.MethodPost, "/authmail/send", strings.NewReader(big), "Content-Type: application/json")
	expectError(t, r, 401, "unauthorized", "")

	// both configured keys work, case-insensitive scheme
	expectSent(t, post(t, "/authmail/send/otp", body))
	r = call(t, http.MethodPost, "/authmail/send/otp", strings.NewReader(body), "Authorization: bearer "+keyOther, "Content-Type: application/json")
	expectSent(t, r)
}

func TestRequestFormatErrors(t *testing.T) {
	load(t, config{})
	otp := "/authmail/send/otp"
	t.Run("unsupported media type", func(t *testing.T) {
		for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "application/jsonx", "multipart/form-data; boundary=x"} {
			r := call(t, http.MethodPost, otp, strings.NewReader(`{}`), "Authorization: Bearer "+keyApp, "Content-Type: "+ct)
			expectError(t, r, 415, "unsupported_media_type", "")
		}
		// parameters are fine
		r := call(t, http.MethodPost, otp, strings.NewReader(`{"to":"a@example.org","code":"1"}`), "Authorization: Bearer "+keyApp, "Content-Type: application/json; charset=utf-8")
		expectSent(t, r)
	})
	t.Run("payload too large", func(t *testing.T) {
		big := `{"to":"a@example.org","subject":"s","text_body":"` + strings.Repeat("x", 70<<10) + `"}`
		expectError(t, post(t, "/authmail/send", big), 413, "payload_too_large", "")
		// without Content-Length (chunked): the limit still holds
		req, _ := http.NewRequest(http.MethodPost, baseURL+"/authmail/send", io.MultiReader(strings.NewReader(big)))
		req.ContentLength = -1
		req.Header.Set("Authorization", "Bearer "+keyApp)
		req.Header.Set("Content-Type", "application/json")
		res, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != 413 {
			t.Fatalf("chunked oversized body: %d", res.StatusCode)
		}
		if len(smtpSrv.Attempts()) != 0 {
			t.Fatal("oversized request reached SMTP")
		}
	})
	t.Run("malformed json", func(t *testing.T) {
		for _, b := range []string{``, `{`, `{"to":}`, `not json`, `{"to":"a@example.org"} {"x":1}`, `["to"]`, `"str"`, `null`, ` null `} {
			expectError(t, post(t, otp, b), 400, "invalid_json", "")
		}
	})
	t.Run("dry run header", func(t *testing.T) {
		expectError(t, post(t, otp, `{"to":"a@example.org","code":"1"}`, "X-Dry-Run: maybe"), 400, "invalid_request", "")
	})
}

func TestValidationErrors(t *testing.T) {
	load(t, config{})
	long := strings.Repeat("a", 999)
	var hundredOne []string
	for range 101 {
		hundredOne = append(hundredOne, "x@example.org")
	}
	cases := []struct {
		name, path, body string
		code, field      string
	}{
		{"unknown field", "/send/otp", `{"to":"a@example.org","code":"1","sms":true}`, "invalid_request", "sms"},
		{"old_email on another flow", "/send/magic-link", `{"to":"a@example.org","token":"t","old_email":"o@example.org"}`, "invalid_request", "old_email"},
		{"wrong type", "/send/otp", `{"to":"a@example.org","code":123456}`, "invalid_request", "code"},
		{"wrong to type", "/send", `{"to":42,"subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"expiry not integer", "/send/otp", `{"to":"a@example.org","code":"1","expires_in_minutes":"10"}`, "invalid_request", "expires_in_minutes"},
		{"expiry zero", "/send/otp", `{"to":"a@example.org","code":"1","expires_in_minutes":0}`, "invalid_request", "expires_in_minutes"},
		{"expiry too long", "/send/magic-link", `{"to":"a@example.org","token":"t","expires_in_minutes":100000}`, "invalid_request", "expires_in_minutes"},
		{"missing to", "/send/otp", `{"code":"1"}`, "invalid_request", "to"},
		{"missing code", "/send/otp", `{"to":"a@example.org"}`, "invalid_request", "code"},
		{"code too long", "/send/otp", `{"to":"a@example.org","code":"` + strings.Repeat("9", 65) + `"}`, "invalid_request", "code"},
		{"code with newline", "/send/otp", `{"to":"a@example.org","code":"12\n34"}`, "invalid_request", "code"},
		{"invalid address", "/send/otp", `{"to":"not-an-address","code":"1"}`, "invalid_request", "to"},
		{"two addresses in one string", "/send", `{"to":"a@x.com, b@y.com","subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"list for a single recipient", "/send/otp", `{"to":["a@example.org","b@example.org"],"code":"1"}`, "invalid_request", "to"},
		{"crlf in to", "/send", `{"to":"a@example.org\r\nBcc: evil@evil.example","subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"lf in cc", "/send", `{"to":"a@example.org","cc":["c@example.org\nX: y"],"subject":"s","text_body":"b"}`, "invalid_request", "cc"},
		{"crlf in bcc", "/send", `{"to":"a@example.org","bcc":"b@example.org\r\n","subject":"s","text_body":"b"}`, "invalid_request", "bcc"},
		{"crlf in reply_to", "/send", `{"to":"a@example.org","reply_to":"Evil\r\nX: 1 <r@example.org>","subject":"s","text_body":"b"}`, "invalid_request", "reply_to"},
		{"crlf in subject", "/send", `{"to":"a@example.org","subject":"Hi\r\nBcc: evil@evil.example","text_body":"b"}`, "invalid_request", "subject"},
		{"lf in user_name", "/send/otp", `{"to":"a@example.org","code":"1","user_name":"Jane\nBcc: e@evil.example"}`, "invalid_request", "user_name"},
		{"non-ASCII display name with a backslash", "/send", `{"to":"\"CORP\\\\Jürgen\" <a@example.org>","subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"display name decoding to invalid UTF-8", "/send", `{"to":"=?utf-8?B?0000XC00?= <a@example.org>","subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"encoded crlf in display name", "/send", `{"to":"=?utf-8?b?RXZpbA0KQmNjOiB4?= <a@example.org>","subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"subject too long", "/send", `{"to":"a@example.org","subject":"` + long + `","text_body":"b"}`, "invalid_request", "subject"},
		{"missing subject", "/send", `{"to":"a@example.org","text_body":"b"}`, "invalid_request", "subject"},
		{"missing bodies", "/send", `{"to":"a@example.org","subject":"s"}`, "invalid_request", "text_body"},
		{"nul in body", "/send", `{"to":"a@example.org","subject":"s","text_body":"a\u0000b"}`, "invalid_request", "text_body"},
		{"101 addresses", "/send", `{"to":` + mustJSON(hundredOne) + `,"subject":"s","text_body":"b"}`, "invalid_request", "to"},
		{"token and link", "/send/magic-link", `{"to":"a@example.org","token":"t","link":"https://app.example.com/x"}`, "invalid_request", "link"},
		{"neither token nor link", "/send/verify-email", `{"to":"a@example.org"}`, "invalid_request", "token"},
		{"foreign link", "/send/magic-link", `{"to":"a@example.org","link":"https://evil.example/login"}`, "link_not_allowed", "link"},
		{"look-alike link", "/send/magic-link", `{"to":"a@example.org","link":"https://app.example.com.evil.example/"}`, "link_not_allowed", "link"},
		{"http downgrade link", "/send/magic-link", `{"to":"a@example.org","link":"http://app.example.com/x"}`, "link_not_allowed", "link"},
		{"other port link", "/send/magic-link", `{"to":"a@example.org","link":"https://app.example.com:8443/x"}`, "link_not_allowed", "link"},
		{"javascript link", "/send/magic-link", `{"to":"a@example.org","link":"javascript:alert(1)"}`, "invalid_request", "link"},
		{"foreign base_url", "/send/password-reset", `{"to":"a@example.org","token":"t","base_url":"https://evil.example"}`, "link_not_allowed", "base_url"},
		{"old_email same as to", "/send/email-change", `{"to":"a@example.org","old_email":"A@example.org","token":"t"}`, "invalid_request", "old_email"},
		{"bad old_email", "/send/email-change", `{"to":"a@example.org","old_email":"nope","token":"t"}`, "invalid_request", "old_email"},
		{"missing event", "/send/security-alert", `{"to":"a@example.org"}`, "invalid_request", "event"},
		{"unknown event", "/send/security-alert", `{"to":"a@example.org","event":"coffee_spilled"}`, "invalid_request", "event"},
		{"bad ip", "/send/security-alert", `{"to":"a@example.org","event":"password_changed","ip":"300.1.1.1"}`, "invalid_request", "ip"},
		{"ip with a zone", "/send/security-alert", `{"to":"a@example.org","event":"password_changed","ip":"fe80::1%eth0\r\n\r\nURGENT: verify at https://evil.example/"}`, "invalid_request", "ip"},
		{"bad occurred_at", "/send/security-alert", `{"to":"a@example.org","event":"password_changed","occurred_at":"yesterday"}`, "invalid_request", "occurred_at"},
		{"crlf in user_agent", "/send/security-alert", `{"to":"a@example.org","event":"password_changed","user_agent":"x\r\ny"}`, "invalid_request", "user_agent"},
		// validation runs before the disabled-event shortcut
		{"bad ip on disabled event", "/send/security-alert", `{"to":"a@example.org","event":"account_locked","ip":"nope"}`, "invalid_request", "ip"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			expectError(t, post(t, "/authmail"+tc.path, tc.body), 422, tc.code, tc.field)
		})
	}
}

func TestLinkWithoutConfiguredOrigin(t *testing.T) {
	// a site without base_url and without a verify-email template
	load(t, config{Delivery: "capture " + t.TempDir()})
	r := post(t, "/authmail/send/verify-email", `{"to":"a@example.org","token":"t"}`)
	if r.status != 200 {
		t.Fatalf("with base_url the link is built: %d %s", r.status, r.raw)
	}
	dir := t.TempDir()
	cfg := strings.Replace(config{Delivery: "capture " + dir, StorageDir: storageFor(t)}.render(), "\t\tbase_url https://app.example.com\n", "", 1)
	if strings.Contains(cfg, "base_url") {
		t.Fatal("base_url still in config")
	}
	loadRaw(t, cfg)
	r = post(t, "/authmail/send/verify-email", `{"to":"a@example.org","token":"t"}`)
	expectError(t, r, 422, "invalid_request", "token")
	for _, want := range []string{"base_url", "link verify-email"} {
		if !strings.Contains(r.str("message"), want) {
			t.Errorf("message %q does not name %q", r.str("message"), want)
		}
	}
	expectError(t, post(t, "/authmail/send/verify-email", `{"to":"a@example.org","link":"https://app.example.com/v"}`), 422, "link_not_allowed", "link")
	// the password-reset template still works without base_url
	if r := post(t, "/authmail/send/password-reset", `{"to":"a@example.org","token":"t"}`); r.status != 200 {
		t.Fatalf("template link without base_url: %d %s", r.status, r.raw)
	}
}

func TestDryRun(t *testing.T) {
	load(t, config{})
	bodies := map[string]string{
		"/send":                `{"to":"a@example.org","subject":"s","html_body":"<p>x</p>"}`,
		"/send/otp":            `{"to":"a@example.org","code":"123456"}`,
		"/send/magic-link":     `{"to":"a@example.org","token":"t"}`,
		"/send/password-reset": `{"to":"a@example.org","token":"t"}`,
		"/send/verify-email":   `{"to":"a@example.org","link":"https://app.example.com/v?x=1"}`,
		"/send/email-change":   `{"to":"a@example.org","token":"t","old_email":"old@example.org"}`,
		"/send/security-alert": `{"to":"a@example.org","event":"new_login","ip":"192.0.2.1"}`,
	}
	for path, body := range bodies {
		for _, v := range []string{"true", "1", "yes", "YES", "True"} {
			r := post(t, "/authmail"+path, body, "X-Dry-Run: "+v)
			if r.status != 200 || r.raw != "{\"sent\":false,\"dry_run\":true,\"message\":\"Email payload is valid\"}\n" {
				t.Fatalf("%s dry run %q: %d %s", path, v, r.status, r.raw)
			}
		}
		// a dry run still validates
		r := post(t, "/authmail"+path, `{"to":"bad"}`, "X-Dry-Run: true")
		if r.status != 422 {
			t.Fatalf("%s invalid dry run: %d %s", path, r.status, r.raw)
		}
	}
	if n := len(smtpSrv.Attempts()); n != 0 || smtpSrv.Connections() != 0 {
		t.Fatalf("dry runs contacted SMTP: %d messages, %d connections", n, smtpSrv.Connections())
	}
	// "false" sends
	expectSent(t, post(t, "/authmail/send/otp", bodies["/send/otp"], "X-Dry-Run: false"))
}

func TestRequestID(t *testing.T) {
	load(t, config{})
	r := post(t, "/authmail/send/otp", `{"to":"bad"}`, "X-Request-ID: req-123.abc")
	if r.header.Get("X-Request-ID") != "req-123.abc" {
		t.Fatalf("X-Request-ID %q", r.header.Get("X-Request-ID"))
	}
	r = call(t, http.MethodGet, "/authmail/health", nil)
	if !regexp.MustCompile(`^[0-9a-f-]{36}$`).MatchString(r.header.Get("X-Request-ID")) {
		t.Fatalf("generated X-Request-ID %q", r.header.Get("X-Request-ID"))
	}
	// a hostile id is replaced, not echoed
	r = call(t, http.MethodGet, "/authmail/health", nil, "X-Request-ID: "+strings.Repeat("x", 300))
	if len(r.header.Get("X-Request-ID")) != 36 {
		t.Fatalf("overlong X-Request-ID echoed: %q", r.header.Get("X-Request-ID"))
	}
}
