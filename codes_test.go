package authmail

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-authmail/authmail/internal/mailtest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

const (
	unitCodesSecret = "codes-secret-0123456789abcdef"
	otherKey        = "other-key-0123456789abcdef"
)

// withCodes turns on issued codes and gives the unit key (and a second
// key, "other") the verify permission.
func withCodes(t testing.TB, mods ...func(*Codes)) func(*Handler) {
	t.Setenv("AUTHMAIL_UNIT_CODES", unitCodesSecret)
	return func(h *Handler) {
		h.Codes = &Codes{Secret: "{env.AUTHMAIL_UNIT_CODES}"}
		for _, m := range mods {
			m(h.Codes)
		}
		h.Keys[0].Allow = append(append([]string{}, sendPerms...), "verify")
		h.Keys = append(h.Keys, Key{ID: "other", Secret: otherKey, Allow: []string{"otp", "verify"}})
	}
}

// codesHandler is a handler that issues codes and delivers to srv.
func codesHandler(t *testing.T, srv *smtptest.Server, mods ...func(*Handler)) *Handler {
	return newInstance(t, "").handler(append([]func(*Handler){withSMTP(t, srv), withCodes(t), withoutLimits}, mods...)...)
}

// moveClock shifts the clock of issued values by d for the rest of the test.
func moveClock(t *testing.T, d time.Duration) {
	prev := issuedNow
	issuedNow = func() time.Time { return prev().Add(d) }
	t.Cleanup(func() { issuedNow = prev })
}

var (
	codeLine = regexp.MustCompile(`(?m)^    (\S+)$`)
	linkLine = regexp.MustCompile(`https://app\.example\.com/\S+`)
)

// deliveredText waits for the next message to reach srv and returns its
// text body and its To header; the server then forgets it.
func deliveredText(t *testing.T, srv *smtptest.Server) (string, string) {
	t.Helper()
	msgs := srv.WaitMessages(1, 10*time.Second)
	if len(msgs) == 0 {
		t.Fatal("no message arrived")
	}
	srv.ClearMessages()
	m, err := mailtest.Parse(msgs[len(msgs)-1].Data)
	if err != nil {
		t.Fatal(err)
	}
	return m.Text, m.Header.Get("To")
}

// issueCode sends an issued code and returns the challenge and the code
// as the recipient read it in the mail.
func issueCode(t *testing.T, h *Handler, srv *smtptest.Server, body string, headers ...string) (challenge, code string) {
	t.Helper()
	rec, out := call(t, h, "POST", "/authmail/send/otp", body, headers...)
	if rec.Code != 200 {
		t.Fatalf("send: %d %s", rec.Code, rec.Body)
	}
	challenge, _ = out["challenge_id"].(string)
	if len(challenge) != 43 {
		t.Fatalf("answer without a challenge_id: %s", rec.Body)
	}
	text, _ := deliveredText(t, srv)
	m := codeLine.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no code in the mail:\n%s", text)
	}
	code = m[1]
	if strings.Contains(rec.Body.String(), code) {
		t.Fatalf("the answer holds the code: %s", rec.Body)
	}
	return challenge, code
}

// issueLink sends a link flow with an issued token and returns the token
// read from the delivered link.
func issueLink(t *testing.T, h *Handler, srv *smtptest.Server, flow, body string) string {
	t.Helper()
	rec, _ := call(t, h, "POST", "/authmail/send/"+flow, body)
	if rec.Code != 200 {
		t.Fatalf("send %s: %d %s", flow, rec.Code, rec.Body)
	}
	want := 1
	if strings.Contains(body, "old_email") {
		want = 2 // and the notice to the old address, which has no link
	}
	msgs := srv.WaitMessages(want, 10*time.Second)
	if len(msgs) != want {
		t.Fatalf("%d messages arrived, want %d", len(msgs), want)
	}
	srv.ClearMessages()
	link, text := "", ""
	for _, raw := range msgs {
		m, err := mailtest.Parse(raw.Data)
		if err != nil {
			t.Fatal(err)
		}
		text += m.Text
		if l := linkLine.FindString(m.Text); l != "" {
			link = l
		}
	}
	u, err := url.Parse(link)
	if err != nil || link == "" {
		t.Fatalf("no link in the mail:\n%s", text)
	}
	tok := u.Query().Get("token")
	if tok == "" {
		tok = u.Query().Get("t")
	}
	if len(tok) != 43 || tok == "auto" {
		t.Fatalf("link %s holds no issued token", link)
	}
	if strings.Contains(rec.Body.String(), tok) {
		t.Fatalf("the answer holds the token: %s", rec.Body)
	}
	return tok
}

