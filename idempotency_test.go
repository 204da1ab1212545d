package authmail

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

func TestIdempotencyConcurrentDuplicatesSendOnce(t *testing.T) {
	forEachStorage(t, testIdempotencyConcurrentDuplicatesSendOnce)
}

func testIdempotencyConcurrentDuplicatesSendOnce(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { time.Sleep(50 * time.Millisecond); return nil }})
	h := newInstance(t, "").handler(withSMTP(t, srv))
	body := otp("jane@example.org")
	var wg sync.WaitGroup
	codes := make([]int, 10)
	ids := make([]string, 10)
	replayed := make([]bool, 10)
	for i := range 10 {
		wg.Go(func() {
			rec, out := call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: signup-42")
			codes[i], replayed[i] = rec.Code, rec.Header().Get("Idempotent-Replayed") == "true"
			ids[i], _ = out["id"].(string)
		})
	}
	wg.Wait()
	nReplayed := 0
	for i := range 10 {
		if codes[i] != 200 || ids[i] != ids[0] || ids[0] == "" {
			t.Fatalf("request %d: %d id %q (first %q)", i, codes[i], ids[i], ids[0])
		}
		if replayed[i] {
			nReplayed++
		}
	}
	if nReplayed != 9 {
		t.Errorf("%d answers marked as replayed, want 9", nReplayed)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("the SMTP server got %d messages for 10 identical idempotent requests", n)
	}
}

// TestIdempotencyDuplicatesAcrossInstancesSendOnce: the same request
// arrives at two instances sharing a storage at the same time (a client
// retrying through a load balancer); the storage lock and record make one
// message, whichever instance answers.
func TestIdempotencyDuplicatesAcrossInstancesSendOnce(t *testing.T) {
	forEachStorage(t, testIdempotencyDuplicatesAcrossInstancesSendOnce)
}

func testIdempotencyDuplicatesAcrossInstancesSendOnce(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { time.Sleep(50 * time.Millisecond); return nil }})
	shared := t.TempDir()
	a := newInstance(t, shared).handler(withSMTP(t, srv))
	b := newInstance(t, shared).handler(withSMTP(t, srv))
	if a.engine == b.engine {
		t.Fatal("two instances should have two engines")
	}
	body := otp("jane@example.org")
	var wg sync.WaitGroup
	codes := make([]int, 10)
	ids := make([]string, 10)
	for i := range 10 {
		h := a
		if i%2 == 1 {
			h = b
		}
		wg.Go(func() {
			rec, out := call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: lb-retry-7")
			codes[i] = rec.Code
			ids[i], _ = out["id"].(string)
		})
	}
	wg.Wait()
	for i := range 10 {
		if codes[i] != 200 || ids[i] != ids[0] || ids[0] == "" {
			t.Fatalf("request %d: %d id %q (first %q)", i, codes[i], ids[i], ids[0])
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("the SMTP server got %d messages for 10 identical idempotent requests on two instances", n)
	}
}

func TestIdempotencyRules(t *testing.T) { forEachStorage(t, testIdempotencyRules) }

func testIdempotencyRules(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.Keys = append(h.Keys, Key{ID: "other", Secret: "another-key-0123456789"})
	})
	// a request that fails validation does not consume the key
	rec, out := call(t, h, "POST", "/authmail/send/otp", `{"to":"bad","code":"1"}`, "Idempotency-Key: k1")
	if rec.Code != 422 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	rec, out = call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: k1")
	if rec.Code != 200 || rec.Header().Get("Idempotent-Replayed") != "" {
		t.Fatalf("%d %v %s", rec.Code, rec.Header(), rec.Body)
	}
	first := rec.Body.String()
	id := out["id"].(string)
	// same key, same body: the original answer, nothing sent again
	rec, _ = call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: k1")
	if rec.Code != 200 || rec.Body.String() != first || rec.Header().Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay %d %s, want %s", rec.Code, rec.Body, first)
	}
	// same key, another body: conflict
	rec, out = call(t, h, "POST", "/authmail/send/otp", otp("someone@example.org"), "Idempotency-Key: k1")
	if rec.Code != 409 || out["error_code"] != "idempotency_conflict" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	// same key and body on another endpoint is another request
	rec, _ = call(t, h, "POST", "/authmail/send/magic-link", `{"to":"jane@example.org","token":"t"}`, "Idempotency-Key: k1")
	if rec.Code != 409 {
		t.Fatalf("other endpoint with the same key: %d", rec.Code)
	}
	// keys are scoped per API key
	req := func(key string) int {
		rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: k1", "Authorization: Bearer "+key)
		return rec.Code
	}
	if c := req("another-key-0123456789"); c != 200 {
		t.Fatalf("other API key: %d", c)
	}
	if n := len(srv.Messages()); n != 2 {
		t.Fatalf("%d messages, want 2 (one per API key)", n)
	}
	// malformed keys
	for _, k := range []string{"", strings.Repeat("k", 256), "has space", "tab\there", "ünï"} {
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: "+k)
		if k == "" {
			// an empty header value is present but invalid
			if rec.Code != 400 || out["error_code"] != "invalid_idempotency_key" {
				t.Errorf("empty key: %d %s", rec.Code, rec.Body)
			}
			continue
		}
		if rec.Code != 400 || out["error_code"] != "invalid_idempotency_key" {
			t.Errorf("key %q: %d %s", k, rec.Code, rec.Body)
		}
	}
	// the status endpoint shows the message created under the key
	if rec, st := call(t, h, "GET", "/authmail/messages/"+id, ""); rec.Code != 200 || st["status"] != "sent" {
		t.Fatalf("status %d %s", rec.Code, rec.Body)
	}
}

