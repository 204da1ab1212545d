package integration

import (
	"html"
	"mime"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/mailtest"
)

// checkKoreanMail asserts what a Korean message looks like on the wire:
// UTF-8 parts, a subject sent as encoded words that decode to subject,
// the Korean greeting and footer in both parts, and the fragments.
func checkKoreanMail(t *testing.T, p *mailtest.Message, subject, greeting string, fragments ...string) {
	t.Helper()
	checkStandardHeaders(t, p)
	checkAlternative(t, p)
	raw := p.Header.Get("Subject")
	if !strings.HasPrefix(strings.ToUpper(raw), "=?UTF-8?") {
		t.Errorf("subject %q is not sent as UTF-8 encoded words", raw)
	}
	if dec, err := new(mime.WordDecoder).DecodeHeader(raw); err != nil || dec != subject {
		t.Errorf("subject decodes to %q (%v), want %q", dec, err, subject)
	}
	footer := "이 메일은 Example App에서 "
	for _, part := range []string{p.Text, html.UnescapeString(p.HTML)} {
		for _, want := range append([]string{greeting, footer, "발신 전용 메일이므로 회신하셔도 확인되지 않습니다."}, fragments...) {
			if !strings.Contains(part, want) {
				t.Errorf("%q lacks %q:\n%s", subject, want, part)
			}
		}
	}
	if !strings.Contains(p.HTML, `<html lang="ko">`) {
		t.Errorf("%q: HTML is not marked as Korean", subject)
	}
}

// TestKoreanMailThroughCaddy sends every templated flow with "locale":
// "ko" through a real Caddy and reads the delivered Korean mail.
func TestKoreanMailThroughCaddy(t *testing.T) {
	load(t, config{})
	ignore := "본인이 요청하지 않았다면 이 메일을 무시하셔도 됩니다."
	cases := []struct {
		path, body, subject string
		fragments           []string
	}{
		{"/send/otp", `{"to":"jimin@example.org","user_name":"지민","code":"` + secret("KO-493201") + `","locale":"ko"}`,
			"[Example App] 인증 코드 안내",
			[]string{"아래 인증 코드를 입력해 주세요.", "KO-493201", "이 코드는 10분 후에 만료됩니다.", ignore}},
		{"/send/magic-link", `{"to":"jimin@example.org","user_name":"지민","token":"` + secret("ko-magic-1") + `","locale":"ko-KR"}`,
			"[Example App] 로그인 링크 안내",
			[]string{"https://app.example.com/magic-link?token=ko-magic-1", "이 링크는 15분 후에 만료되며, 한 번만 사용할 수 있습니다.", ignore}},
		{"/send/password-reset", `{"to":"jimin@example.org","user_name":"지민","token":"` + secret("ko-reset-1") + `","locale":"ko"}`,
			"[Example App] 비밀번호 재설정 안내",
			[]string{"Example App 계정의 비밀번호 재설정 요청을 받았습니다.", "https://app.example.com/account/reset?t=ko-reset-1",
				"이 링크는 1시간 후에 만료됩니다.", "비밀번호 재설정을 요청하지 않았다면 이 메일을 무시하셔도 됩니다."}},
		{"/send/verify-email", `{"to":"jimin@example.org","user_name":"지민","token":"` + secret("ko-verify-1") + `","locale":"ko","expires_in_minutes":2880}`,
			"[Example App] 이메일 주소를 인증해 주세요",
			[]string{"jimin@example.org 주소가 본인의 이메일 주소임을 인증해 주세요.", "https://app.example.com/verify-email?token=ko-verify-1",
				"이 링크는 2일 후에 만료됩니다."}},
	}
	for _, tc := range cases {
		t.Run(tc.path, func(t *testing.T) {
			r := post(t, "/authmail"+tc.path, tc.body)
			m := expectSent(t, r)
			if r.str("locale") != "ko" {
				t.Errorf("answer locale %q: %s", r.str("locale"), r.raw)
			}
			p := parseMail(t, m.Data)
			if p.Header.Get("To") != "=?utf-8?q?=EC=A7=80=EB=AF=BC?= <jimin@example.org>" {
				t.Errorf("To %q", p.Header.Get("To"))
			}
			checkKoreanMail(t, p, tc.subject, "안녕하세요, 지민님.", tc.fragments...)
		})
	}

	t.Run("email-change", func(t *testing.T) {
		r := post(t, "/authmail/send/email-change", `{"to":"new.jimin@example.org","old_email":"jimin@example.net","user_name":"지민","token":"`+secret("ko-chg-1")+`","locale":"ko"}`)
		if r.status != 200 || r.str("locale") != "ko" {
			t.Fatalf("%d %s", r.status, r.raw)
		}
		msgs := smtpSrv.WaitMessages(2, 5*time.Second)
		if len(msgs) != 2 {
			t.Fatalf("%d messages", len(msgs))
		}
		if msgs[0].To[0] != "new.jimin@example.org" {
			msgs[0], msgs[1] = msgs[1], msgs[0]
		}
		checkKoreanMail(t, parseMail(t, msgs[0].Data), "[Example App] 새 이메일 주소를 확인해 주세요", "안녕하세요, 지민님.",
			"Example App 계정의 이메일 주소를 새 주소(new.jimin@example.org)로 변경해 달라는 요청을 받았습니다.",
			"https://app.example.com/email-change?token=ko-chg-1", "이 링크는 24시간 후에 만료됩니다.", "이메일 주소는 변경되지 않습니다.")
		notice := parseMail(t, msgs[1].Data)
		checkKoreanMail(t, notice, "[Example App] 이메일 주소 변경 요청 안내", "안녕하세요, 지민님.",
			"현재 주소(jimin@example.net)에서 새 주소(n***@example.org)로 변경해 달라는 요청을 받았습니다.",
			"본인이 요청하지 않았다면 지금 바로 계정을 보호하세요.")
		if strings.Contains(notice.Text+notice.HTML, "ko-chg-1") {
			t.Fatal("the notice carries the confirmation link")
		}
		smtpSrv.ClearMessages()
	})

	// every event the test config sends (account_locked is off there)
	for ev, want := range map[string][2]string{
		"password_changed":    {"비밀번호가 변경되었습니다", "Example App 계정의 비밀번호가 변경되었습니다."},
		"two_factor_enabled":  {"2단계 인증이 설정되었습니다", "Example App 계정에 2단계 인증이 설정되었습니다."},
		"two_factor_disabled": {"2단계 인증이 해제되었습니다", "이제 계정은 비밀번호만으로 보호됩니다."},
		"new_login":           {"새로운 로그인이 감지되었습니다", "Example App 계정에 새로운 로그인이 있었습니다."},
	} {
		t.Run(ev, func(t *testing.T) {
			r := post(t, "/authmail/send/security-alert", `{"to":"jimin@example.org","event":"`+ev+`","ip":"203.0.113.9","location":"서울","user_agent":"Safari","occurred_at":"2026-12-03T15:04:05+09:00","locale":"ko"}`)
			p := parseMail(t, expectSent(t, r).Data)
			if r.str("locale") != "ko" {
				t.Errorf("answer locale %q", r.str("locale"))
			}
			checkKoreanMail(t, p, "[Example App] 보안 알림: "+want[0], "안녕하세요.", want[1], "2026년 12월 3일 오전 6:04 (UTC)",
				"본인이 하신 것이 아니라면 즉시 비밀번호를 재설정하고 계정의 보안 설정을 확인해 주세요.")
			if !strings.Contains(p.Text, "일시: 2026년 12월 3일 오전 6:04 (UTC)\nIP 주소: 203.0.113.9\n위치: 서울\n기기: Safari\n") {
				t.Errorf("details:\n%s", p.Text)
			}
		})
	}
}

