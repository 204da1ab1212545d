package authmail

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestStaleStateIsNotWrittenOverAnAdoptersOutcome: while the storage
// failed every write for longer than the lease (a Redis outage), another
// instance adopted a batch — raising the owner's fencing epoch first, as
// every adopter does — delivered its message and recorded "sent". When
// the storage answers again, the first instance's retried write of its
// old state ("queued") must not overwrite that: the message would show
// as queued forever, and a restart of the adopter could send it again.
func TestStaleStateIsNotWrittenOverAnAdoptersOutcome(t *testing.T) {
	forEachStorage(t, testStaleStateIsNotWrittenOverAnAdoptersOutcome)
}

func testStaleStateIsNotWrittenOverAnAdoptersOutcome(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	refuseMail(srv)
	h, fs := faultyHandler(t, srv)
	e := h.engine
	ctx := context.Background()
	id := sendAsync(t, h, "jane@example.org")
	bid := outbox.BatchOf(id)
	deadline := time.Now().Add(5 * time.Second)
	for storedStatus(t, h, id) != outbox.Queued || mustState(t, h, id).Attempts == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the first attempt was never recorded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// from now on every state write fails, as during an outage
	var failed atomic.Int32
	fs.set(func(f *faultyStorage) {
		f.storeIf = func(key string, _ []byte) bool {
			if strings.HasPrefix(key, outbox.KeySt) {
				failed.Add(1)
				return true
			}
			return false
		}
	})
	for failed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no state write failed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// meanwhile another instance adopts the batch and delivers it
	inner := store{s: fs.Storage}
	adopter := "0b6f9a3e-5a8e-4c55-9d1b-6a1f2c3d4e5f"
	bs, err := inner.loadState(ctx, bid)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.RaiseEpoch(ctx, e.Instance()); err != nil {
		t.Fatal(err)
	}
	bs.Owner, bs.Done, bs.Updated = adopter, true, time.Now()
	bs.Messages[0].Status, bs.Messages[0].Attempts = outbox.Sent, bs.Messages[0].Attempts+1
	for _, err := range []error{
		inner.s.Store(ctx, outbox.OwnKey(adopter, bid), []byte("x")),
		inner.s.Delete(ctx, outbox.OwnKey(e.Instance(), bid)),
		inner.putJSON(ctx, outbox.KeySt+bid, bs),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	// the storage answers again; the failed write is retried a second later
	fs.set(func(f *faultyStorage) { f.storeIf = nil })
	time.Sleep(2500 * time.Millisecond)
	var got outbox.BatchState
	if err := inner.getJSON(ctx, outbox.KeySt+bid, &got); err != nil {
		t.Fatal(err)
	}
	if got.Owner != adopter || got.Messages[0].Status != outbox.Sent {
		t.Fatalf("the adopter's outcome was overwritten: owner %s, status %s", got.Owner, got.Messages[0].Status)
	}
}

func mustState(t *testing.T, h *Handler, id string) outbox.State {
	t.Helper()
	st, ok := storedState(h, id)
	if !ok {
		t.Fatalf("no stored state for %s", id)
	}
	return st
}
