package authmail

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/mailer"
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

// TestTransportForFallsBackToTheSameFrom: a message whose route is no
// longer configured (the SMTP host changed, or it was queued by a version
// whose profile was the From address alone) goes through the most
// recently configured handler with its From address, not through another
// sender's.
func TestTransportForFallsBackToTheSameFrom(t *testing.T) {
	e := New("k", nil, "iid", nil)
	alice1, alice2, bob := &mailer.Capture{Dir: "a1"}, &mailer.Capture{Dir: "a2"}, &mailer.Capture{Dir: "b"}
	e.Configure(&Config{}, nil, SenderProfile("alice@example.com", "capture a1"), alice1, 1)
	e.Configure(&Config{WebhookSecret: "alice-2"}, nil, SenderProfile("Alice@example.com", "capture a2"), alice2, 1)
	e.Configure(&Config{WebhookSecret: "bob"}, nil, SenderProfile("bob@example.com", "capture b"), bob, 1)
	hash := &mailer.Capture{Dir: "h"}
	e.Configure(&Config{WebhookSecret: "hash-site"}, nil, SenderProfile("a#b@example.com", "capture h"), hash, 1)
	for _, c := range []struct {
		profile string
		want    mailer.Transport
		secret  string // of the webhook settings that follow the same fallback
	}{
		{SenderProfile("alice@example.com", "capture a1"), alice1, ""},
		{SenderProfile("alice@example.com", "capture a2"), alice2, "alice-2"},
		{SenderProfile("alice@example.com", "smtp old.example.com 587 0:"), alice2, "alice-2"},
		{"alice@example.com", alice2, "alice-2"},                            // a profile written before routes were part of it
		{SenderProfile("a#b@example.com", "smtp other"), hash, "hash-site"}, // a local part may hold a "#"
		{"a#b@example.com", hash, "hash-site"},
		{SenderProfile("carol@example.com", "capture c"), hash, "hash-site"}, // nobody sends as carol: the newest handler
	} {
		if got := e.transportFor(c.profile); got != c.want {
			t.Errorf("transportFor(%q) = %v, want %v", c.profile, got, c.want)
		}
		if got := e.hookConfigFor(&Entry{st: State{Profile: c.profile}}); got.WebhookSecret != c.secret {
			t.Errorf("hookConfigFor(%q) has secret %q, want %q", c.profile, got.WebhookSecret, c.secret)
		}
	}
	if p := SenderProfile("alice@example.com", "smtp mail.example.com 587 4:user"); strings.Contains(p, "mail.example.com") || strings.Contains(p, "user") {
		t.Errorf("profile %q names the route in clear; it is stored with every message", p)
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
