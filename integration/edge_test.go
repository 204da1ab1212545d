package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
	"github.com/emersion/go-smtp"
)

const (
	keySender = "it-sender-key-0123456789abcdef"
	keyAdmin  = "it-admin-key-0123456789abcdef"
)

// postWith sends an authenticated JSON request with the given key.
func postWith(t *testing.T, key, path, body string, headers ...string) response {
	t.Helper()
	return call(t, http.MethodPost, path, strings.NewReader(body),
		append([]string{"Authorization: Bearer " + key, "Content-Type: application/json"}, headers...)...)
}

func TestScopedAndHashedKeys(t *testing.T) {
	sum := sha256.Sum256([]byte(keyAdmin))
	t.Setenv("AUTHMAIL_IT_SENDER_KEY", secret(keySender))
	secret(keyAdmin)
	load(t, config{Keys: fmt.Sprintf(`key sender {env.AUTHMAIL_IT_SENDER_KEY} {
			allow otp magic-link
		}
		key admin sha256:%s {
			allow status test
			rate off
		}
		key app {env.AUTHMAIL_IT_KEY}`, hex.EncodeToString(sum[:]))})
	otp := `{"to":"jane@example.org","code":"1"}`

	// a key limited to otp and magic-link
	expectSent(t, postWith(t, keySender, "/authmail/send/otp", otp))
	expectError(t, postWith(t, keySender, "/authmail/send", `{"to":"a@example.org","subject":"s","text_body":"b"}`), 403, "forbidden", "")
	expectError(t, postWith(t, keySender, "/authmail/test", `{"to":"a@example.org"}`), 403, "forbidden", "")
	expectError(t, call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keySender), 403, "forbidden", "")

	// a hashed admin key: admin endpoints only
	expectError(t, postWith(t, keyAdmin, "/authmail/send/otp", otp), 403, "forbidden", "")
	r := call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keyAdmin)
	if r.status != 200 {
		t.Fatalf("status: %d %s", r.status, r.raw)
	}
	for _, s := range []string{keyAdmin, keySender, keyApp, smtpPassword, hex.EncodeToString(sum[:]), "{env."} {
		if strings.Contains(r.raw, s) {
			t.Fatalf("/status shows a secret (%q): %s", s, r.raw)
		}
	}
	delivery, _ := r.json["delivery"].(map[string]any)
	if delivery["mode"] != "smtp" || delivery["host"] != "127.0.0.1" || delivery["tls"] != "starttls" || delivery["username"] != "m***" ||
		delivery["port"] != float64(smtpSrv.Port) {
		t.Errorf("delivery %v", delivery)
	}
	if r.str("from") != "no-reply@example.com" || !strings.Contains(r.raw, `"keys":[{"id":"sender","allow":["otp","magic-link"],"rate":"600/1m"},{"id":"admin","allow":["status","test"],"rate":"off"},{"id":"app","allow":["send","otp","magic-link","password-reset","verify-email","email-change","security-alert"],"rate":"600/1m"}]`) {
		t.Errorf("keys in /status: %s", r.raw)
	}
	if !strings.Contains(r.raw, `"security_alerts":{"account_locked":false,"new_login":true,"password_changed":true`) || !strings.Contains(r.raw, `"queue":{"instance":"`) {
		t.Errorf("/status lacks alerts or queue: %s", r.raw)
	}
	if r.header.Get("Cache-Control") != "no-store" {
		t.Error("/status may be cached")
	}

	// POST /test honours X-Dry-Run like every endpoint: nothing is sent
	smtpSrv.WaitMessages(1, 5*time.Second) // the otp above
	smtpSrv.ClearMessages()
	r = postWith(t, keyAdmin, "/authmail/test", `{"to":"ops@example.org"}`, "X-Dry-Run: yes")
	if r.status != 200 || r.json["dry_run"] != true || r.json["sent"] != false {
		t.Fatalf("dry-run test: %d %s", r.status, r.raw)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(smtpSrv.Attempts()); n != 0 {
		t.Fatalf("a dry-run /test reached the SMTP server: %d transactions", n)
	}
	expectError(t, postWith(t, keyAdmin, "/authmail/test", `{"to":"bad"}`, "X-Dry-Run: yes"), 422, "invalid_request", "to")
	expectError(t, postWith(t, keyAdmin, "/authmail/test", `{"to":`), 400, "invalid_json", "")
	expectError(t, postWith(t, keyAdmin, "/authmail/test", `{"to":"ops@example.org","cc":"x@example.org"}`), 422, "invalid_request", "cc")

	// POST /test: a synchronous test message with the server's answer
	r = postWith(t, keyAdmin, "/authmail/test", `{"to":"ops@example.org"}`)
	if r.status != 200 || r.json["sent"] != true || !strings.Contains(r.str("smtp_response"), "OK") {
		t.Fatalf("test: %d %s", r.status, r.raw)
	}
	m := smtpSrv.WaitMessages(1, 5*time.Second)
	if len(m) != 1 || parseMail(t, m[0].Data).Subject != "Example App test message" || m[0].To[0] != "ops@example.org" {
		t.Fatalf("test message %v", m)
	}
	smtpSrv.ClearMessages()
	smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(string) error {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}})
	r = postWith(t, keyAdmin, "/authmail/test", `{"to":"nobody@example.org"}`)
	if r.status != 502 || r.str("error_code") != "recipient_refused" || r.str("smtp_response") != "550 5.1.1 no such user" {
		t.Fatalf("failing test: %d %s", r.status, r.raw)
	}
	smtpSrv.SetHooks(smtptest.Hooks{})
	expectError(t, postWith(t, keyAdmin, "/authmail/test", `{"to":"bad"}`), 422, "invalid_request", "to")

	// the full key: every send endpoint, no admin endpoint
	expectError(t, call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keyApp), 403, "forbidden", "")
	expectSent(t, post(t, "/authmail/send", `{"to":"a@example.org","subject":"s","text_body":"b"}`))

	// the key id, never the secret, is what the logs show
	logs, _ := os.ReadFile(logFile)
	if !strings.Contains(string(logs), `"key_id":"sender"`) || !strings.Contains(string(logs), `"key_id":"admin"`) {
		t.Error("key ids missing from the logs")
	}
}