func TestIdempotencyRecoversAPendingRecord(t *testing.T) {
	forEachStorage(t, testIdempotencyRecoversAPendingRecord)
}

func testIdempotencyRecoversAPendingRecord(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv))
	body := otp("jane@example.org")
	ctx := context.Background()
	hashOf := func(k string) string {
		var out string
		// reuse the handler's own hashing by running a request with a
		// throwaway key and reading back the record it wrote
		rec, _ := call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: "+k)
		if rec.Code != 200 {
			t.Fatalf("%d", rec.Code)
		}
		keys, _ := h.engine.Storage().List(ctx, outbox.KeyIdem+h.keys[0].tenant, false)
		for _, key := range keys {
			var r idemRecord
			if h.shared.st.getJSON(ctx, key, &r) == nil && r.State == "done" {
				out = key
			}
		}
		return out
	}
	key := hashOf("crash-1")
	var rec idemRecord
	if err := h.shared.st.getJSON(ctx, key, &rec); err != nil {
		t.Fatal(err)
	}
	sent := len(srv.Messages())

	// 1. the instance crashed after accepting the message, before storing
	// the answer: the retry answers for the accepted message
	rec.State, rec.Status, rec.Body = "pending", 0, nil
	_ = h.shared.st.putJSON(ctx, key, rec)
	r, out := call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: crash-1")
	if r.Code != 200 || out["id"] != rec.ID || r.Header().Get("Idempotent-Replayed") != "true" {
		t.Fatalf("pending with an accepted message: %d %s (reserved %s)", r.Code, r.Body, rec.ID)
	}
	if len(srv.Messages()) != sent {
		t.Fatal("the message was sent again")
	}

	// 2. the instance crashed after reserving the id, before accepting:
	// the retry sends the message under the reserved id
	reserved := outbox.MessageID(outbox.NewID(time.Now()), 0)
	_ = h.shared.st.putJSON(ctx, key, idemRecord{RequestHash: rec.RequestHash, ID: reserved, State: "pending", Created: time.Now()})
	r, out = call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: crash-1")
	if r.Code != 200 || out["id"] != reserved {
		t.Fatalf("pending without a message: %d %s (reserved %s)", r.Code, r.Body, reserved)
	}
	if len(srv.Messages()) != sent+1 {
		t.Fatalf("%d messages, want one more", len(srv.Messages()))
	}
}

func TestIdempotencyDoesNotConsumeTheKeyOnQueueFull(t *testing.T) {
	forEachStorage(t, testIdempotencyDoesNotConsumeTheKeyOnQueueFull)
}

func testIdempotencyDoesNotConsumeTheKeyOnQueueFull(t *testing.T) {
	port := smtptest.Silent(t)
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.SMTP.Port = port
		h.Delivery.MaxQueued = 1
	})
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("a@example.org"), "Prefer: respond-async"); rec.Code != 202 {
		t.Fatal(rec.Code)
	}
	rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("b@example.org"), "Prefer: respond-async", "Idempotency-Key: full-1")
	if rec.Code != 503 {
		t.Fatalf("%d", rec.Code)
	}
	keys, _ := h.engine.Storage().List(context.Background(), outbox.KeyIdem+h.keys[0].tenant, false)
	if len(keys) != 0 {
		t.Fatalf("a 503 consumed the key: %v", keys)
	}
}

var _ = fmt.Sprint