// TestLocaleResolutionThroughCaddy: a custom otp.de.subject serves de-AT,
// an unknown locale falls back and the answer says to which, an
// ill-formed one is refused, and `locale ko` makes Korean the default.
func TestLocaleResolutionThroughCaddy(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "otp.de.subject"), []byte("Ihr Anmeldecode für {{.AppName}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	load(t, config{Extra: "templates " + dir})
	r := post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"`+secret("DE-1234")+`","locale":"de-AT"}`)
	p := parseMail(t, expectSent(t, r).Data)
	if r.str("locale") != "de" || p.Subject != "Ihr Anmeldecode für Example App" || !strings.HasPrefix(strings.ToUpper(p.Header.Get("Subject")), "=?UTF-8?") {
		t.Errorf("de-AT: locale %q subject %q (%q)", r.str("locale"), p.Subject, p.Header.Get("Subject"))
	}
	// de has only a subject: the body is the next in line, English
	if !strings.Contains(p.Text, "Use this code to continue:\n\n    DE-1234\n") || !strings.Contains(p.HTML, `<html lang="de">`) {
		t.Errorf("de body:\n%s", p.Text)
	}

	// unknown locales fall back to the default, en; the answer says so
	for _, loc := range []string{"fr-CA", "xx", "und"} {
		r = post(t, "/authmail/send/magic-link", `{"to":"a@example.org","token":"t","locale":"`+loc+`"}`)
		if p := parseMail(t, expectSent(t, r).Data); r.str("locale") != "en" || p.Subject != "Your sign-in link for Example App" {
			t.Errorf("%s: locale %q subject %q", loc, r.str("locale"), p.Subject)
		}
	}
	// ill-formed tags: 422 naming the field, nothing sent
	for _, loc := range []string{"ko_KR", "de-", "en-US.UTF-8", "x"} {
		expectError(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1","locale":"`+loc+`"}`), 422, "invalid_request", "locale")
	}
	expectError(t, post(t, "/authmail/send/security-alert", `{"to":"a@example.org","event":"new_login","locale":"-"}`), 422, "invalid_request", "locale")
	// /send is not templated: no locale field
	r = post(t, "/authmail/send", `{"to":"a@example.org","subject":"s","text_body":"b","locale":"ko"}`)
	if r.status != 400 && r.status != 422 {
		t.Errorf("/send with a locale: %d %s", r.status, r.raw)
	}
	if len(smtpSrv.Attempts()) != 0 {
		t.Fatal("a refused request was sent")
	}

	// Korean by default
	load(t, config{Extra: "locale ko"})
	for body, want := range map[string]string{
		`{"to":"a@example.org","code":"1"}`:                  "ko",
		`{"to":"a@example.org","code":"1","locale":"fr"}`:    "ko",
		`{"to":"a@example.org","code":"1","locale":"en-GB"}`: "en",
	} {
		r := post(t, "/authmail/send/otp", body)
		p := parseMail(t, expectSent(t, r).Data)
		subject := map[string]string{"ko": "[Example App] 인증 코드 안내", "en": "Your Example App verification code"}[want]
		if r.str("locale") != want || p.Subject != subject {
			t.Errorf("%s: locale %q subject %q, want %q", body, r.str("locale"), p.Subject, want)
		}
	}
}
