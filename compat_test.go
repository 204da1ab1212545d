package authmail

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// TestCompatDefaults: compat authmail-relay makes Korean the default
// locale and puts magic links on the relay's path unless a link template
// for magic-link is configured; without compat, neither changes.
func TestCompatDefaults(t *testing.T) {
	h := &Handler{}
	if got := h.defaultLocaleCompat(); got != "" {
		t.Errorf("default locale without compat: %q", got)
	}
	h.Compat = compatRelay
	if got := h.defaultLocaleCompat(); got != "ko" {
		t.Errorf("default locale in compat: %q", got)
	}
	if got := h.expiryCompat(10); got != 15 {
		t.Errorf("OTP validity in compat: %d", got)
	}
	if got := (&Handler{}).expiryCompat(10); got != 10 {
		t.Errorf("OTP validity without compat: %d", got)
	}
	if got := relayLinks(nil, "https://app.example.com")["magic-link"]; got != "https://app.example.com/set-password?token={token}" {
		t.Errorf("magic link template %q", got)
	}
	own := map[string]string{"magic-link": "https://app.example.com/login?t={token}"}
	if got := relayLinks(own, "https://app.example.com")["magic-link"]; got != own["magic-link"] {
		t.Errorf("a configured template was replaced: %q", got)
	}
	if got := relayLinks(nil, ""); got != nil {
		t.Errorf("links without base_url: %v", got)
	}
}

// TestRelayErrorShapes: the detail that FastAPI (and so the relay) put in
// each kind of error answer, beside authmail's flat fields.
func TestRelayErrorShapes(t *testing.T) {
	for _, c := range []struct {
		status int
		e      errorResponse
		want   string
	}{
		{502, errorResponse{ErrorCode: "recipient_refused", Message: "m", Status: "failed", ID: "i", MessageID: "<x@y>"},
			`{"detail":{"error_code":"recipient_refused","message":"m"},"error_code":"recipient_refused","message":"m","status":"failed","id":"i","message_id":"<x@y>"}`},
		{422, errorResponse{ErrorCode: "invalid_request", Message: "code is required", Field: "code"},
			`{"detail":[{"type":"invalid_request","loc":["body","code"],"msg":"code is required"}],"error_code":"invalid_request","message":"code is required","field":"code"}`},
		{429, errorResponse{ErrorCode: "rate_limited", Message: "slow down"},
			`{"detail":"slow down","error_code":"rate_limited","message":"slow down"}`},
	} {
		if got := strings.TrimSpace(string(relayErrorBody(c.status, marshalJSON(c.e)))); got != c.want {
			t.Errorf("%d:\n%s\nwant\n%s", c.status, got, c.want)
		}
	}
	// a body that is no error answer stays as it is
	if got := string(relayErrorBody(502, []byte(`{"sent":true}`))); got != `{"sent":true}` {
		t.Errorf("non-error body rewritten: %s", got)
	}
	if a := relayAccepted("otp", "i", "<m@x>"); a.status != http.StatusOK || strings.TrimSpace(string(a.body)) != `{"sent":false,"status":"accepted","id":"i","message_id":"<m@x>"}` {
		t.Errorf("accepted %d %s", a.status, a.body)
	}
}

// TestRelayWebhookPayload: the relay's payload for a sent and a failed
// message, sent_at with +00:00.
func TestRelayWebhookPayload(t *testing.T) {
	at := time.Date(2026, 5, 15, 10, 0, 0, 123456789, time.FixedZone("KST", 9*3600))
	sent := outbox.State{ID: "i", MessageID: "<m@x>", Status: outbox.Sent, Attempts: 1, SentAt: at}
	if got := strings.TrimSpace(string(marshalJSON(relayPayloadOf(sent, "delivered")))); got != `{"message_id":"<m@x>","status":"delivered","error_code":null,"refused":[],"sent_at":"2026-05-15T01:00:00+00:00","attempts":1,"id":"i"}` {
		t.Errorf("sent: %s", got)
	}
	failed := outbox.State{ID: "i", MessageID: "<m@x>", Status: outbox.Unknown, Attempts: 2, LastCode: "smtp_disconnect_uncertain", Updated: at}
	if got := strings.TrimSpace(string(marshalJSON(relayPayloadOf(failed, "delivered")))); got != `{"message_id":"<m@x>","status":"failed","error_code":"smtp_disconnect_uncertain","refused":[],"sent_at":"2026-05-15T01:00:00+00:00","attempts":2,"id":"i"}` {
		t.Errorf("failed: %s", got)
	}
}

// TestCommaJoinedListsRefusedInJSON: a JSON config with a comma-joined
// webhook_allow_hosts entry, allow_origins entry or allow entry is
// refused with the syntax that works.
func TestCommaJoinedListsRefusedInJSON(t *testing.T) {
	base := func() *Handler {
		return &Handler{Capture: "/tmp/x", From: "a@example.com", Keys: []Key{{ID: "app", Secret: "0123456789abcdef0123"}}}
	}
	h := base()
	h.WebhookAllowHosts = []string{"127.0.0.1,localhost"}
	if err := h.checkConfig(); err == nil || err.Error() != `invalid webhook_allow_hosts entry '127.0.0.1,localhost': give one host per entry, not a comma-joined list (JSON: ["127.0.0.1", "localhost"]; Caddyfile: webhook_allow_hosts 127.0.0.1 localhost)` {
		t.Errorf("webhook_allow_hosts: %v", err)
	}
	h = base()
	h.AllowOrigins = []string{"https://a.example.com,https://b.example.com"}
	if err := h.checkConfig(); err == nil || !strings.Contains(err.Error(), "not commas: allow_origin https://a.example.com https://b.example.com") {
		t.Errorf("allow_origins: %v", err)
	}
	h = base()
	h.Keys[0].Allow = []string{"otp,send"}
	if err := h.checkConfig(); err == nil || !strings.Contains(err.Error(), "not commas: allow otp send") {
		t.Errorf("allow: %v", err)
	}
}