func verifyOTP(t *testing.T, h *Handler, challenge, code string, headers ...string) (int, string) {
	t.Helper()
	rec, _ := call(t, h, "POST", "/authmail/verify/otp", fmt.Sprintf(`{"challenge_id":%q,"code":%q}`, challenge, code), headers...)
	return rec.Code, rec.Body.String()
}

func verifyTok(t *testing.T, h *Handler, token, flow string, headers ...string) (int, string) {
	t.Helper()
	rec, _ := call(t, h, "POST", "/authmail/verify/token", fmt.Sprintf(`{"token":%q,"flow":%q}`, token, flow), headers...)
	return rec.Code, rec.Body.String()
}

func expectVerify(t *testing.T, gotStatus int, gotBody string, wantStatus int, wantBody string) {
	t.Helper()
	if gotStatus != wantStatus || gotBody != wantBody+"\n" {
		t.Fatalf("got %d %s\nwant %d %s", gotStatus, gotBody, wantStatus, wantBody)
	}
}

const (
	notFoundBody = `{"error_code":"not_found","message":"no such code or token for this key: unknown, replaced or already used"}`
	burnedBody   = `{"error_code":"code_burned","message":"too many wrong codes were tried for this challenge; send a new code"}`
	expiredBody  = `{"error_code":"code_expired","message":"the code has expired; send a new code"}`
)

func TestIssuedOTPLoginFlow(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv)
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	if len(code) != 6 || strings.Trim(code, "0123456789") != "" {
		t.Fatalf("issued code %q is not 6 digits", code)
	}
	// storage holds the keyed hash only
	_ = filepath.Walk(h.storageOverride.(interface{ Filename(string) string }).Filename("authmail/codes"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			if b, _ := os.ReadFile(p); strings.Contains(string(b), `"`+code+`"`) || strings.Contains(string(b), ":"+code) {
				t.Errorf("%s holds the code in clear: %s", p, b)
			}
		}
		return nil
	})
	// another key does not find it
	rec, out := call(t, h, "POST", "/authmail/verify/otp", fmt.Sprintf(`{"challenge_id":%q,"code":%q}`, challenge, code), "Authorization: Bearer "+otherKey)
	if rec.Code != 404 || out["error_code"] != "not_found" {
		t.Fatalf("another key verifies the challenge: %d %s", rec.Code, rec.Body)
	}
	st, body := verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	// used up: a replay is not found
	st, body = verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 404, notFoundBody)
}

func TestVerifyNeedsThePermission(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) { h.Keys[1].Allow = []string{"otp"} })
	rec, out := call(t, h, "POST", "/authmail/verify/otp", `{"challenge_id":"x","code":"1"}`, "Authorization: Bearer "+otherKey)
	if rec.Code != 403 || out["error_code"] != "forbidden" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

func TestIssuedCodeBruteForceBurnsTheChallenge(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) { h.AuthFailures = "100/1m" })
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto","purpose":"2fa"}`)
	wrong := "000000"
	if code == wrong {
		wrong = "111111"
	}
	for left := 4; left >= 0; left-- {
		st, body := verifyOTP(t, h, challenge, wrong)
		expectVerify(t, st, body, 422, fmt.Sprintf(`{"error_code":"code_invalid","message":"the code is wrong","attempts_left":%d}`, left))
	}
	st, body := verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 410, burnedBody)
}

func TestIssuedCodeExpires(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv)
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto","expires_in_minutes":2}`)
	moveClock(t, 2*time.Minute+time.Second)
	st, body := verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 410, expiredBody)
	// the default validity is 10 minutes
	challenge, code = issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	moveClock(t, 9*time.Minute)
	st, body = verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	challenge, code = issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	moveClock(t, 10*time.Minute)
	st, body = verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 410, expiredBody)
}