func TestKeyRateLimit(t *testing.T) {
	load(t, config{Keys: "key app {env.AUTHMAIL_IT_KEY} {\n\t\t\trate 3/1m\n\t\t}"})
	for i := range 3 {
		expectSent(t, post(t, "/authmail/send/otp", fmt.Sprintf(`{"to":"u%d@example.org","code":"1"}`, i)))
	}
	r := post(t, "/authmail/send/otp", `{"to":"u9@example.org","code":"1"}`)
	expectError(t, r, 429, "rate_limited", "")
	if n, _ := strconv.Atoi(r.header.Get("Retry-After")); n < 50 || n > 60 {
		t.Errorf("Retry-After %q", r.header.Get("Retry-After"))
	}
	// health is never limited
	if r := call(t, http.MethodGet, "/authmail/health", nil); r.status != 200 {
		t.Fatalf("health %d", r.status)
	}
}

func TestFailedAuthenticationIsThrottledPerClientIP(t *testing.T) {
	load(t, config{
		Limits: "auth_failures 3/1m\n\t\trecipient_rate off",
		Global: "servers {\n\t\ttrusted_proxies static 127.0.0.1/32\n\t\tclient_ip_headers X-Forwarded-For\n\t}",
	})
	from := func(ip string) string { return "X-Forwarded-For: " + ip }
	body := `{"to":"jane@example.org","code":"1"}`
	for range 3 {
		r := call(t, http.MethodPost, "/authmail/send/otp", strings.NewReader(body), "Authorization: Bearer "+secret("wrong-key-0123456789"), "Content-Type: application/json", from("203.0.113.5"))
		expectError(t, r, 401, "unauthorized", "")
	}
	// now even a valid key is refused for that client, for the window
	r := post(t, "/authmail/send/otp", body, from("203.0.113.5"))
	expectError(t, r, 429, "rate_limited", "")
	if n, _ := strconv.Atoi(r.header.Get("Retry-After")); n < 50 || n > 60 {
		t.Errorf("Retry-After %q", r.header.Get("Retry-After"))
	}
	// another client (the proxy is trusted, so its X-Forwarded-For counts)
	expectSent(t, post(t, "/authmail/send/otp", body, from("203.0.113.6")))
	// health is never limited
	if r := call(t, http.MethodGet, "/authmail/health", nil, from("203.0.113.5")); r.status != 200 {
		t.Fatalf("health %d", r.status)
	}
	// IPv6 clients are counted per /64: rotating through addresses of
	// one network does not escape the throttle; another network is apart
	for _, ip := range []string{"2001:db8:1:2::1", "2001:db8:1:2::ab", "2001:db8:1:2:ffff::7"} {
		r := call(t, http.MethodPost, "/authmail/send/otp", strings.NewReader(body), "Authorization: Bearer "+secret("wrong-key-0123456789"), "Content-Type: application/json", from(ip))
		expectError(t, r, 401, "unauthorized", "")
	}
	expectError(t, post(t, "/authmail/send/otp", body, from("2001:db8:1:2:1234::9")), 429, "rate_limited", "")
	expectSent(t, post(t, "/authmail/send/otp", body, from("2001:db8:1:3::1")))
}

