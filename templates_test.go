package authmail

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestDefaultTemplatesRenderEveryFlow(t *testing.T) {
	set, err := loadTemplates("")
	if err != nil {
		t.Fatal(err)
	}
	d := &templateData{Flow: "otp", AppName: "Acme & Co", UserName: `<script>alert("x")</script>`, Email: "jane@example.com",
		Code: "<b>123</b>", ExpiresInMinutes: 10, ExpiresIn: "10 minutes"}
	out, err := set.render("otp", d)
	if err != nil {
		t.Fatal(err)
	}
	if out.subject != "Your Acme & Co verification code" {
		t.Errorf("subject = %q", out.subject)
	}
	if strings.Contains(out.html, "<script>") || !strings.Contains(out.html, "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") {
		t.Error("user_name is not HTML-escaped in the HTML part")
	}
	if strings.Contains(out.html, "<b>123</b>") || !strings.Contains(out.html, "&lt;b&gt;123&lt;/b&gt;") {
		t.Error("code is not HTML-escaped in the HTML part")
	}
	if !strings.Contains(out.html, "Acme &amp; Co") {
		t.Error("app name is not HTML-escaped")
	}
	if !strings.Contains(out.text, "    <b>123</b>\n") || !strings.Contains(out.text, "Hi <script>") {
		t.Errorf("text part should carry values verbatim:\n%s", out.text)
	}
	if !strings.HasPrefix(out.text, "Acme & Co\n\nHi ") || strings.Contains(out.text, "\n\n\n") {
		t.Errorf("text part layout:\n%q", out.text)
	}
	if !strings.Contains(out.text, "expires in 10 minutes") || !strings.Contains(out.text, "did not request") {
		t.Errorf("text part lacks expiry or the did-not-request line:\n%s", out.text)
	}

	link := "https://app.example.com/reset?a=1&token=abc"
	for _, flow := range []string{"magic-link", "password-reset", "verify-email", "email-change"} {
		out, err := set.render(flow, &templateData{Flow: flow, AppName: "Acme", Email: "j@example.com", Link: link, ExpiresIn: "1 hour"})
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out.subject, "abc") || strings.Contains(out.subject, "http") {
			t.Errorf("%s: subject %q carries the link", flow, out.subject)
		}
		if !strings.Contains(out.text, "\n"+link+"\n") {
			t.Errorf("%s: text part lacks the plain link on its own line", flow)
		}
		if !strings.Contains(out.html, `href="https://app.example.com/reset?a=1&amp;token=abc"`) {
			t.Errorf("%s: HTML lacks the button link", flow)
		}
		if strings.Count(out.html, "https://app.example.com/reset?a=1&amp;token=abc") < 3 {
			t.Errorf("%s: HTML should show the button and the plain-link fallback", flow)
		}
		if !strings.Contains(out.text, "expires in 1 hour") {
			t.Errorf("%s: no expiry line", flow)
		}
	}
	// a javascript: link can never become a live href
	out, _ = set.render("magic-link", &templateData{Flow: "magic-link", AppName: "A", Link: "javascript:alert(1)"})
	if strings.Contains(out.html, `href="javascript:`) {
		t.Error("javascript: URL rendered as href")
	}
}

func TestSecurityAlertTemplate(t *testing.T) {
	set, err := loadTemplates("")
	if err != nil {
		t.Fatal(err)
	}
	out, err := set.render("security-alert", &templateData{Flow: "security-alert", AppName: "Acme", Email: "j@example.com",
		Event: "two_factor_disabled", EventTitle: securityEvents["two_factor_disabled"].title,
		IP: "203.0.113.7", Location: "Paris <FR>", UserAgent: "Firefox", OccurredAt: "2 January 2026, 03:04 UTC"})
	if err != nil {
		t.Fatal(err)
	}
	if out.subject != "Acme security alert: Two-factor authentication was turned off" {
		t.Errorf("subject = %q", out.subject)
	}
	for _, want := range []string{"Two-factor authentication was turned off for your Acme account", "IP address: 203.0.113.7", "Location:   Paris <FR>", "Device:     Firefox", "When:       2 January 2026, 03:04 UTC", "If this was not you"} {
		if !strings.Contains(out.text, want) {
			t.Errorf("text lacks %q:\n%s", want, out.text)
		}
	}
	if !strings.Contains(out.html, "Paris &lt;FR&gt;") {
		t.Error("location is not escaped in HTML")
	}
}