func TestIssuedCodeIsScopedToItsKey(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv)
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	st, body := verifyOTP(t, h, challenge, code, "Authorization: Bearer "+otherKey)
	expectVerify(t, st, body, 404, notFoundBody)
	// the other key's own code for the same recipient is another challenge
	c2, code2 := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`, "Authorization: Bearer "+otherKey)
	st, body = verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	st, body = verifyOTP(t, h, c2, code2)
	expectVerify(t, st, body, 404, notFoundBody)
	st, body = verifyOTP(t, h, c2, code2, "Authorization: Bearer "+otherKey)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
}

func TestNewCodeReplacesTheOld(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv)
	c1, code1 := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	other, otherCode := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto","purpose":"delete-account"}`)
	c2, code2 := issueCode(t, h, srv, `{"to":"Jane@Example.org","code":"auto"}`)
	st, body := verifyOTP(t, h, c1, code1)
	expectVerify(t, st, body, 404, notFoundBody)
	st, body = verifyOTP(t, h, c2, code2)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"Jane@example.org","purpose":"login"}`)
	// another purpose is another challenge, untouched
	st, body = verifyOTP(t, h, other, otherCode)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"delete-account"}`)
}

func TestCodesIssueByDefaultWithOwnAlphabet(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) {
		h.Codes.Issue, h.Codes.Length, h.Codes.Alphabet = true, 10, "ABCDEFGHJKMNPQRSTVWXYZ23456789"
	})
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org"}`)
	if len(code) != 10 || strings.Trim(code, "ABCDEFGHJKMNPQRSTVWXYZ23456789") != "" {
		t.Fatalf("issued code %q", code)
	}
	st, body := verifyOTP(t, h, challenge, " "+code+" ")
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	// a caller's own code is still sent as given, without a challenge
	rec, out := call(t, h, "POST", "/authmail/send/otp", `{"to":"jane@example.org","code":"424242"}`)
	if rec.Code != 200 || out["challenge_id"] != nil {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if text, _ := deliveredText(t, srv); !strings.Contains(text, "    424242\n") {
		t.Fatalf("caller's code not in the mail:\n%s", text)
	}
}

func TestIssuedRequestErrors(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	plain := newInstance(t, "").handler(withSMTP(t, srv))
	h := codesHandler(t, srv)
	for _, c := range []struct {
		h                *Handler
		path, body       string
		status           int
		code, field, hdr string
	}{
		{plain, "/send/otp", `{"to":"a@example.com","code":"auto"}`, 422, "invalid_request", "code", ""},
		{plain, "/send/magic-link", `{"to":"a@example.com","token":"auto"}`, 422, "invalid_request", "token", ""},
		{plain, "/send/otp", `{"to":"a@example.com"}`, 422, "invalid_request", "code", ""},
		{h, "/send/otp", `{"to":"a@example.com"}`, 422, "invalid_request", "code", ""},
		{h, "/send/otp", `{"to":"a@example.com","code":"1","purpose":"login"}`, 422, "invalid_request", "purpose", ""},
		{h, "/send/otp", `{"to":"a@example.com","code":"auto","purpose":"Log In"}`, 422, "invalid_request", "purpose", ""},
		{h, "/send/otp", `{"to":"a@example.com","code":"auto","purpose":"` + strings.Repeat("a", 33) + `"}`, 422, "invalid_request", "purpose", ""},
		{h, "/verify/otp", `{"code":"1"}`, 422, "invalid_request", "challenge_id", ""},
		{h, "/verify/otp", `{"challenge_id":"abc","code":"1"}`, 422, "invalid_request", "challenge_id", ""},
		{h, "/verify/otp", `{"challenge_id":"` + strings.Repeat("A", 43) + `"}`, 422, "invalid_request", "code", ""},
		{h, "/verify/otp", `{"challenge_id":"` + strings.Repeat("A", 43) + `","code":"1","ip":"nope"}`, 422, "invalid_request", "ip", ""},
		{h, "/verify/otp", `{"challenge_id":"` + strings.Repeat("A", 43) + `","code":"1","extra":1}`, 422, "invalid_request", "extra", ""},
		{h, "/verify/token", `{"flow":"magic-link"}`, 422, "invalid_request", "token", ""},
		{h, "/verify/token", `{"token":"x"}`, 422, "invalid_request", "flow", ""},
		{h, "/verify/token", `{"token":"x","flow":"otp"}`, 422, "invalid_request", "flow", ""},
		{h, "/verify/token", `{"token":"x","flow":"magic-link"}`, 400, "invalid_request", "", "X-Dry-Run: 1"},
		{plain, "/verify/token", `{"token":"x","flow":"magic-link"}`, 403, "forbidden", "", ""},
	} {
		var hdrs []string
		if c.hdr != "" {
			hdrs = append(hdrs, c.hdr)
		}
		rec, out := call(t, c.h, "POST", "/authmail"+c.path, c.body, hdrs...)
		if rec.Code != c.status || out["error_code"] != c.code || (out["field"] != nil && out["field"] != c.field) || (c.field != "" && out["field"] != c.field) {
			t.Errorf("%s %s: %d %s, want %d %s field %q", c.path, c.body, rec.Code, rec.Body, c.status, c.code, c.field)
		}
	}
	if n := len(srv.Attempts()); n != 0 {
		t.Errorf("refused requests sent %d messages", n)
	}
}

