package authmail

import (
	"net/http"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/emersion/go-smtp"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

func TestFailoverCaddyfileAndConfig(t *testing.T) {
	var h Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp a.example.com\n smtp b.example.com:465\n smtp c.example.com\n}"))
	if err != nil {
		t.Fatal(err)
	}
	if h.SMTP != nil || len(h.SMTPServers) != 3 || h.SMTPServers[0].Host != "a.example.com" || h.SMTPServers[1].Port != 465 || h.SMTPServers[2].Host != "c.example.com" {
		t.Fatalf("smtp %+v servers %+v", h.SMTP, h.SMTPServers)
	}
	var one Handler
	if err := one.UnmarshalCaddyfile(caddyfile.NewTestDispenser("authmail {\n from a@example.com\n key app 0123456789abcdef0123\n smtp a.example.com\n}")); err != nil || one.SMTP == nil || one.SMTPServers != nil {
		t.Fatalf("one smtp block: %v %+v %+v", err, one.SMTP, one.SMTPServers)
	}
	for _, tc := range []struct {
		h    Handler
		want string
	}{
		{Handler{SMTP: &SMTP{Host: "a"}, SMTPServers: []SMTP{{Host: "b"}}}, "smtp and smtp_servers are mutually exclusive; list every server in smtp_servers, in priority order"},
		{Handler{Capture: "/tmp/x", SMTPServers: []SMTP{{Host: "b"}}}, "smtp_servers and capture are mutually exclusive; configure exactly one"},
		{Handler{SMTPServers: []SMTP{{Host: "b"}, {Host: "c", Port: 70000}}}, "smtp_servers[1]: smtp: invalid port 70000"},
	} {
		if err := tc.h.checkConfig(); err == nil || err.Error() != tc.want {
			t.Errorf("got %v, want %s", err, tc.want)
		}
	}
}

// A 530 "authentication required" at MAIL is the sender's setup, which
// an operator fixes with a reload: the outbox keeps the message and
// retries it with the code instead of failing it.
func TestSenderSetupRejectionIsRetried(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv))
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	}})
	rec, out := call(t, h, http.MethodPost, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`)
	if rec.Code != http.StatusAccepted || out["error_code"] != mailer.CodeSMTPAuthFailed {
		t.Fatalf("530 at MAIL: %d %s", rec.Code, rec.Body)
	}
	srv.SetHooks(smtptest.Hooks{})
	waitState(t, h, out["id"].(string), func(s outbox.State) bool { return s.Status == outbox.Sent })
	if n := len(srv.Messages()); n != 1 {
		t.Errorf("%d messages after the retry, want 1", n)
	}
}
func authServer(t *testing.T, mode string) *smtptest.Server {
	return smtptest.Start(t, smtptest.Options{TLS: mode, Username: "user", Password: "s3cret-pass"})
}

func smtpRefusal(code int) error {
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode{code / 100, 1, 1}, Message: "refused"}
}
