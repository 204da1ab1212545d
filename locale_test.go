package authmail

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestParseLocale(t *testing.T) {
	for in, want := range map[string]string{
		"ko": "ko", "KO": "ko", "de-at": "de-AT", "de-AT": "de-AT", "zh-Hant-TW": "zh-Hant-TW", "es-419": "es-419",
		"iw": "he", "en-US-u-co-phonebk": "en-US-u-co-phonebk",
		// well-formed, unknown subtags dropped: these fall back
		"xx": "und", "de-BX": "de",
	} {
		got, err := parseLocale(in, false)
		if err != nil || got != want {
			t.Errorf("parseLocale(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"":                       "is empty",
		"ko_KR":                  "not '_'",
		"ko-KR.UTF-8":            "must be a BCP 47 language tag such as ko or de-AT",
		"toolongtag":             "must be a BCP 47 language tag",
		"de-AT-":                 "must be a BCP 47 language tag",
		"*":                      "must be a BCP 47 language tag",
		"a":                      "must be a BCP 47 language tag",
		strings.Repeat("a-", 40): "longer than 64",
	} {
		if _, err := parseLocale(in, false); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("parseLocale(%q) error %v, want one containing %q", in, err, want)
		}
	}
	if _, err := parseLocale("xx", true); err == nil || !strings.Contains(err.Error(), "'xx' is not a known language tag") {
		t.Errorf("strict parseLocale(xx): %v", err)
	}
}

func TestLocaleChain(t *testing.T) {
	for _, tc := range []struct{ tag, def, want string }{
		{"de-AT", "en", "de-AT de en"},
		{"de-AT", "ko", "de-AT de ko en"},
		{"zh-Hant-TW", "en", "zh-Hant-TW zh-Hant zh en"},
		{"en-US-u-co-phonebk", "en", "en-US-u-co-phonebk en-US en"},
		{"", "ko-KR", "ko-KR ko en"},
		{"und", "en", "en"},
		{"x-private", "en", "en"},
	} {
		if got := strings.Join(localeChain(tc.tag, tc.def), " "); got != tc.want {
			t.Errorf("localeChain(%q, %q) = %q, want %q", tc.tag, tc.def, got, tc.want)
		}
	}
}

func TestLocalePhrases(t *testing.T) {
	for m, want := range map[int]string{1: "1분", 10: "10분", 60: "1시간", 90: "90분", 1440: "24시간", 2880: "2일", 3000: "50시간"} {
		if got := koreanMinutes(m); got != want {
			t.Errorf("koreanMinutes(%d) = %q, want %q", m, got, want)
		}
	}
	for in, want := range map[string]string{
		"2026-12-03T15:04:05Z":      "2026년 12월 3일 오후 3:04 (UTC)",
		"2026-01-02T00:30:00Z":      "2026년 1월 2일 오전 12:30 (UTC)",
		"2026-01-02T12:05:00Z":      "2026년 1월 2일 오후 12:05 (UTC)",
		"2026-01-02T09:59:00+09:00": "2026년 1월 2일 오전 12:59 (UTC)",
	} {
		tm, _ := time.Parse(time.RFC3339, in)
		if got := textFor("ko-KR").date(tm); got != want {
			t.Errorf("Korean date of %s = %q, want %q", in, got, want)
		}
	}
	tm, _ := time.Parse(time.RFC3339, "2026-12-03T15:04:05Z")
	if got := textFor("fr").date(tm); got != "3 December 2026, 15:04 UTC" {
		t.Errorf("a locale without phrases uses en's: %q", got)
	}
}

// sampleData is a request's data for a flow, before localization.
func sampleData(flow, event string) *templateData {
	d := &templateData{Flow: flow, AppName: "Acme & Co", UserName: "홍길동 <b>", Email: "user@example.com",
		ExpiresInMinutes: 10, ExpiresIn: humanMinutes(10), NewEmail: "new@example.com", NewEmailMasked: "n***@example.com"}
	switch flow {
	case "otp":
		d.Code = "CODE-7731"
	case "security-alert":
		d.ExpiresInMinutes, d.ExpiresIn = 0, ""
		d.Event = event
		d.IP, d.Location, d.UserAgent = "203.0.113.7", "서울 <KR>", "Firefox"
		d.occurredAt = time.Date(2026, 12, 3, 15, 4, 0, 0, time.UTC)
		d.OccurredAt = d.occurredAt.Format("2 January 2006, 15:04 UTC")
	case "email-change-notice":
	default:
		d.Link = "https://app.example.com/x?a=1&token=TOKEN-7731"
	}
	return d
}

// TestBuiltinLocalesRenderEveryFlow renders every flow (every event of
// the security alert) in every built-in locale and checks the
// guarantees of the templates in each: the code and the link are shown,
// never in the subject; values are HTML-escaped; the greeting, expiry and
// footer are the locale's.
func TestBuiltinLocalesRenderEveryFlow(t *testing.T) {
	set, err := loadTemplates("")
	if err != nil {
		t.Fatal(err)
	}
	greeting := map[string]string{"en": "Hi 홍길동 <b>,", "ko": "안녕하세요, 홍길동 <b>님."}
	footer := map[string]string{"en": "This message was sent by Acme & Co to user@example.com.",
		"ko": "이 메일은 Acme & Co에서 user@example.com 주소로 발송되었습니다."}
	expiry := map[string]string{"en": "expires in 10 minutes", "ko": "10분 후에 만료"}
	for _, loc := range []string{"en", "ko"} {
		for _, flow := range templateFlows {
			events := []string{""}
			if flow == "security-alert" {
				events = securityEventNames()
			}
			for _, ev := range events {
				d := sampleData(flow, ev)
				out, used, err := set.renderIn(flow, loc, "en", d)
				if err != nil || used != loc {
					t.Fatalf("%s %s %s: locale %q, %v", loc, flow, ev, used, err)
				}
				name := loc + " " + flow + " " + ev
				if out.subject == "" || strings.Contains(out.subject, "7731") || strings.Contains(out.subject, "http") {
					t.Errorf("%s: subject %q", name, out.subject)
				}
				if !strings.HasPrefix(out.text, "Acme & Co\n\n"+greeting[loc]+"\n\n") || !strings.Contains(out.text, footer[loc]) {
					t.Errorf("%s: text greeting or footer:\n%s", name, out.text)
				}
				if !strings.Contains(out.html, `<html lang="`+loc+`">`) || strings.Contains(out.html, "홍길동 <b>") ||
					!strings.Contains(out.html, "홍길동 &lt;b&gt;") || !strings.Contains(out.html, "Acme &amp; Co") {
					t.Errorf("%s: HTML lang or escaping", name)
				}
				if d.Code != "" && (!strings.Contains(out.text, "    CODE-7731\n") || !strings.Contains(out.html, ">CODE-7731</p>")) {
					t.Errorf("%s: code not shown", name)
				}
				if d.Link != "" && (!strings.Contains(out.text, "\n"+d.Link+"\n") ||
					strings.Count(out.html, `https://app.example.com/x?a=1&amp;token=TOKEN-7731`) < 3) {
					t.Errorf("%s: link not shown as text, button and fallback", name)
				}
				if d.ExpiresInMinutes > 0 && flow != "email-change-notice" && (!strings.Contains(out.text, expiry[loc]) || !strings.Contains(out.html, expiry[loc])) {
					t.Errorf("%s: no expiry %q:\n%s", name, expiry[loc], out.text)
				}
				if flow == "security-alert" {
					title := textFor(loc).eventTitle(ev)
					if !strings.Contains(out.subject, title) || !strings.Contains(out.text, title+"\n") {
						t.Errorf("%s: event title %q missing from subject %q or text", name, title, out.subject)
					}
				}
				if loc == "ko" && (strings.Contains(out.text, "If you") || strings.Contains(out.text, "expires")) {
					t.Errorf("%s: English in the Korean text:\n%s", name, out.text)
				}
			}
		}
	}
	// exact Korean wording of a few lines
	out, _, _ := set.renderIn("otp", "ko", "en", sampleData("otp", ""))
	for _, want := range []string{"아래 인증 코드를 입력해 주세요.\n\n    CODE-7731\n\n이 코드는 10분 후에 만료됩니다.",
		"본인이 요청하지 않았다면 이 메일을 무시하셔도 됩니다."} {
		if !strings.Contains(out.text, want) {
			t.Errorf("Korean OTP text lacks %q:\n%s", want, out.text)
		}
	}
	if out.subject != "[Acme & Co] 인증 코드 안내" {
		t.Errorf("Korean OTP subject %q", out.subject)
	}
	out, _, _ = set.renderIn("security-alert", "ko", "en", sampleData("security-alert", "new_login"))
	for _, want := range []string{"일시: 2026년 12월 3일 오후 3:04 (UTC)\nIP 주소: 203.0.113.7\n위치: 서울 <KR>\n기기: Firefox",
		"Acme & Co 계정에 새로운 로그인이 있었습니다."} {
		if !strings.Contains(out.text, want) {
			t.Errorf("Korean alert text lacks %q:\n%s", want, out.text)
		}
	}
	if out.subject != "[Acme & Co] 보안 알림: 새로운 로그인이 감지되었습니다" {
		t.Errorf("Korean alert subject %q", out.subject)
	}
	// the English alert keeps today's date format
	out, _, _ = set.renderIn("security-alert", "", "en", sampleData("security-alert", "new_login"))
	if !strings.Contains(out.text, "When:       3 December 2026, 15:04 UTC") {
		t.Errorf("English alert date:\n%s", out.text)
	}
}

func TestLocaleResolution(t *testing.T) {
	dir := t.TempDir()
	writeTemplate(t, dir, "otp.de.subject", "Ihr Code für {{.AppName}} ({{.Locale}})")
	writeTemplate(t, dir, "magic-link.ko.subject", "{{.AppName}} 로그인 ({{.ExpiresIn}})")
	set, err := loadTemplates(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := sampleData("otp", "")
	for _, tc := range []struct{ flow, tag, def, locale, subject string }{
		{"otp", "de-AT", "en", "de", "Ihr Code für Acme & Co (de)"},
		{"otp", "de", "ko", "de", "Ihr Code für Acme & Co (de)"},
		{"otp", "fr", "en", "en", "Your Acme & Co verification code"},
		{"otp", "fr", "ko", "ko", "[Acme & Co] 인증 코드 안내"},
		{"otp", "und", "de-CH", "de", "Ihr Code für Acme & Co (de)"},
		{"otp", "en-GB", "ko", "en", "Your Acme & Co verification code"},
		{"otp", "", "ko-KR", "ko", "[Acme & Co] 인증 코드 안내"},
		{"password-reset", "de-AT", "en", "en", "Reset your Acme & Co password"},
		// a custom subject over the built-in Korean body
		{"magic-link", "ko-KR", "en", "ko", "Acme & Co 로그인 (10분)"},
	} {
		dd := sampleData(tc.flow, "")
		out, loc, err := set.renderIn(tc.flow, tc.tag, tc.def, dd)
		if err != nil || loc != tc.locale || out.subject != tc.subject {
			t.Errorf("%s %q (default %s): locale %q subject %q, %v; want %q %q", tc.flow, tc.tag, tc.def, loc, out.subject, err, tc.locale, tc.subject)
		}
	}
	// de has only a subject: the body comes from the next in line, en
	out, _, _ := set.renderIn("otp", "de-AT", "en", d)
	if !strings.Contains(out.text, "Use this code to continue") || !strings.Contains(out.html, `<html lang="de">`) {
		t.Errorf("de body:\n%s", out.text)
	}
	// the Korean body of the custom Korean subject
	out, _, _ = set.renderIn("magic-link", "ko", "en", sampleData("magic-link", ""))
	if !strings.Contains(out.text, "아래 링크를 열면 Acme & Co에 로그인됩니다.") {
		t.Errorf("ko body:\n%s", out.text)
	}
	if d.Locale != "" || d.ExpiresIn != "10 minutes" {
		t.Errorf("renderIn changed the caller's data: %+v", d)
	}
}

func TestLocaleTemplateFiles(t *testing.T) {
	for name, tc := range map[string]struct {
		files map[string]string
		want  string
	}{
		"unknown locale": {map[string]string{"otp.xx.subject": "x"}, `unrecognized template file "otp.xx.subject"`},
		"bad syntax":     {map[string]string{"otp.ko_KR.subject": "x"}, `unrecognized template file "otp.ko_KR.subject"`},
		"unknown flow":   {map[string]string{"login.ko.subject": "x"}, `unrecognized template file "login.ko.subject"`},
		"same template":  {map[string]string{"otp.subject": "a", "otp.en.subject": "b"}, "are the same template"},
		"same locale":    {map[string]string{"otp.de-AT.subject": "a", "otp.de-at.subject": "b"}, "are the same template"},
		// the self-test covers every locale
		"ko code lost":     {map[string]string{"otp.ko.txt": `{{define "content"}}코드 없음{{end}}`}, "otp.ko.txt does not show the code"},
		"de link lost":     {map[string]string{"verify-email.de.html": `{{define "content"}}Hallo{{end}}`}, "verify-email.de.html does not show the link"},
		"ko code subject":  {map[string]string{"otp.ko.subject": "코드 {{.Code}}"}, "can't evaluate field Code"},
		"ko layout broken": {map[string]string{"layout.ko.txt": `{{template "content" .}}{{index .UserName 99}}`}, "index out of range"},
		"de no content":    {map[string]string{"otp.de.html": `{{.Code}}`}, `otp.de.html must define a "content" template`},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			for f, c := range tc.files {
				writeTemplate(t, dir, f, c)
			}
			_, err := loadTemplates(dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	// a locale layout alone: loads, and no flow is in that locale
	dir := t.TempDir()
	writeTemplate(t, dir, "layout.fr.txt", `{{template "content" .}}`)
	set, err := loadTemplates(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, loc, _ := set.renderIn("otp", "fr", "en", sampleData("otp", "")); loc != "en" || set.hasLocale("fr") {
		t.Errorf("a layout alone made fr a locale: %q", loc)
	}
}

// TestRequestLocale: the locale field of the templated flows, through
// the handler: the answer names the locale used, an invalid tag is a 422
// naming the field, and /send takes no locale.
func TestRequestLocale(t *testing.T) {
	h := provisionedHandler(t)
	auth := []string{"Authorization: Bearer 0123456789abcdef0123", "Content-Type: application/json"}
	for body, want := range map[string]string{
		`{"to":"a@example.com","code":"1","locale":"ko-KR"}`:                           "ko",
		`{"to":"a@example.com","code":"1","locale":"fr"}`:                              "en",
		`{"to":"a@example.com","code":"1"}`:                                            "en",
		`{"to":"a@example.com","event":"password_changed","locale":"ko"}`:              "ko",
		`{"to":"a@example.com","token":"t","old_email":"o@example.com","locale":"KO"}`: "ko",
	} {
		path := "/authmail/send/otp"
		if strings.Contains(body, "event") {
			path = "/authmail/send/security-alert"
		} else if strings.Contains(body, "token") {
			path = "/authmail/send/email-change"
		}
		rec, _ := serve(t, h, "POST", path, body, auth...)
		var resp map[string]any
		_ = json.Unmarshal(rec.Body.Bytes(), &resp)
		if rec.Code != 200 || resp["locale"] != want {
			t.Errorf("%s: %d %s, want locale %q", body, rec.Code, rec.Body, want)
		}
	}
	for path, body := range map[string]string{
		"/authmail/send/otp":            `{"to":"a@example.com","code":"1","locale":"ko_KR"}`,
		"/authmail/send/magic-link":     `{"to":"a@example.com","token":"t","locale":"de-"}`,
		"/authmail/send/security-alert": `{"to":"a@example.com","event":"new_login","locale":"*"}`,
	} {
		rec, _ := serve(t, h, "POST", path, body, auth...)
		var resp map[string]any
		_ = json.Unmarshal(rec.Body.Bytes(), &resp)
		if rec.Code != 422 || resp["error_code"] != "invalid_request" || resp["field"] != "locale" {
			t.Errorf("%s %s: %d %s", path, body, rec.Code, rec.Body)
		}
	}
	rec, _ := serve(t, h, "POST", "/authmail/send", `{"to":"a@example.com","subject":"s","text_body":"b","locale":"ko"}`, auth...)
	if rec.Code != 400 && rec.Code != 422 {
		t.Errorf("/send with a locale: %d %s", rec.Code, rec.Body)
	}
	// the configured default
	h = provisionedHandler(t, func(h *Handler) { h.Locale = "ko-KR" })
	rec, _ = serve(t, h, "POST", "/authmail/send/otp", `{"to":"a@example.com","code":"1","locale":"fr"}`, auth...)
	if !strings.Contains(rec.Body.String(), `"locale":"ko"`) {
		t.Errorf("default ko-KR: %s", rec.Body)
	}
	// /status shows the resolved default
	h = provisionedHandler(t, func(h *Handler) { h.Locale = "KO-kr"; h.Keys[0].Allow = []string{"status"} })
	rec, _ = serve(t, h, "GET", "/authmail/status", "", auth[0])
	var st struct {
		Settings map[string]any `json:"settings"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil || rec.Code != 200 || st.Settings["locale"] != "ko-KR" {
		t.Errorf("/status locale: %d %v %s", rec.Code, err, rec.Body)
	}
	for _, bad := range []string{"ko_KR", "xx", "und", "x-private"} {
		h := &Handler{Locale: bad}
		if err := checkConfigLocale(h.Locale); err == nil || !strings.HasPrefix(err.Error(), "locale ") {
			t.Errorf("config locale %q: %v", bad, err)
		}
	}
}

func TestCaddyfileLocale(t *testing.T) {
	base := "authmail {\n\tcapture /tmp/x\n\tfrom a@example.com\n\tkey app 0123456789abcdef0123\n"
	h := &Handler{}
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(base + "\tlocale de-at\n}")); err != nil || h.Locale != "de-at" {
		t.Fatalf("locale de-at: %v %q", err, h.Locale)
	}
	for in, want := range map[string]string{
		"\tlocale\n":                 "wrong argument count",
		"\tlocale ko de\n":           "wrong argument count",
		"\tlocale ko_KR\n":           "locale must be a BCP 47 language tag such as ko or de-AT (subtags are separated by '-', not '_')",
		"\tlocale xx\n":              "locale 'xx' is not a known language tag",
		"\tlocale und\n":             "locale must name a language",
		"\tlocale ko\n\tlocale en\n": "locale",
	} {
		h := &Handler{}
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(base + in + "}"))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want one containing %q", in, err, want)
		}
	}
}

// FuzzLocales feeds arbitrary locale tags and hostile values through
// resolution and the built-in templates of every locale: a tag is either
// refused or resolves to a locale that has the flow, rendering never
// fails, values never become markup, and the subject never depends on
// the code or the link.
func FuzzLocales(f *testing.F) {
	for _, s := range []string{"ko", "KO-kr", "de-AT", "zh-Hant-TW", "en-US-u-co-phonebk-x-y", "ko_KR", "und", "x-foo", "i-klingon", "-", "ko-", "\u202eko"} {
		f.Add(s, `<script>alert(1)</script>`, "SECRET-CODE-123", "https://app.example.com/x?t=SECRET-TOKEN")
	}
	set, err := loadTemplates("")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, tag, name, code, link string) {
		loc, aerr := checkLocale(tag)
		if aerr != nil {
			if aerr.Field != "locale" || aerr.Status != 422 {
				t.Fatalf("%q: %+v", tag, aerr)
			}
			return
		}
		for _, flow := range templateFlows {
			d := &templateData{Flow: flow, AppName: name, UserName: name, Email: "a@example.com", Code: code, Link: link,
				ExpiresInMinutes: 10, Event: "new_login", IP: name, UserAgent: name, Location: name,
				NewEmail: name, NewEmailMasked: name, occurredAt: time.Unix(1, 0)}
			out, used, err := set.renderIn(flow, loc, "ko", d)
			if err != nil || (used != "en" && used != "ko") {
				t.Fatalf("%s %q: locale %q, %v", flow, tag, used, err)
			}
			if strings.Contains(strings.ToLower(out.html), "<script") {
				t.Fatalf("%s: markup from a value reached the HTML part", flow)
			}
			other := *d
			other.Code, other.Link = "OTHER-CODE-7", "https://app.example.com/other?t=OTHER-TOKEN"
			if out2, _, _ := set.renderIn(flow, loc, "ko", &other); out.subject != out2.subject {
				t.Fatalf("%s: the code or the link reached the subject", flow)
			}
		}
	})
}

// TestFlowTable: the lists derived from flowTable are the ones the code
// had before it (order included, which error messages and /status
// show), and every templated flow has built-in English and Korean files.
func TestFlowTable(t *testing.T) {
	for name, tc := range map[string]struct{ got, want []string }{
		"sendPerms":          {sendPerms, []string{"send", "otp", "magic-link", "password-reset", "verify-email", "email-change", "security-alert"}},
		"verifyPerms":        {verifyPerms, []string{"verify"}},
		"adminPerms":         {adminPerms, []string{"status", "test", "admin", "preview"}},
		"recipientRateFlows": {recipientRateFlows, []string{"otp", "magic-link", "password-reset", "verify-email", "email-change", "security-alert"}},
		"linkFlows":          {linkFlows, []string{"magic-link", "password-reset", "verify-email", "email-change"}},
		"templateFlows":      {templateFlows, []string{"otp", "magic-link", "password-reset", "verify-email", "email-change", "email-change-notice", "security-alert"}},
	} {
		if strings.Join(tc.got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%s = %v, want %v", name, tc.got, tc.want)
		}
	}
	want := map[string]struct {
		kind   endpointKind
		expiry int
		perm   string
	}{
		"/health": {kindHealth, 0, ""}, "/send": {kindSend, 0, "send"}, "/send/otp": {kindOTP, 10, "otp"},
		"/send/magic-link": {kindLink, 15, "magic-link"}, "/send/password-reset": {kindLink, 60, "password-reset"},
		"/send/verify-email": {kindLink, 1440, "verify-email"}, "/send/email-change": {kindLink, 1440, "email-change"},
		"/send/security-alert": {kindAlert, 0, "security-alert"}, "/status": {kindAdminStatus, 0, "status"},
		"/test": {kindTest, 0, "test"}, "/verify/otp": {kindVerifyOTP, 0, "verify"}, "/verify/token": {kindVerifyToken, 0, "verify"},
	}
	// the console's endpoints register themselves beside the flows
	console := map[string]endpointKind{"/openapi.json": kindOpenAPI, "/messages": kindMessages, "/preview": kindPreview}
	for path, k := range console {
		if e := endpoints[path]; e == nil || e.kind != k {
			t.Errorf("console endpoint %s = %+v", path, e)
		}
	}
	if len(endpoints) != len(want)+len(console) {
		t.Errorf("%d endpoints, want %d", len(endpoints), len(want)+len(console))
	}
	for path, w := range want {
		e := endpoints[path]
		if e == nil || e.kind != w.kind || e.expiry != w.expiry || e.perm != w.perm || e.flow != strings.TrimPrefix(strings.TrimPrefix(path, "/send/"), "/") && path != "/verify/otp" && path != "/verify/token" {
			t.Errorf("endpoint %s = %+v, want %+v", path, e, w)
		}
	}
	if statusEndpoint == nil || statusEndpoint.path != "/messages/" || statusEndpoint.kind != kindStatus || statusEndpoint.perm != "" {
		t.Errorf("statusEndpoint = %+v", statusEndpoint)
	}
	for _, flow := range linkFlows {
		if linkPathOf(flow) != flow {
			t.Errorf("default link path of %s = %q", flow, linkPathOf(flow))
		}
	}
	for _, flow := range templateFlows {
		for _, loc := range []string{"", ".ko"} {
			for _, ext := range []string{".subject", ".txt", ".html"} {
				if _, err := defaultTemplates.ReadFile("templates/" + flow + loc + ext); err != nil {
					t.Errorf("no built-in %s%s%s", flow, loc, ext)
				}
			}
		}
	}
}
