package authmail

import (
	"testing"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestIdempotentReplayTakesNoStorageLock: a retry of a completed
// idempotent request, on another instance, is answered from the stored
// record without the storage lock (a contended one is polled once a
// second), and so is a different request under the same key (409).
func TestIdempotentReplayTakesNoStorageLock(t *testing.T) {
	forEachStorage(t, testIdempotentReplayTakesNoStorageLock)
}

func testIdempotentReplayTakesNoStorageLock(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	a := newInstance(t, shared).handler(withSMTP(t, srv))
	inB := newInstance(t, shared)
	counting := &brokenStorage{Storage: openStorage(t, shared), name: "counting-" + shared}
	b := inB.handler(withSMTP(t, srv), func(h *Handler) { h.storageOverride = counting })
	body := otp("jane@example.org")
	rec, first := call(t, a, "POST", "/authmail/send/otp", body, "Idempotency-Key: retry-1")
	if rec.Code != 200 || first["status"] != "sent" {
		t.Fatalf("first request: %d %v", rec.Code, first)
	}
	before := counting.idem.Load()
	rec, again := call(t, b, "POST", "/authmail/send/otp", body, "Idempotency-Key: retry-1")
	if rec.Code != 200 || again["id"] != first["id"] || rec.Header().Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay on another instance: %d %v %v", rec.Code, rec.Header(), again)
	}
	rec, out := call(t, b, "POST", "/authmail/send/otp", otp("other@example.org"), "Idempotency-Key: retry-1")
	if rec.Code != 409 || out["error_code"] != "idempotency_conflict" {
		t.Fatalf("different request under the same key: %d %v", rec.Code, out)
	}
	if n := counting.idem.Load() - before; n != 0 {
		t.Fatalf("the replay and the conflict took %d storage locks, want none", n)
	}
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("%d SMTP transactions, want 1", n)
	}
}