func TestIssuedLinkFlows(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) { h.AuthFailures = "100/1m" })
	for _, c := range []struct {
		flow, body, answer string
	}{
		{"magic-link", `{"to":"jane@example.org","token":"auto"}`, `{"valid":true,"to":"jane@example.org","flow":"magic-link"}`},
		{"password-reset", `{"to":"jane@example.org","token":"auto"}`, `{"valid":true,"to":"jane@example.org","flow":"password-reset"}`},
		{"verify-email", `{"to":"jane@example.org","token":"auto"}`, `{"valid":true,"to":"jane@example.org","flow":"verify-email"}`},
		{"email-change", `{"to":"new.address@example.org","old_email":"old@example.net","token":"auto"}`,
			`{"valid":true,"to":"new.address@example.org","flow":"email-change","old_email":"old@example.net","new_email":"new.address@example.org"}`},
	} {
		t.Run(c.flow, func(t *testing.T) {
			tok := issueLink(t, h, srv, c.flow, c.body)
			// another flow does not find it, and does not use it up
			other := "magic-link"
			if c.flow == other {
				other = "verify-email"
			}
			st, body := verifyTok(t, h, tok, other)
			expectVerify(t, st, body, 404, notFoundBody)
			st, body = verifyTok(t, h, tok, c.flow, "Authorization: Bearer "+otherKey)
			expectVerify(t, st, body, 404, notFoundBody)
			st, body = verifyTok(t, h, tok, c.flow)
			expectVerify(t, st, body, 200, c.answer)
			st, body = verifyTok(t, h, tok, c.flow)
			expectVerify(t, st, body, 404, notFoundBody)
		})
	}
}

func TestIssuedLinkExpiryPerFlow(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv)
	t.Cleanup(func() { issuedNow = time.Now })
	for _, c := range []struct {
		flow, body string
		valid      time.Duration
	}{
		{"magic-link", `{"to":"jane@example.org","token":"auto"}`, 15 * time.Minute},
		{"password-reset", `{"to":"jane@example.org","token":"auto"}`, time.Hour},
		{"verify-email", `{"to":"jane@example.org","token":"auto"}`, 24 * time.Hour},
		{"email-change", `{"to":"jane@example.org","token":"auto"}`, 24 * time.Hour},
		{"magic-link", `{"to":"jane@example.org","token":"auto","expires_in_minutes":3}`, 3 * time.Minute},
	} {
		early := issueLink(t, h, srv, c.flow, c.body)
		late := issueLink(t, h, srv, c.flow, c.body)
		issuedNow = func() time.Time { return time.Now().Add(c.valid - 2*time.Second) }
		st, body := verifyTok(t, h, early, c.flow)
		if st != 200 {
			t.Fatalf("%s just before its expiry: %d %s", c.flow, st, body)
		}
		issuedNow = func() time.Time { return time.Now().Add(c.valid) }
		st, body = verifyTok(t, h, late, c.flow)
		expectVerify(t, st, body, 410, `{"error_code":"token_expired","message":"the link has expired; send a new one"}`)
		issuedNow = time.Now
	}
}