func TestRecipientRateLimit(t *testing.T) {
	load(t, config{Limits: "auth_failures 1000/1m\n\t\trecipient_rate 2/1m\n\t\trecipient_rate password-reset 1/1m"})
	otp := func(to string) string { return fmt.Sprintf(`{"to":%q,"code":"1"}`, to) }
	// dry runs do not count
	for range 5 {
		if r := post(t, "/authmail/send/otp", otp("jane@example.org"), "X-Dry-Run: true"); r.status != 200 {
			t.Fatalf("dry run %d", r.status)
		}
	}
	first := post(t, "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: rr-1")
	expectSent(t, first)
	expectSent(t, post(t, "/authmail/send/otp", otp("JANE@example.org")))
	r := post(t, "/authmail/send/otp", otp("Jane <jane@EXAMPLE.org>"))
	expectError(t, r, 429, "recipient_rate_limited", "")
	if r.header.Get("Retry-After") == "" {
		t.Error("no Retry-After")
	}
	// an idempotent replay does not count, and is not refused
	if rr := post(t, "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: rr-1"); rr.status != 200 || rr.str("id") != first.str("id") {
		t.Fatalf("replay after the limit: %d %s", rr.status, rr.raw)
	}
	// per flow and per recipient
	expectSent(t, post(t, "/authmail/send/magic-link", `{"to":"jane@example.org","token":"t"}`))
	expectSent(t, post(t, "/authmail/send/otp", otp("bob@example.org")))
	expectSent(t, post(t, "/authmail/send/password-reset", `{"to":"bob@example.org","token":"t"}`))
	expectError(t, post(t, "/authmail/send/password-reset", `{"to":"bob@example.org","token":"t"}`), 429, "recipient_rate_limited", "")
	// the email-change notice counts for the old address: varying the new
	// address must not let a caller flood the old one with notices
	change := func(to, old string) response {
		return post(t, "/authmail/send/email-change", mustJSON(map[string]string{"to": to, "token": "t", "old_email": old}))
	}
	for i := range 2 {
		if r := change(fmt.Sprintf("new%d@example.org", i), "victim@example.org"); r.status != 200 || r.str("status") != "sent" {
			t.Fatalf("email change %d: %d %s", i, r.status, r.raw)
		}
		if got := smtpSrv.WaitMessages(2, 5*time.Second); len(got) != 2 {
			t.Fatalf("email change %d: %d messages, want the confirmation and the notice", i, len(got))
		}
		smtpSrv.ClearMessages()
	}
	r = change("new2@example.org", "victim@example.org")
	expectError(t, r, 429, "recipient_rate_limited", "")
	if !strings.Contains(r.str("message"), "old_email") || r.header.Get("Retry-After") == "" {
		t.Errorf("refusal should name old_email and say when to retry: %s %v", r.raw, r.header)
	}
	// the refused request sent nothing and charged nothing: the new
	// address still has its two messages
	for range 2 {
		// exactly one message each: the refused request left none behind
		expectSent(t, change("new2@example.org", ""))
	}
	// /send is not limited per recipient
	for range 4 {
		expectSent(t, post(t, "/authmail/send", `{"to":"jane@example.org","subject":"receipt","text_body":"b"}`))
	}
}

