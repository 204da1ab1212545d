package outbox

import (
	"strings"
	"testing"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

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