// TestConcurrentVerifySucceedsOnce verifies the same code at the same
// time through two instances sharing one storage, and through two
// requests of one handler: exactly one verification succeeds.
func TestConcurrentVerifySucceedsOnce(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	// every loser is a failed verification: no per-client limit here
	mods := []func(*Handler){withSMTP(t, srv), withCodes(t), withoutLimits, func(h *Handler) { h.AuthFailures = "off" }}
	a := newInstance(t, shared).handler(mods...)
	b := newInstance(t, shared).handler(mods...)
	if a.engine == b.engine {
		t.Fatal("two instances should have two engines")
	}
	for round := range 16 {
		challenge, code := issueCode(t, a, srv, `{"to":"jane@example.org","code":"auto"}`)
		pair := [2]*Handler{a, b}
		if round%2 == 1 {
			pair[1] = a // same process, same engine
		}
		var wg sync.WaitGroup
		var st [2]int
		for i, h := range pair {
			wg.Go(func() { st[i], _ = verifyOTP(t, h, challenge, code) })
		}
		wg.Wait()
		if !(st[0] == 200 && st[1] == 404 || st[0] == 404 && st[1] == 200) {
			t.Fatalf("round %d: answers %v, want one 200 and one 404", round, st)
		}
	}
	// tokens too
	for round := range 6 {
		tok := issueLink(t, b, srv, "magic-link", `{"to":"jane@example.org","token":"auto"}`)
		var wg sync.WaitGroup
		var st [2]int
		for i, h := range [2]*Handler{a, b} {
			wg.Go(func() { st[i], _ = verifyTok(t, h, tok, "magic-link") })
		}
		wg.Wait()
		if !(st[0] == 200 && st[1] == 404 || st[0] == 404 && st[1] == 200) {
			t.Fatalf("token round %d: answers %v, want one 200 and one 404", round, st)
		}
	}
}

// TestFailedVerificationsAreLimitedPerClient counts wrong codes and
// unknown tokens against the end user's ip (or the caller's address)
// with the auth_failures limit.
func TestFailedVerificationsAreLimitedPerClient(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) { h.AuthFailures = "3/1m" })
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	for range 3 {
		if st, body := verifyTok(t, h, "guess", "magic-link"); st != 404 {
			t.Fatalf("%d %s", st, body)
		}
	}
	rec, out := call(t, h, "POST", "/authmail/verify/otp", fmt.Sprintf(`{"challenge_id":%q,"code":%q}`, challenge, code))
	if rec.Code != 429 || out["error_code"] != "rate_limited" || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("after 3 failures: %d %s", rec.Code, rec.Body)
	}
	// the end user's ip, passed by the app, is counted on its own
	for range 3 {
		rec, _ := call(t, h, "POST", "/authmail/verify/token", `{"token":"guess","flow":"magic-link","ip":"203.0.113.7"}`)
		if rec.Code != 404 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
	}
	rec, _ = call(t, h, "POST", "/authmail/verify/token", `{"token":"guess","flow":"magic-link","ip":"203.0.113.7"}`)
	if rec.Code != 429 {
		t.Fatalf("ip after 3 failures: %d %s", rec.Code, rec.Body)
	}
	rec, _ = call(t, h, "POST", "/authmail/verify/otp", fmt.Sprintf(`{"challenge_id":%q,"code":%q,"ip":"198.51.100.1"}`, challenge, code))
	if rec.Code != 200 {
		t.Fatalf("another ip: %d %s", rec.Code, rec.Body)
	}
}

func TestIssuedRecordsSurviveARestartAndExpireInTheJanitor(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	in := newInstance(t, shared)
	mods := []func(*Handler){withSMTP(t, srv), withCodes(t), withoutLimits}
	h := in.handler(mods...)
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	keep, keepCode := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto","purpose":"other"}`)
	tok := issueLink(t, h, srv, "magic-link", `{"to":"jane@example.org","token":"auto"}`)
	// a new handler on another instance of the same storage (a restart)
	h2 := newInstance(t, shared).handler(mods...)
	st, body := verifyOTP(t, h2, challenge, code)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	ctx := context.Background()
	count := func() int { return issuedRecords(t, h) }
	if n := count(); n != 2 {
		t.Fatalf("%d records, want 2", n)
	}
	// expired, but within the grace period: kept, and answered as expired
	moveClock(t, 10*time.Minute+issuedGrace-time.Minute)
	h.engine.Janitor(ctx)
	if n := count(); n != 2 {
		t.Fatalf("the janitor deleted records within their grace period: %d left", n)
	}
	st, body = verifyOTP(t, h2, keep, keepCode)
	expectVerify(t, st, body, 410, expiredBody)
	moveClock(t, 7*time.Minute) // the code expired 61 minutes ago, the token 61
	h.engine.Janitor(ctx)
	if n := count(); n != 0 {
		t.Fatalf("%d records outlived expiry plus grace", n)
	}
	st, body = verifyTok(t, h2, tok, "magic-link")
	expectVerify(t, st, body, 404, notFoundBody)
}