func TestAllowOriginAndLinkPolicy(t *testing.T) {
	load(t, config{Extra: "allow_origin https://accounts.example.net http://localhost:3000\n\t\tlink_policy enforce"})
	// caller links on base_url's origin or an allowed origin
	expectSent(t, post(t, "/authmail/send/magic-link", `{"to":"a@example.org","link":"https://accounts.example.net/login?x=1"}`))
	expectSent(t, post(t, "/authmail/send/verify-email", `{"to":"a@example.org","token":"t","base_url":"http://localhost:3000/app"}`))
	expectError(t, post(t, "/authmail/send/magic-link", `{"to":"a@example.org","link":"https://example.net/login"}`), 422, "link_not_allowed", "link")

	send := func(html, text string) response {
		return post(t, "/authmail/send", mustJSON(map[string]string{"to": "a@example.org", "subject": "s", "html_body": html, "text_body": text}))
	}
	expectSent(t, send(`<a href="https://app.example.com/x">x</a><img src="https://accounts.example.net/logo.png"><a href="mailto:help@example.org">mail</a><a href="#top">top</a>`,
		"See https://app.example.com/orders/7 or write to help@example.org."))
	for _, tc := range []struct{ html, text, field, host string }{
		{`<a href="https://evil.example/phish">click</a>`, "", "html_body", "https://evil.example"},
		{`<img srcset="https://app.example.com/a.png 1x, https://tracker.example/b.png 2x">`, "", "html_body", "https://tracker.example"},
		{`<a href="//evil.example/x">x</a>`, "", "html_body", "https://evil.example"},
		{`<a href="javascript:alert(1)">x</a>`, "", "html_body", "javascript:"},
		{`<form action="http://app.example.com/steal"></form>`, "", "html_body", "http://app.example.com"},
		{`<p>ok</p>`, "Reset at https://evil.example/reset?t=1.", "text_body", "https://evil.example"},
		{`<p>ok</p>`, "Go to www.evil.example now", "text_body", "https://www.evil.example"},
		// links outside URL attributes
		{`<!--[if mso]><a href="https://evil.example/mso">Click</a><![endif]--><p>ok</p>`, "", "html_body", "https://evil.example"},
		{`<p>Reset at https://evil.example/login</p>`, "", "html_body", "https://evil.example"},
		{`<div style="background:url(https://tracker.example/p.gif)">x</div>`, "", "html_body", "https://tracker.example"},
		{`<meta http-equiv="refresh" content="0;url=https://evil.example/r">`, "", "html_body", "https://evil.example"},
		{`<p>ok</p>`, "https://app.example.com/\u00a0https://evil.example/login", "text_body", "https://evil.example"},
		{`<p>ok</p>`, "Reset:_https://evil.example/login", "text_body", "https://evil.example"},
	} {
		r := send(tc.html, tc.text)
		expectError(t, r, 422, "link_not_allowed", tc.field)
		if !strings.Contains(r.str("message"), tc.host) {
			t.Errorf("message %q does not name %q", r.str("message"), tc.host)
		}
	}
	// an email template's DOCTYPE and xmlns name schemas, not links
	expectSent(t, send(`<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml"><body><a href="https://app.example.com/x">x</a></body></html>`, ""))
	if n := len(smtpSrv.Messages()); n != 0 {
		t.Errorf("refused requests sent %d messages", n)
	}
}

