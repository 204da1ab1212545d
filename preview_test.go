package authmail

import (
	"html"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const previewKey = "preview-key-0123456789abcdef"

func withPreviewKey(t testing.TB) func(*Handler) {
	t.Setenv("AUTHMAIL_UNIT_PREVIEW_KEY", previewKey)
	return func(h *Handler) {
		h.Keys = append(h.Keys, Key{ID: "dev", Secret: "{env.AUTHMAIL_UNIT_PREVIEW_KEY}", Allow: []string{"preview"}, Rate: "off"})
	}
}

// TestPreviewPage: the page lists every flow rendered from the live
// templates, escapes what the query puts in, runs no script (CSP and
// sandboxed srcdoc iframes), and takes the key as bearer or Basic
// password; keys without allow preview get 403.
func TestPreviewPage(t *testing.T) {
	h := provisionedHandler(t, withPreviewKey(t))
	rec, _ := call(t, h, "GET", "/authmail/preview?user_name=%3Cscript%3Ealert(1)%3C%2Fscript%3E&code=777111", "",
		"Authorization: Bearer "+previewKey)
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("%d %s %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
	if csp := rec.Header().Get("Content-Security-Policy"); csp != previewCSP || !strings.HasPrefix(csp, "default-src 'none';") {
		t.Fatalf("CSP %q", csp)
	}
	page := rec.Body.String()
	// every flow in every locale the templates have (en and ko built in)
	for _, f := range templateFlows {
		for _, l := range []string{"en", "ko"} {
			if !strings.Contains(page, `data-flow="`+f+`" data-locale="`+l+`"`) {
				t.Errorf("flow %s in %s is not on the page", f, l)
			}
		}
	}
	ko := page[strings.Index(page, `data-flow="otp" data-locale="ko"`):]
	ko = ko[:strings.Index(ko, "</section>")]
	if !strings.Contains(ko, "인증 코드 안내") || !strings.Contains(ko, `lang="ko"`) {
		t.Errorf("the Korean OTP section does not show the Korean template: %s", ko)
	}
	if strings.Contains(page, "<script") || strings.Contains(page, "http://") || strings.Contains(page, "src=\"http") {
		t.Fatal("the page holds a script or an external resource")
	}
	if !strings.Contains(page, "&lt;script&gt;alert(1)&lt;/script&gt;") {
		t.Fatal("the injected user_name is not shown escaped")
	}
	if n := strings.Count(page, "<iframe sandbox "); n != 2*len(templateFlows) {
		t.Fatalf("%d sandboxed iframes", n)
	}
	// the srcdoc holds the rendered HTML part, with the code
	i := strings.Index(page, `data-flow="otp"`)
	otpSection := page[i : i+strings.Index(page[i:], "</section>")]
	_, src, _ := strings.Cut(otpSection, `srcdoc="`)
	src, _, _ = strings.Cut(src, `"`)
	if !strings.Contains(html.UnescapeString(src), "777111") || !strings.Contains(otpSection, "<pre data-text>") {
		t.Fatalf("the OTP section lacks the code in its HTML part: %s", otpSection)
	}

	// Basic authentication with the key as the password
	req := apiRequest("GET", "/authmail/preview?flow=magic-link&locale=en", nil)
	req.Header.Del("Authorization")
	req.SetBasicAuth("anyone", previewKey)
	rec, _ = serveRequest(t, h, req)
	if rec.Code != 200 || strings.Count(rec.Body.String(), "data-flow=") != 1 {
		t.Fatalf("basic: %d", rec.Code)
	}
	req = apiRequest("GET", "/authmail/preview", nil)
	req.Header.Del("Authorization")
	rec, _ = serveRequest(t, h, req)
	if rec.Code != 401 || !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Basic ") {
		t.Fatalf("no key: %d %q", rec.Code, rec.Header().Get("WWW-Authenticate"))
	}
	// the app key has no preview permission; Basic is not taken elsewhere
	rec, out := call(t, h, "GET", "/authmail/preview", "")
	if rec.Code != 403 || out["error_code"] != "forbidden" {
		t.Fatalf("app key: %d %s", rec.Code, rec.Body)
	}
	req = apiRequest("POST", "/authmail/send/otp", strings.NewReader(otp("jane@example.org")))
	req.Header.Del("Authorization")
	req.SetBasicAuth("x", unitKey)
	if rec, _ = serveRequest(t, h, req); rec.Code != 401 || rec.Header().Get("WWW-Authenticate") != "Bearer" {
		t.Fatalf("basic on /send/otp: %d", rec.Code)
	}
	for q, field := range map[string]string{"?flow=nope": "flow", "?colour=red": "colour", "?user_name=a%0Ab": "user_name", "?event=x": "event"} {
		rec, out := call(t, h, "GET", "/authmail/preview"+q, "", "Authorization: Bearer "+previewKey)
		if rec.Code != 422 || out["field"] != field {
			t.Errorf("%s: %d %s", q, rec.Code, rec.Body)
		}
	}
}

// TestPreviewEML downloads a flow as a message.
func TestPreviewEML(t *testing.T) {
	h := provisionedHandler(t, withPreviewKey(t))
	rec, _ := call(t, h, "GET", "/authmail/preview/otp.eml?code=313131", "", "Authorization: Bearer "+previewKey)
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "message/rfc822" ||
		rec.Header().Get("Content-Disposition") != `attachment; filename="otp.eml"` {
		t.Fatalf("%d %v", rec.Code, rec.Header())
	}
	msg, parts := parseMessage(t, rec.Body.Bytes())
	if !strings.Contains(msg.Header.Get("To"), "jane@example.com") || len(parts) < 2 || !strings.Contains(string(parts[0].Body), "313131") {
		t.Fatalf("message %v", msg.Header)
	}
	rec, out := call(t, h, "GET", "/authmail/preview/nope.eml", "", "Authorization: Bearer "+previewKey)
	if rec.Code != 404 || out["error_code"] != "not_found" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

// TestPreviewShowsTemplateErrors: a custom template that fails for some
// data shows its error on the page, not a 500.
func TestPreviewShowsTemplateErrors(t *testing.T) {
	dir := t.TempDir()
	tpl := `{{define "content"}}{{if eq .UserName "boom"}}{{index .Email 99999}}{{end}}Code {{.Code}}{{end}}`
	if err := os.WriteFile(filepath.Join(dir, "otp.txt"), []byte(tpl), 0o600); err != nil {
		t.Fatal(err)
	}
	h := provisionedHandler(t, withPreviewKey(t), func(h *Handler) { h.Templates = dir })
	rec, _ := call(t, h, "GET", "/authmail/preview?user_name=boom", "", "Authorization: Bearer "+previewKey)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	page := rec.Body.String()
	if !strings.Contains(page, `<div class="error" data-error="otp">rendering otp.txt:`) || !strings.Contains(page, `data-flow="magic-link"`) {
		t.Fatalf("no error shown: %s", page)
	}
	rec, out := call(t, h, "GET", "/authmail/preview/otp.eml?user_name=boom", "", "Authorization: Bearer "+previewKey)
	if rec.Code != 422 || out["error_code"] != "template_error" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

// TestPreviewMailbox: in capture mode the page lists the captured
// messages, newest first, each rendered like a preview with its links.
func TestPreviewMailbox(t *testing.T) {
	// the mail is app's: the preview key sees it as its site's admin
	// (TestDevMailboxIsScoped has the other keys)
	h := provisionedHandler(t, withPreviewKey(t), withoutLimits, func(h *Handler) { h.Keys[len(h.Keys)-1].Allow = []string{"preview", "admin"} })
	rec, _ := call(t, h, "GET", "/authmail/preview", "", "Authorization: Bearer "+previewKey)
	if !strings.Contains(rec.Body.String(), "data-mailbox-empty") {
		t.Fatal("no empty mailbox note")
	}
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org")); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if rec, _ := call(t, h, "POST", "/authmail/send/magic-link", `{"to":"jane@example.org","token":"tok-<b>-1"}`); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	rec, _ = call(t, h, "GET", "/authmail/preview?flow=otp", "", "Authorization: Bearer "+previewKey)
	page := rec.Body.String()
	if n := strings.Count(page, "data-captured="); n != 2 {
		t.Fatalf("%d captured messages on the page", n)
	}
	first := page[strings.Index(page, "data-captured="):]
	if !strings.Contains(first, `<a data-link href="https://app.example.com/magic-link?token=tok-%3Cb%3E-1"`) {
		t.Fatalf("the newest captured message (the magic link) comes first with its link: %s", first[:min(len(first), 1500)])
	}
	if !strings.Contains(page, "123456") {
		t.Fatal("the captured OTP message is not shown")
	}
}