func TestCodesConfig(t *testing.T) {
	t.Setenv("AUTHMAIL_UNIT_CODES_EMPTY", "")
	base := func(c *Codes) *Handler {
		return &Handler{Capture: "/tmp/x", From: "a@example.com", Keys: []Key{{ID: "k", Secret: unitKey}}, Codes: c}
	}
	for _, c := range []struct {
		codes *Codes
		want  string
	}{
		{&Codes{Issue: true}, "codes: secret is required; give it as {env.*} or {file.*}"},
		{&Codes{Secret: "short-Secr3t"}, "codes: secret is shorter than 16 characters"},
		{&Codes{Secret: unitCodesSecret, Length: 3}, "codes: length must be between 4 and 32, not 3"},
		{&Codes{Secret: unitCodesSecret, Alphabet: "A"}, "codes: alphabet must have 2 to 64 characters"},
		{&Codes{Secret: unitCodesSecret, Alphabet: "ABCA"}, "codes: alphabet holds 'A' twice"},
		{&Codes{Secret: unitCodesSecret, Alphabet: "AB C"}, "codes: alphabet must consist of printable ASCII characters without spaces"},
	} {
		err := base(c.codes).checkConfig()
		if err == nil || err.Error() != c.want {
			t.Errorf("%+v: %v, want %s", c.codes, err, c.want)
		}
	}
	// an empty placeholder fails the load and names the placeholder only
	h := base(&Codes{Secret: "{env.AUTHMAIL_UNIT_CODES_EMPTY}"})
	ctx, err := caddy.ProvisionContext(&caddy.Config{StorageRaw: json.RawMessage(fmt.Sprintf(`{"module":"file_system","root":%q}`, t.TempDir()))})
	if err != nil {
		t.Fatal(err)
	}
	err = h.Provision(ctx)
	if err == nil || err.Error() != "codes secret: {env.AUTHMAIL_UNIT_CODES_EMPTY} is empty or cannot be read" {
		t.Fatalf("%v", err)
	}
	t.Setenv("AUTHMAIL_UNIT_CODES_SHORT", "tiny-secret")
	h = base(&Codes{Secret: "{env.AUTHMAIL_UNIT_CODES_SHORT}"})
	if err := h.Provision(ctx); err == nil || err.Error() != "codes: secret is shorter than 16 characters" {
		t.Fatalf("%v", err)
	}
	// verify is a permission, not given by default
	if err := checkPermission("verify"); err != nil {
		t.Fatal(err)
	}
	err = checkPermission("nope")
	if err == nil || !strings.Contains(err.Error(), "security-alert, verify, status, test") {
		t.Fatalf("%v", err)
	}
}

func TestCodesCaddyfile(t *testing.T) {
	for _, c := range []struct {
		in, want string
	}{
		{`codes issue {
			secret {env.CODES}
			length 8
			alphabet ABCDEFGH
		}`, `{"issue":true,"secret":"{env.CODES}","length":8,"alphabet":"ABCDEFGH"}`},
		{`codes {
			secret {file./run/codes}
		}`, `{"secret":"{file./run/codes}"}`},
		{`codes issue`, `error:codes: secret is required; give it as {env.*} or {file.*}`},
		{`codes always {
			secret {env.CODES}
		}`, `error:codes takes no argument but issue, not 'always'`},
		{`codes {
			secret {env.CODES}
			length 40
		}`, `error:codes length must be a number from 4 to 32, not '40'`},
		{`codes {
			secret {env.CODES}
			pepper x
		}`, `error:unrecognized codes subdirective 'pepper'`},
	} {
		d := caddyfile.NewTestDispenser(c.in)
		d.Next()
		got, err := unmarshalCodes(d)
		if want, isErr := strings.CutPrefix(c.want, "error:"); isErr {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: %v, want %s", c.in, err, want)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.in, err)
			continue
		}
		if b, _ := json.Marshal(got); string(b) != c.want {
			t.Errorf("%s: %s, want %s", c.in, b, c.want)
		}
	}
}