func TestStrictInput(t *testing.T) {
	load(t, config{})
	// invalid UTF-8 is refused with its field, not silently replaced
	bad := "{\"to\":\"a@example.org\",\"subject\":\"caf\xe9\",\"text_body\":\"b\"}"
	expectError(t, post(t, "/authmail/send", bad), 422, "invalid_request", "subject")
	expectError(t, post(t, "/authmail/send", "{\"to\":[\"a@example.org\",\"\xff@example.org\"],\"subject\":\"s\",\"text_body\":\"b\"}"), 422, "invalid_request", "to")
	expectError(t, post(t, "/authmail/send", "{\"to\":\"a@example.org\",\"subj\xffect\":\"s\"}"), 422, "invalid_request", "subj\ufffdect")
	// at most 100 recipients per message, counted after de-duplication
	var to, cc []string
	for i := range 60 {
		to = append(to, fmt.Sprintf("t%d@example.org", i))
		cc = append(cc, fmt.Sprintf("c%d@example.org", i))
	}
	expectError(t, post(t, "/authmail/send", mustJSON(map[string]any{"to": to, "cc": cc, "subject": "s", "text_body": "b"})), 422, "invalid_request", "cc")
	expectError(t, post(t, "/authmail/send", mustJSON(map[string]any{"to": to, "bcc": cc, "subject": "s", "text_body": "b"})), 422, "invalid_request", "bcc")
	expectSent(t, post(t, "/authmail/send", mustJSON(map[string]any{"to": to, "cc": to, "subject": "s", "text_body": "b"})))
	// internationalised domains go out as punycode
	m := expectSent(t, post(t, "/authmail/send/otp", `{"to":"Jörg <joerg@Bücher.example>","code":"1"}`))
	if m.To[0] != "joerg@xn--bcher-kva.example" || !strings.Contains(headerOf(t, m.Data, "To"), "<joerg@xn--bcher-kva.example>") {
		t.Errorf("IDN recipient: RCPT %v, To %q", m.To, headerOf(t, m.Data, "To"))
	}
	// a non-ASCII local part needs SMTPUTF8, which authmail does not send
	expectError(t, post(t, "/authmail/send/otp", `{"to":"jörg@example.org","code":"1"}`), 422, "invalid_request", "to")
}

func TestLogRecipients(t *testing.T) {
	load(t, config{Extra: "log_recipients on"})
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"opted-in@example.net","code":"1"}`))
	time.Sleep(100 * time.Millisecond)
	logs, _ := os.ReadFile(logFile)
	if !strings.Contains(string(logs), `"rcpt":["opted-in@example.net"]`) {
		t.Fatal("log_recipients on: the address is not logged")
	}
	load(t, config{})
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"hashed-only@example.net","code":"1"}`))
	time.Sleep(100 * time.Millisecond)
	logs, _ = os.ReadFile(logFile)
	if strings.Contains(string(logs), "hashed-only@example.net") || !strings.Contains(string(logs), `@example.net"]`) {
		t.Fatal("default: the address must be logged as a hash plus domain")
	}
}

