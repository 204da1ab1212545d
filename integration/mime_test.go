package integration

import (
	"bytes"
	"net/mail"
	"strings"
	"testing"

	"github.com/caddy-authmail/authmail/internal/mailtest"
)

// parseMail parses a received message or fails the test.
func parseMail(t *testing.T, raw []byte) *mailtest.Message {
	t.Helper()
	m, err := mailtest.Parse(raw)
	if err != nil {
		t.Fatalf("message does not parse: %v", err)
	}
	return m
}

func headerOf(t *testing.T, raw []byte, name string) string {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("message does not parse: %v", err)
	}
	return msg.Header.Get(name)
}

// checkStandardHeaders asserts the headers every message carries, and
// the ones no message may carry.
func checkStandardHeaders(t *testing.T, p *mailtest.Message) {
	t.Helper()
	if p.Header.Get("From") != `"Example App" <no-reply@example.com>` {
		t.Errorf("From %q", p.Header.Get("From"))
	}
	if p.Header.Get("Mime-Version") != "1.0" {
		t.Errorf("MIME-Version %q", p.Header.Get("Mime-Version"))
	}
	if _, err := p.Header.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	if id := p.Header.Get("Message-Id"); !strings.HasSuffix(id, "@example.com>") || !strings.HasPrefix(id, "<") {
		t.Errorf("Message-ID %q", id)
	}
	for _, h := range []string{"Bcc", "X-Mailer", "User-Agent", "X-Authmail-Key"} {
		if _, ok := p.Header[h]; ok {
			t.Errorf("header %s must not be sent", h)
		}
	}
}

// checkAlternative asserts multipart/alternative with text first.
func checkAlternative(t *testing.T, p *mailtest.Message) {
	t.Helper()
	want := []string{"multipart/alternative", "text/plain; charset=UTF-8", "text/html; charset=UTF-8"}
	if strings.Join(p.Types, "|") != strings.Join(want, "|") {
		t.Errorf("MIME structure %v, want %v", p.Types, want)
	}
}
