package integration

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestEncodedWordsThatHideLineBreaksAreRefused: caller text bound for a
// header may not carry an RFC 2047 encoded word that decodes to a line
// break or a control character, in any place a mail client decodes one
// (the subject, user_name as display name and in subjects, display
// names of addresses, quoted or not), nor one that authmail cannot
// decode or whose charset it cannot check.
func TestEncodedWordsThatHideLineBreaksAreRefused(t *testing.T) {
	load(t, config{})
	const crlfBcc = "=?UTF-8?B?SGkNCkJjYzogZXZpbEBldmlsLmV4YW1wbGU=?=" // "Hi\r\nBcc: evil@evil.example"
	send := func(subject string) response {
		return post(t, "/authmail/send", mustJSON(map[string]string{"to": "a@example.org", "subject": subject, "text_body": "b"}))
	}
	for _, subject := range []string{
		crlfBcc,
		"Invoice " + crlfBcc + " attached",
		"x" + crlfBcc, // glued to other text
		"=?UTF-8?B?SGkNCkJjYzogZXZpbEBldmlsLmV4YW1wbGU?=",  // no padding: lenient clients decode it
		"=?utf-8?q?Hi=0d=0aBcc:_evil@evil.example?=",       // Q, lower-case hex
		"=?UTF-8*en?Q?Hi=0D=0ABcc:_evil@evil.example?=",    // RFC 2231 language
		"=?ISO-8859-1?Q?Hi=85Bcc:_evil@evil.example?=",     // NEL, a C1 control
		"=?UTF-8?B?SGnigKhCY2M6IGV2aWw=?=",                 // U+2028
		"=?UTF-8?B?PT9VVEYtOD9RP0hpPTBEPTBBQmNjOl94Pz0=?=", // decodes to another encoded word with CR LF
		"=?UTF-7?Q?Hi+AA0ACg-Bcc:_evil@evil.example?=",     // UTF-7 spells CR LF in ASCII
		"=?UTF-8?B?#not-base64#?=",                         // does not decode
		"Line\u2028separator",                              // raw U+2028
	} {
		expectError(t, send(subject), 422, "invalid_request", "subject")
	}
	otp := func(fields map[string]string) response {
		fields["code"] = "123456"
		return post(t, "/authmail/send/otp", mustJSON(fields))
	}
	expectError(t, otp(map[string]string{"to": "jane@example.org", "user_name": crlfBcc}), 422, "invalid_request", "user_name")
	expectError(t, otp(map[string]string{"to": `"` + crlfBcc + `" <jane@example.org>`}), 422, "invalid_request", "to")
	expectError(t, otp(map[string]string{"to": "=?UTF-8?B?SGkNCkJjYzogZXZpbA?= <jane@example.org>"}), 422, "invalid_request", "to")
	r := post(t, "/authmail/send", mustJSON(map[string]any{"to": "a@example.org", "cc": []string{"c@example.org", crlfBcc + " <d@example.org>"}, "subject": "s", "text_body": "b"}))
	expectError(t, r, 422, "invalid_request", "cc")
	if !strings.Contains(r.str("message"), "encoded word") && !strings.Contains(r.str("message"), "line breaks") {
		t.Errorf("message %q does not say why", r.str("message"))
	}

	// encoded words that decode to plain text still pass
	m := expectSent(t, send("=?UTF-8?B?SGk=?= there"))
	if got := parseMail(t, m.Data).Subject; got != "Hi there" {
		t.Errorf("subject %q", got)
	}
	m = expectSent(t, otp(map[string]string{"to": "=?utf-8?q?J=C3=B6rg?= <jane@example.org>"}))
	if got := headerOf(t, m.Data, "To"); !strings.Contains(got, "<jane@example.org>") {
		t.Errorf("To %q", got)
	}
}

// TestHeaderLinesStayWithinTheLimit: a subject of 998 characters without
// a space (the longest accepted) goes out folded into lines of at most
// 78 octets and decodes to exactly the subject; before, go-mail wrote it
// on one 999-octet line, beyond RFC 5322's and SMTP's limit.
func TestHeaderLinesStayWithinTheLimit(t *testing.T) {
	load(t, config{})
	for _, subject := range []string{
		strings.Repeat("a", 998),
		strings.Repeat("=?", 499),
		"Receipt " + strings.Repeat("x", 200) + "  two  spaces " + strings.Repeat("y", 100),
		strings.Repeat("ü", 998),
	} {
		m := expectSent(t, post(t, "/authmail/send", mustJSON(map[string]string{"to": "a@example.org", "subject": subject, "text_body": "b"})))
		head, _, _ := bytes.Cut(m.Data, []byte("\r\n\r\n"))
		for i, line := range bytes.Split(head, []byte("\r\n")) {
			if len(line) > 78 && !bytes.HasPrefix(line, []byte("To:")) {
				t.Errorf("header line %d is %d octets long: %.80q…", i, len(line), line)
			}
		}
		if got := parseMail(t, m.Data).Subject; got != subject {
			t.Errorf("subject decodes to %q…, want %q…", got[:min(len(got), 40)], subject[:40])
		}
	}
	// 999 characters are refused with the field named
	expectError(t, post(t, "/authmail/send", mustJSON(map[string]string{"to": "a@example.org", "subject": strings.Repeat("a", 999), "text_body": "b"})), 422, "invalid_request", "subject")
}