// TestSmuggledLinksRefused drives link and base_url values and /send
// bodies that smuggle a foreign URL past the origin check through a real
// Caddy: each is answered 422 naming its field, and nothing reaches the
// SMTP server.
func TestSmuggledLinksRefused(t *testing.T) {
	load(t, config{Extra: "link_policy enforce"})
	// a Unicode space in a caller's base_url or link would end the link
	// in a mail client, leaving a second one to a foreign host
	expectError(t, post(t, "/authmail/send/password-reset",
		mustJSON(map[string]string{"to": "a@example.org", "token": "SECRET-TOKEN-42", "base_url": "https://app.example.com/x\u2028https://evil.example/steal"})),
		422, "invalid_request", "base_url")
	for _, sp := range []string{"\u3000", "\u00a0", "\u2003", "\u200b"} {
		r := post(t, "/authmail/send/magic-link", mustJSON(map[string]string{"to": "a@example.org", "link": "https://app.example.com/login" + sp + "https://evil.example/steal?token=SECRET-TOKEN-42"}))
		expectError(t, r, 422, "invalid_request", "link")
		if want := fmt.Sprintf("link must not contain %U", []rune(sp)[0]); !strings.HasPrefix(r.str("message"), want) || strings.Contains(r.raw, "SECRET-TOKEN-42") {
			t.Errorf("message %q: want it to start with %q and not to quote the link", r.str("message"), want)
		}
	}
	// percent-encoded, the same characters are fine
	m := expectSent(t, post(t, "/authmail/send/magic-link", `{"to":"a@example.org","link":"https://app.example.com/login%E3%80%80x"}`))
	if !strings.Contains(string(m.Data), "https://app.example.com/login%E3%80%80x") {
		t.Errorf("the sent message lacks the link:\n%s", m.Data)
	}

	send := func(html, text string) response {
		return post(t, "/authmail/send", mustJSON(map[string]string{"to": "a@example.org", "subject": "s", "html_body": html, "text_body": text}))
	}
	for _, tc := range []struct{ html, text, field, host string }{
		{`<noscript><a href="https:evil.example/login">Log in</a></noscript>`, "", "html_body", "https://evil.example"},
		{`<noscript><a href="//evil.example/login">Log in</a></noscript>`, "", "html_body", "https://evil.example"},
		{`<div style="background:url(//evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
		{`<div style="background:url(https:evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
		{`<div style="background:url('https\3a //evil.example/p.gif')">x</div>`, "", "html_body", "https://evil.example"},
		{`<div style="background:url(&#x2f;&#x2f;evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
		{`<style>@import url(//evil.example/x.css);</style><p>ok</p>`, "", "html_body", "https://evil.example"},
		{`<svg><style><img src=//evil.example/p.gif></style></svg>`, "", "html_body", "https://evil.example"},
		{`<math><style><img src=//evil.example/p.gif></style></math>`, "", "html_body", "https://evil.example"},
		{`<meta http-equiv=refresh content="0;url=//evil.example/r"><p>ok</p>`, "", "html_body", "https://evil.example"},
		{"<a href=\"https://app.example.com/reset\u3000https://evil.example/\">Reset</a>", "", "html_body", "https://evil.example"},
		{`<p>Reset at www.<b></b>evil.example/login</p>`, "", "html_body", "https://www.evil.example"},
		{`<p>ok</p>`, "Reset at https:evil.example/login", "text_body", "https://evil.example"},
		{`<p>ok</p>`, "Reset at //evil.example/login", "text_body", "https://evil.example"},
		{`<p>ok</p>`, "https://app.example.com/\u200bhttps://evil.example/login", "text_body", "https://evil.example"},
	} {
		r := send(tc.html, tc.text)
		expectError(t, r, 422, "link_not_allowed", tc.field)
		if !strings.Contains(r.str("message"), tc.host) {
			t.Errorf("%q / %q: message %q does not name %q", tc.html, tc.text, r.str("message"), tc.host)
		}
	}
	// links on the allowed origin in the same places still go out
	expectSent(t, send(`<noscript><a href="https://app.example.com/x">x</a></noscript><div style="background:url('https\3a //app.example.com/bg.png'); font-family:'Segoe UI'">x</div>
<svg><rect fill="url(#g)"/></svg><meta http-equiv=refresh content="30">`, "Open //app.example.com/x, https:app.example.com/y or https://app.example.com/z."))
	if n := len(smtpSrv.Messages()); n != 0 {
		t.Errorf("refused requests sent %d messages", n)
	}
}