// TestIssuedCodeIsUniform checks the rejection sampling: with a
// 3-character alphabet (256 is no multiple of 3) every character is
// drawn about equally often.
func TestIssuedCodeIsUniform(t *testing.T) {
	is := &issuer{length: 30, alphabet: "abc"}
	counts := map[rune]int{}
	for range 1000 {
		for _, r := range is.newCode() {
			counts[r]++
		}
	}
	for _, r := range "abc" {
		if n := counts[r]; n < 9400 || n > 10600 {
			t.Errorf("%c drawn %d times of 30000", r, n)
		}
	}
	if len(counts) != 3 {
		t.Errorf("characters outside the alphabet: %v", counts)
	}
	if tok := newToken(); len(tok) != 43 || strings.ContainsAny(tok, "+/=") {
		t.Errorf("token %q", tok)
	}
}

// issuedRecords counts the issued records in h's storage.
func issuedRecords(t *testing.T, h *Handler) int {
	ctx := context.Background()
	n := 0
	for _, dir := range []string{"authmail/codes", "authmail/tokens"} {
		keys, _ := h.engine.Storage().List(ctx, dir, true)
		for _, k := range keys {
			if info, err := h.engine.Storage().Stat(ctx, k); err == nil && info.IsTerminal {
				n++
			}
		}
	}
	return n
}

// TestIssuedValueIsWithdrawnWhenTheMessageIsNot checks that a send
// refused with queue_full leaves no verifiable code or token behind.
func TestIssuedValueIsWithdrawnWhenTheMessageIsNot(t *testing.T) {
	port := smtptest.Silent(t)
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) {
		h.SMTP.Port = port
		h.Delivery.MaxQueued = 1
	})
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("u@example.org"), "Prefer: respond-async"); rec.Code != 202 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	for _, c := range []struct{ path, body string }{
		{"/send/otp", `{"to":"jane@example.org","code":"auto"}`},
		{"/send/magic-link", `{"to":"jane@example.org","token":"auto"}`},
	} {
		rec, out := call(t, h, "POST", "/authmail"+c.path, c.body, "Prefer: respond-async")
		if rec.Code != 503 || out["error_code"] != "queue_full" || out["challenge_id"] != nil {
			t.Fatalf("%s: %d %s", c.path, rec.Code, rec.Body)
		}
		if n := issuedRecords(t, h); n != 0 {
			t.Fatalf("%s: %d issued records left after a refused send", c.path, n)
		}
	}
}

// TestIssuedCodeWithIdempotencyKey: a retry with the same key replays
// the answer, challenge_id included, and sends no second code.
func TestIssuedCodeWithIdempotencyKey(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv)
	challenge, code := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`, "Idempotency-Key: login-7")
	rec, out := call(t, h, "POST", "/authmail/send/otp", `{"to":"jane@example.org","code":"auto"}`, "Idempotency-Key: login-7")
	if rec.Code != 200 || rec.Header().Get("Idempotent-Replayed") != "true" || out["challenge_id"] != challenge {
		t.Fatalf("replay: %d %s", rec.Code, rec.Body)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("the replay sent %d messages", n)
	}
	st, body := verifyOTP(t, h, challenge, code)
	expectVerify(t, st, body, 200, `{"valid":true,"to":"jane@example.org","purpose":"login"}`)
	// a dry run issues nothing
	rec, out = call(t, h, "POST", "/authmail/send/otp", `{"to":"jane@example.org","code":"auto"}`, "X-Dry-Run: 1")
	if rec.Code != 200 || out["challenge_id"] != nil || issuedRecords(t, h) != 0 {
		t.Fatalf("dry run: %d %s, %d records", rec.Code, rec.Body, issuedRecords(t, h))
	}
}

func TestStatusShowsCodesWithoutTheSecret(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := codesHandler(t, srv, func(h *Handler) { h.Keys[0].Allow = append(h.Keys[0].Allow, "status") })
	rec, out := call(t, h, "GET", "/authmail/status", "")
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if b, _ := json.Marshal(out["settings"].(map[string]any)["codes"]); string(b) != `{"alphabet":"0123456789","issue":false,"length":6}` {
		t.Errorf("codes settings %s", b)
	}
	if !strings.Contains(rec.Body.String(), `"allow":["send","otp","magic-link","password-reset","verify-email","email-change","security-alert","verify","status"]`) {
		t.Errorf("the verify permission is not shown: %s", rec.Body)
	}
	if strings.Contains(rec.Body.String(), unitCodesSecret) {
		t.Errorf("/status shows the codes secret")
	}
}