func writeTemplate(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestTemplateOverrides(t *testing.T) {
	dir := t.TempDir()
	writeTemplate(t, dir, "otp.subject", "{{.AppName}}: sign-in code for {{.UserName}}")
	writeTemplate(t, dir, "otp.txt", `{{define "content"}}CODE={{.Code}}{{end}}`)
	writeTemplate(t, dir, "layout.html", `<html><body class="custom">{{template "content" .}}</body></html>`)
	writeTemplate(t, dir, "README.md", "not a template; ignored")
	set, err := loadTemplates(dir)
	if err != nil {
		t.Fatal(err)
	}
	out, err := set.render("otp", &templateData{Flow: "otp", AppName: "Acme", UserName: "Jane", Code: "4242"})
	if err != nil {
		t.Fatal(err)
	}
	if out.subject != "Acme: sign-in code for Jane" {
		t.Errorf("subject = %q", out.subject)
	}
	if !strings.Contains(out.text, "CODE=4242") {
		t.Errorf("text = %q", out.text)
	}
	if !strings.HasPrefix(out.html, `<html><body class="custom">`) || !strings.Contains(out.html, "4242") {
		t.Errorf("html = %q", out.html)
	}
	// flows without overrides keep the built-in content with the new layout
	out, err = set.render("magic-link", &templateData{Flow: "magic-link", AppName: "Acme", Link: "https://a.example/x"})
	if err != nil || !strings.Contains(out.html, `class="custom"`) || !strings.Contains(out.html, "Sign in to Acme") {
		t.Errorf("magic-link with custom layout: %v %q", err, out.html)
	}
}

func TestBrokenTemplatesFailTheLoad(t *testing.T) {
	cases := map[string]struct{ file, content, want string }{
		"syntax error":          {"otp.html", `{{define "content"}}{{.Code}`, "otp.html"},
		"secret in subject":     {"otp.subject", "Your code is {{.Code}}", "can't evaluate field Code"},
		"link in subject":       {"magic-link.subject", "Sign in: {{.Link}}", "can't evaluate field Link"},
		"unknown field":         {"password-reset.txt", `{{define "content"}}{{.Passwrd}}{{end}}`, "Passwrd"},
		"code not shown":        {"otp.txt", `{{define "content"}}Hello{{end}}`, "does not show the code"},
		"link not shown":        {"verify-email.html", `{{define "content"}}Hello{{end}}`, "does not show the link"},
		"no content block":      {"otp.html", `just text {{.Code}}`, `must define a "content" template`},
		"empty subject":         {"otp.subject", "  ", "empty subject"},
		"unknown template file": {"otp.htm.html", "x", "unrecognized template file"},
		"link in notice":        {"email-change-notice.txt", `{{define "content"}}{{.Link}}{{end}}`, ""},
		"runtime error":         {"layout.txt", `{{template "content" .}}{{index .UserName 99}}`, "index out of range"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			writeTemplate(t, dir, tc.file, tc.content)
			_, err := loadTemplates(dir)
			if tc.want == "" {
				// the notice has no link in its data; {{.Link}} renders empty
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	if _, err := loadTemplates(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("a missing templates directory must fail the load")
	}
}

func TestHumanMinutesAndMask(t *testing.T) {
	for m, want := range map[int]string{1: "1 minute", 10: "10 minutes", 60: "1 hour", 90: "90 minutes", 120: "2 hours",
		1440: "24 hours", 2880: "2 days", 4320: "3 days", 3000: "50 hours"} {
		if got := humanMinutes(m); got != want {
			t.Errorf("humanMinutes(%d) = %q, want %q", m, got, want)
		}
	}
	for in, want := range map[string]string{"jane@example.com": "j***@example.com", "ö@x.de": "ö***@x.de", "bad": "***"} {
		if got := maskAddress(in); got != want {
			t.Errorf("maskAddress(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestTemplateThatFailsAtRuntime: a custom template can pass the
// provision-time self-test and still fail for some request's data (here
// a user name shorter than the template slices). The request gets a 500
// internal_error, nothing is accepted or sent, and the log line names the
// flow and the template error without the code.
func TestTemplateThatFailsAtRuntime(t *testing.T) {
	dir := t.TempDir()
	writeTemplate(t, dir, "otp.txt", `{{define "content"}}Hello {{slice .UserName 0 5}}, your code is {{.Code}}{{end}}`)
	var capture string
	h := provisionedHandler(t, func(h *Handler) { h.Templates = dir; capture = h.Capture })
	core, logs := observer.New(zap.DebugLevel)
	h.logger = zap.New(core)
	auth := []string{"Authorization: Bearer 0123456789abcdef0123", "Content-Type: application/json"}

	rec, _ := serve(t, h, "POST", "/authmail/send/otp", `{"to":"a@example.com","user_name":"Jonathan","code":"RUNTIME-OK-1"}`, auth...)
	if rec.Code != 200 {
		t.Fatalf("a name the template can slice: %d %s", rec.Code, rec.Body)
	}
	rec, _ = serve(t, h, "POST", "/authmail/send/otp", `{"to":"b@example.com","user_name":"Al","code":"RUNTIME-SECRET-2"}`, auth...)
	var resp map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
		t.Fatalf("not JSON: %q", rec.Body)
	}
	if rec.Code != 500 || resp["error_code"] != "internal_error" || resp["message"] != "the message could not be rendered; see the server log" {
		t.Errorf("a name the template cannot slice: %d %v", rec.Code, resp)
	}
	if _, ok := resp["id"]; ok {
		t.Errorf("the failed request got a message id: %v", resp)
	}
	files, _ := os.ReadDir(capture)
	if len(files) != 1 {
		t.Errorf("capture holds %d messages, want only the first request's", len(files))
	}
	var found bool
	for _, e := range logs.All() {
		line, _ := json.Marshal(e.ContextMap())
		if strings.Contains(e.Message+string(line), "RUNTIME-SECRET-2") {
			t.Errorf("the code is in the log: %s %s", e.Message, line)
		}
		if e.Message == "rendering template failed" && e.ContextMap()["flow"] == "otp" &&
			strings.Contains(fmt.Sprint(e.ContextMap()["error"]), "slice") {
			found = true
		}
	}
	if !found {
		t.Errorf("no log line names the flow and the template error: %v", logs.All())
	}
}
