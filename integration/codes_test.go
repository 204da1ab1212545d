package integration

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

// codesConfig issues codes of 8 letters (so that the log scan cannot
// mistake a timestamp for one) and lets the app key verify.
func codesConfig(t *testing.T) config {
	t.Setenv("AUTHMAIL_IT_CODES_SECRET", secret("it-codes-secret-0123456789abcdef"))
	return config{
		Keys: `key app {env.AUTHMAIL_IT_KEY} {
			allow otp magic-link password-reset verify-email email-change verify
			rate off
		}
		key other {env.AUTHMAIL_IT_KEY2} {
			allow otp verify
			rate off
		}`,
		Extra: `codes {
			secret {env.AUTHMAIL_IT_CODES_SECRET}
			length 8
			alphabet ABCDEFGHJKMNPQRSTVWXYZ
		}`,
	}
}

var (
	itCodeLine = regexp.MustCompile(`(?m)^    ([A-Z]{8})$`)
	itLinkLine = regexp.MustCompile(`https://app\.example\.com/\S+`)
)

func expectBody(t *testing.T, r response, status int, body string) {
	t.Helper()
	if r.status != status || r.raw != body+"\n" {
		t.Fatalf("got %d %s\nwant %d %s", r.status, r.raw, status, body)
	}
}

// issuedToken reads the token of the one link in the delivered messages.
func issuedToken(t *testing.T, want int) string {
	t.Helper()
	msgs := smtpSrv.WaitMessages(want, 10*time.Second)
	if len(msgs) != want {
		t.Fatalf("%d messages, want %d", len(msgs), want)
	}
	smtpSrv.ClearMessages()
	var links []string
	for _, m := range msgs {
		links = append(links, itLinkLine.FindAllString(parseMail(t, m.Data).Text, -1)...)
	}
	if len(links) != 1 {
		t.Fatalf("links in the mail: %q", links)
	}
	u, err := url.Parse(secret(links[0]))
	if err != nil {
		t.Fatal(err)
	}
	tok := u.Query().Get("token") + u.Query().Get("t")
	if len(tok) != 43 {
		t.Fatalf("no issued token in %s", links[0])
	}
	return secret(tok)
}

// TestIssuedCodesEndToEnd runs the two-step flows docs/api.md documents
// against Caddy: authmail issues the code or token, the test reads it
// from the delivered mail and verifies it, once.
func TestIssuedCodesEndToEnd(t *testing.T) {
	c := codesConfig(t)
	load(t, c)
	notFound := `{"error_code":"not_found","message":"no such code or token for this key: unknown, replaced or already used"}`

	// OTP login
	r := post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"auto","purpose":"login"}`)
	msg := expectSent(t, r)
	challenge := secret(r.str("challenge_id"))
	if len(challenge) != 43 || r.str("expires_at") == "" {
		t.Fatalf("answer %s", r.raw)
	}
	m := itCodeLine.FindStringSubmatch(parseMail(t, msg.Data).Text)
	if m == nil {
		t.Fatalf("no code in the mail")
	}
	code := secret(m[1])
	if strings.Contains(r.raw, code) {
		t.Fatalf("the answer holds the code: %s", r.raw)
	}
	wrong := "ZZZZZZZZ"
	if code == wrong {
		wrong = "YYYYYYYY"
	}
	expectBody(t, post(t, "/authmail/verify/otp", mustJSON(map[string]string{"challenge_id": challenge, "code": wrong})),
		422, `{"error_code":"code_invalid","message":"the code is wrong","attempts_left":4}`)
	expectBody(t, call(t, http.MethodPost, "/authmail/verify/otp", strings.NewReader(mustJSON(map[string]string{"challenge_id": challenge, "code": code})),
		"Authorization: Bearer "+keyOther, "Content-Type: application/json"), 404, notFound)
	// the challenge survives a reload
	load(t, c)
	verify := mustJSON(map[string]string{"challenge_id": challenge, "code": code})
	expectBody(t, post(t, "/authmail/verify/otp", verify), 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	expectBody(t, post(t, "/authmail/verify/otp", verify), 404, notFound)

	// magic link, password reset and email verification
	for _, flow := range []string{"magic-link", "password-reset", "verify-email"} {
		r := post(t, "/authmail/send/"+flow, `{"to":"jane@example.org","token":"auto"}`)
		if r.status != 200 || r.str("status") != "sent" {
			t.Fatalf("%s: %d %s", flow, r.status, r.raw)
		}
		tok := issuedToken(t, 1)
		body := mustJSON(map[string]string{"token": tok, "flow": flow})
		expectBody(t, post(t, "/authmail/verify/token", body), 200, `{"valid":true,"to":"jane@example.org","flow":"`+flow+`"}`)
		expectBody(t, post(t, "/authmail/verify/token", body), 404, notFound)
	}

	// email change: the link goes to the new address, the notice to the old
	r = post(t, "/authmail/send/email-change", `{"to":"new.address@example.org","old_email":"old@example.net","token":"auto"}`)
	if r.status != 200 {
		t.Fatalf("email-change: %d %s", r.status, r.raw)
	}
	tok := issuedToken(t, 2)
	expectBody(t, post(t, "/authmail/verify/token", mustJSON(map[string]string{"token": tok, "flow": "email-change"})), 200,
		`{"valid":true,"to":"new.address@example.org","flow":"email-change","old_email":"old@example.net","new_email":"new.address@example.org"}`)

	// nothing of it reaches /status
	st := call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keyApp)
	for _, s := range []string{code, challenge, tok} {
		if strings.Contains(st.raw, s) {
			t.Fatalf("/status holds an issued value: %s", st.raw)
		}
	}
}
