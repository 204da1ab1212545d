package authmail

import (
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// capturedFiles returns the names of the .eml files in a capture directory.
func capturedFiles(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.eml"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// TestHandlersWithTheSameFromKeepTheirRoutes: two authmail blocks that
// share a storage (so one outbox) and a From address, but deliver through
// different routes, each send through their own: a staging site in
// capture mode must not send through production's SMTP account, and the
// other way round.
func TestHandlersWithTheSameFromKeepTheirRoutes(t *testing.T) {
	in := newInstance(t, "")
	a := in.handler()
	b := in.handler()
	if a.engine != b.engine {
		t.Fatal("the two handlers should share one outbox")
	}
	if a.profile == b.profile {
		t.Fatalf("same profile %q for two routes", a.profile)
	}
	for _, h := range []*Handler{a, b, a} {
		rec, _ := call(t, h, http.MethodPost, "/authmail/send/otp", `{"to":"jane@example.org","code":"123456"}`)
		if rec.Code != http.StatusOK {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
	}
	if got := len(capturedFiles(t, a.Capture)); got != 2 {
		t.Errorf("first handler's directory has %d messages, want 2", got)
	}
	if got := len(capturedFiles(t, b.Capture)); got != 1 {
		t.Errorf("second handler's directory has %d messages, want 1", got)
	}
}

// TestRejectedReloadRestoresTheRunningSettings: Caddy provisions a new
// config's handlers before it knows whether the whole config loads; when
// another part fails, it cleans the new handlers up and keeps the old
// config. The outbox must then go back to the old handler's transport and
// delivery settings, not keep the rejected ones (here a wrong SMTP
// password and another webhook secret).
func TestRejectedReloadRestoresTheRunningSettings(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	running := in.handler(withSMTP(t, srv), func(h *Handler) { h.WebhookSecret = "whsec-running-0123456789" })
	rejected := in.handler(withSMTP(t, srv), func(h *Handler) {
		h.SMTP.Password = "wrong-password"
		h.WebhookSecret = "whsec-rejected-0123456789"
	})
	if running.profile != rejected.profile {
		t.Fatal("a changed password should keep the sender profile")
	}
	if got := running.engine.Config().WebhookSecret; got != "whsec-rejected-0123456789" {
		t.Fatalf("the newest handler's settings should apply while it is registered, got %q", got)
	}
	if err := rejected.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if got := running.engine.Config().WebhookSecret; got != "whsec-running-0123456789" {
		t.Errorf("after the rejected handler's cleanup the webhook secret is %q, want the running one", got)
	}
	rec, body := call(t, running, http.MethodPost, "/authmail/send/otp", `{"to":"jane@example.org","code":"123456"}`)
	if rec.Code != http.StatusOK || body["status"] != "sent" {
		t.Fatalf("send after the rejected reload: %d %s", rec.Code, rec.Body)
	}
	if got := srv.WaitMessages(1, 5*time.Second); len(got) != 1 {
		t.Fatalf("SMTP server got %d messages, want 1", len(got))
	}
}
