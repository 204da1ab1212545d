package mailer

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
	"golang.org/x/oauth2"

	"github.com/caddy-authmail/authmail/internal/redact/redacttest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestRepliesHoldNoSecretOfTheSender: a server whose refusal echoes the
// AUTH PLAIN exchange in base64 (the password at whatever alignment the
// user name gives it) and the password URL-encoded fails the message
// with a reply, an error and a message that hold the password in no
// encoding; the echo straddles the reply's cut at 200 bytes, and no half
// of it stays either.
func TestRepliesHoldNoSecretOfTheSender(t *testing.T) {
	const password = "s3cret-pass"
	plain := base64.StdEncoding.EncodeToString([]byte("\x00user\x00" + password))
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
			Message: "refused; you said pass=" + url.QueryEscape(password) + " " + strings.Repeat("x", 150) + " AUTH PLAIN " + plain}
	}})
	s := newTestSender(t, testSettings(srv))
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	de := expectCode(t, err, CodeRecipientRefused, PhaseRcpt)
	for _, text := range []string{err.Error(), de.Reply.String(), ErrText(de.Err)} {
		if l := redacttest.Leak(text, password); l != "" {
			t.Errorf("%q shows the password as %q", text, l)
		}
		if strings.Contains(text, plain[:12]) {
			t.Errorf("%q shows the start of the AUTH exchange", text)
		}
	}
	if !strings.Contains(de.Reply.Text, "pass=[redacted]") || len(de.Reply.Text) > 200 {
		t.Errorf("reply text %q", de.Reply.Text)
	}
}

// TestTokenErrorShowsNoProviderCode: every field of a token endpoint's
// error is provider text: a code that is not a plain OAuth2 code (one
// holding the secret, a line break) is replaced, the status is its
// number and Go's text, the description is redacted.
func TestTokenErrorShowsNoProviderCode(t *testing.T) {
	ts := newTokenSource(&OAuthSettings{ClientSecret: testClientSecret, RefreshToken: testRefresh0}, 0)
	for code, want := range map[string]string{
		"invalid_grant":                        "invalid_grant",
		"invalid_client:" + testClientSecret:   "unrecognized_error",
		"invalid_grant\n{\"level\":\"error\"}": "unrecognized_error",
	} {
		err := ts.tokenError(&oauth2.RetrieveError{
			Response:         &http.Response{StatusCode: 400, Status: "400 " + testClientSecret},
			ErrorCode:        code,
			ErrorDescription: "form: client_secret=" + url.QueryEscape(testClientSecret) + " " + base64.RawURLEncoding.EncodeToString([]byte("xy"+testRefresh0)),
		})
		prefix := "fetching an OAuth2 access token: the token endpoint answered 400 Bad Request: " + want + " (form: client_secret=[redacted] "
		if !strings.HasPrefix(err.Error(), prefix) || redacttest.Leak(err.Error(), testClientSecret, testRefresh0) != "" {
			t.Errorf("code %q:\n got %s\nwant %s…", code, err, prefix)
		}
	}
}

// TestErrorCodesAreAVocabulary: whatever a failure's code was made of,
// the one that leaves a Sender is one of the fixed codes.
func TestErrorCodesAreAVocabulary(t *testing.T) {
	cause := errors.New("x " + testClientSecret)
	s := &Sender{cfg: SMTPSettings{Password: testClientSecret}}
	_, err := s.redacted(Result{}, &Error{Code: "invalid_client:" + testClientSecret, Phase: PhaseAuth, Err: cause})
	// the cause stays reachable (errors.Is, errors.As), its text does not
	if de := err.(*Error); de.Code != CodeSMTPConnection || strings.Contains(de.Error(), testClientSecret) || !errors.Is(err, cause) {
		t.Fatalf("%+v: %s", de, de.Error())
	}
}