// TestAmbiguousJSONIsRefused: a key given twice, or written in another
// case than the field's name, is refused before anything is checked or
// sent; encoding/json would take the last value, or the case variant,
// after the first one passed review.
func TestAmbiguousJSONIsRefused(t *testing.T) {
	load(t, config{})
	for _, tc := range []struct{ path, body, field string }{
		{"/authmail/send", `{"to":"checked@example.org","to":"other@evil.example","subject":"s","text_body":"b"}`, "to"},
		{"/authmail/send", `{"to":"checked@example.org","TO":"other@evil.example","subject":"s","text_body":"b"}`, "TO"},
		{"/authmail/send", `{"To":"other@evil.example","subject":"s","text_body":"b"}`, "To"},
		{"/authmail/send", `{"to":"a@example.org","subject":"s","\u017fubject":"t","text_body":"b"}`, "\u017fubject"}, // ſ folds to s
		{"/authmail/send", `{"to":"a@example.org","subject":"s","text_body":"b","t\u0065xt_body":"c"}`, "text_body"},
		{"/authmail/send/otp", `{"to":"a@example.org","code":"1","code":"2"}`, "code"},
		{"/authmail/send/email-change", `{"to":"a@example.org","token":"t","old_email":"o@example.org","Old_Email":"v@example.org"}`, "Old_Email"},
		{"/authmail/send/magic-link", `{"to":"a@example.org","token":"t","webhook_url":"https://h.example/x","Webhook_URL":"https://evil.example/"}`, "Webhook_URL"},
		{"/authmail/send/otp", `{"to":{"a":1,"a":2},"code":"1"}`, "a"}, // nested objects too
	} {
		r := post(t, tc.path, tc.body)
		expectError(t, r, 400, "invalid_json", tc.field)
		if !strings.Contains(r.str("message"), fmt.Sprintf("%q", tc.field)) {
			t.Errorf("%s: message %q does not name %q", tc.body, r.str("message"), tc.field)
		}
	}
	// unknown fields are still 422 with the field
	expectError(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1","colour":"red"}`), 422, "invalid_request", "colour")
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`))
}

// TestLocalRecipientsAreRefusedByDefault: domain literals, single-label
// domains and IP addresses written as domains would make the SMTP relay
// deliver to internal hosts; every recipient field refuses them unless
// allow_local_recipients is on.
func TestLocalRecipientsAreRefusedByDefault(t *testing.T) {
	load(t, config{Keys: "key app {env.AUTHMAIL_IT_KEY} {\n\t\t\tallow send otp verify-email email-change security-alert test\n\t\t\trate off\n\t\t}"})
	for _, addr := range []string{"user@[127.0.0.1]", "user@[192.168.1.1]", "user@localhost", "Ops <root@intranet>", "user@127.0.0.1", "user@10.0.0.1", "user@0x7f.1"} {
		send := func(field string) response {
			req := map[string]any{"to": "a@example.org", "subject": "s", "text_body": "b"}
			req[field] = []string{"ok@example.org", addr}
			return post(t, "/authmail/send", mustJSON(req))
		}
		for _, field := range []string{"to", "cc", "bcc"} {
			r := send(field)
			expectError(t, r, 422, "invalid_request", field)
			if !strings.Contains(r.str("message"), "allow_local_recipients") {
				t.Errorf("%s %s: message %q does not name the setting", field, addr, r.str("message"))
			}
		}
		expectError(t, post(t, "/authmail/send/otp", mustJSON(map[string]string{"to": addr, "code": "1"})), 422, "invalid_request", "to")
		expectError(t, post(t, "/authmail/send/verify-email", mustJSON(map[string]string{"to": addr, "token": "t"})), 422, "invalid_request", "to")
		expectError(t, post(t, "/authmail/send/email-change", mustJSON(map[string]string{"to": "new@example.org", "old_email": addr, "token": "t"})), 422, "invalid_request", "old_email")
		expectError(t, post(t, "/authmail/send/security-alert", mustJSON(map[string]string{"to": addr, "event": "password_changed"})), 422, "invalid_request", "to")
		expectError(t, post(t, "/authmail/test", mustJSON(map[string]string{"to": addr})), 422, "invalid_request", "to")
	}
	// reply_to is no recipient: the relay never connects to it
	expectSent(t, post(t, "/authmail/send", `{"to":"a@example.org","reply_to":"desk@helpdesk","subject":"s","text_body":"b"}`))

	load(t, config{Extra: "allow_local_recipients on"})
	m := expectSent(t, post(t, "/authmail/send/otp", `{"to":"root@localhost","code":"1"}`))
	if m.To[0] != "root@localhost" {
		t.Errorf("RCPT %v", m.To)
	}
	m = expectSent(t, post(t, "/authmail/send", `{"to":"a@example.org","bcc":"user@[127.0.0.1]","subject":"s","text_body":"b"}`))
	if len(m.To) != 2 || m.To[1] != "user@[127.0.0.1]" {
		t.Errorf("RCPT %v", m.To)
	}
}

// TestSecurityGlobalOptionsAdapt keeps the global-option snippets of
// SECURITY.md (trusted_proxies_strict, the body read timeout) valid
// Caddyfile that does what the text says.
func TestSecurityGlobalOptionsAdapt(t *testing.T) {
	doc, err := os.ReadFile("../SECURITY.md")
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, block := range strings.Split(string(doc), "```caddyfile\n")[1:] {
		block, _, _ = strings.Cut(block, "```")
		if strings.HasPrefix(strings.TrimSpace(block), "{") {
			found = append(found, block)
		}
	}
	want := []string{`"trusted_proxies_strict":1`, `"read_timeout":10000000000`}
	if len(found) != len(want) {
		t.Fatalf("SECURITY.md has %d global-option snippets, want %d", len(found), len(want))
	}
	for i, block := range found {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(block+"\n:8080 {\n\trespond ok\n}\n"), nil)
		if err != nil {
			t.Fatalf("snippet %d does not adapt: %v\n%s", i, err, block)
		}
		if !strings.Contains(string(out), want[i]) {
			t.Errorf("snippet %d adapts without %s: %s", i, want[i], out)
		}
	}
}
