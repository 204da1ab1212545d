package outbox

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/redistest"
)

// The engine's contract, on FileStorage and on Redis, through a fake
// transport: what each kind of outcome makes of a message, that any
// instance answers for any message, that a stopped instance's queue is
// delivered by another, and what the janitor removes.

func TestContractTransientFailuresAreRetried(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		tr := newFake()
		tr.outcome = func(_ *mailer.Envelope, n int) error {
			if n < 3 {
				return transient()
			}
			return nil
		}
		cfg := testConfig()
		cfg.RetryBackoff, cfg.MaxBackoff = 20*time.Millisecond, 20*time.Millisecond
		s := newStorage()
		e := newEngine(t, s, "inst", tr, cfg)
		e.Start()
		id := accept(t, e, "jane@example.org")[0]
		if st := waitStatus(t, e, id, Sent, 10*time.Second); st.Attempts != 3 || st.LastCode != "" {
			t.Fatalf("%+v, want sent on the third attempt", st)
		}
		if n := tr.deliveries(id); n != 1 {
			t.Fatalf("delivered %d times", n)
		}
		waitStored(t, s, id, Sent)
	})
}

func TestContractPermanentFailureIsFinal(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		tr := newFake()
		tr.outcome = func(*mailer.Envelope, int) error {
			return &mailer.Error{Code: mailer.CodeSMTPRejected, Phase: mailer.PhaseMail,
				Reply: &mailer.Reply{Code: 550, Enhanced: "5.7.1", Text: "sender refused"}}
		}
		cfg := testConfig()
		cfg.RetryBackoff, cfg.MaxBackoff = 10*time.Millisecond, 10*time.Millisecond
		s := newStorage()
		e := newEngine(t, s, "inst", tr, cfg)
		e.Start()
		id := accept(t, e, "jane@example.org")[0]
		st := waitStatus(t, e, id, Failed, 10*time.Second)
		if st.Attempts != 1 || st.LastCode != mailer.CodeSMTPRejected {
			t.Fatalf("%+v, want failed after one attempt with smtp_rejected", st)
		}
		time.Sleep(100 * time.Millisecond) // ten backoffs: nothing more
		tr.mu.Lock()
		n := tr.attempts[id]
		tr.mu.Unlock()
		if n != 1 {
			t.Fatalf("%d attempts of a permanently refused message", n)
		}
		waitStored(t, s, id, Failed)
	})
}

func TestContractUncertainIsNotResent(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		for _, retry := range []bool{false, true} {
			tr := newFake()
			tr.outcome = func(env *mailer.Envelope, n int) error {
				if n == 1 {
					_ = env.BeforeDot()
					return &mailer.Error{Code: mailer.CodeUncertain, Phase: mailer.PhaseEnd}
				}
				return nil
			}
			cfg := testConfig()
			cfg.RetryBackoff, cfg.MaxBackoff, cfg.RetryUncertain = 10*time.Millisecond, 10*time.Millisecond, retry
			e := newEngine(t, newStorage(), "inst-"+map[bool]string{false: "a", true: "b"}[retry], tr, cfg)
			e.Start()
			id := accept(t, e, "jane@example.org")[0]
			if !retry {
				st := waitStatus(t, e, id, Unknown, 10*time.Second)
				time.Sleep(100 * time.Millisecond)
				if st.LastCode != mailer.CodeUncertain || tr.deliveries(id) != 0 {
					t.Fatalf("%+v, %d deliveries; want unknown and never resent", st, tr.deliveries(id))
				}
				continue
			}
			if st := waitStatus(t, e, id, Sent, 10*time.Second); st.Attempts != 2 {
				t.Fatalf("retry_uncertain: %+v, want sent on the second attempt", st)
			}
		}
	})
}

// TestContractAnyInstanceAnswers: a message accepted by one instance is
// looked up by another on the same storage, as soon as it is stored.
func TestContractAnyInstanceAnswers(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		a := newEngine(t, newStorage(), "inst-a", newFake(), nil)
		b := newEngine(t, newStorage(), "inst-b", newFake(), nil)
		a.Start()
		b.Start()
		id := accept(t, a, "jane@example.org")[0]
		waitStatus(t, a, id, Sent, 10*time.Second)
		if st := waitStatus(t, b, id, Sent, 10*time.Second); st.ID != id || st.Attempts != 1 {
			t.Fatalf("another instance sees %+v", st)
		}
		if _, ok, err := b.Lookup(context.Background(), id[:len(id)-1]+"z"); ok || err != nil {
			t.Fatalf("an id that does not exist: found %v, %v", ok, err)
		}
	})
}

// TestContractStoppedInstanceIsAdopted: an instance stops with its queue
// waiting for a retry; another instance on the storage adopts the queue
// once the lease runs out and delivers each message once, when its retry
// is due.
func TestContractStoppedInstanceIsAdopted(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		down := newFake()
		down.outcome = func(*mailer.Envelope, int) error { return transient() }
		cfg := testConfig()
		cfg.RetryBackoff, cfg.MaxBackoff = 300*time.Millisecond, 300*time.Millisecond
		a := newEngine(t, newStorage(), "inst-a", down, cfg)
		a.Start()
		ids := accept(t, a, "m0@example.org", "m1@example.org", "m2@example.org")
		for _, id := range ids {
			waitAttempted(t, a, id, 1)
		}
		a.Shutdown()
		<-a.Done()
		up := newFake()
		b := newEngine(t, newStorage(), "inst-b", up, nil)
		b.Start()
		for _, id := range ids {
			if st := waitStatus(t, b, id, Sent, 20*time.Second); st.Attempts != 2 {
				t.Errorf("%s: %+v, want sent on the second attempt", id, st)
			}
			if n := up.deliveries(id) + down.deliveries(id); n != 1 {
				t.Errorf("%s delivered %d times", id, n)
			}
		}
		if owned, _ := OwnedBatches(context.Background(), b.Storage(), "inst-a"); len(owned) != 0 {
			t.Errorf("the stopped instance still owns %v", owned)
		}
	})
}

// TestContractJanitorRetiresAndRunsItsTasks: a finished batch's state
// record is deleted once retention passed, a stale idempotency record
// too, and the tasks added with OnJanitor run each round.
func TestContractJanitorRetiresAndRunsItsTasks(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		cfg := testConfig()
		cfg.Retention, cfg.IdemTTL = time.Millisecond, time.Millisecond
		s := newStorage()
		e := newEngine(t, s, "inst", newFake(), cfg)
		var tasks atomic.Int32
		e.OnJanitor(func(context.Context) { tasks.Add(1) })
		e.Tunables().JanitorEvery = time.Hour // the test drives it
		e.Start()
		id := accept(t, e, "jane@example.org")[0]
		waitStatus(t, e, id, Sent, 10*time.Second)
		ctx := context.Background()
		idem := KeyIdem + "app/some-key"
		if err := s.Store(ctx, idem, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for s.Exists(ctx, KeySt+BatchOf(id)) || s.Exists(ctx, idem) {
			if time.Now().After(deadline) {
				t.Fatalf("after janitor rounds: state record %v, idempotency record %v", s.Exists(ctx, KeySt+BatchOf(id)), s.Exists(ctx, idem))
			}
			time.Sleep(20 * time.Millisecond)
			e.Janitor(ctx)
		}
		if tasks.Load() == 0 {
			t.Fatal("the janitor's tasks never ran")
		}
	})
}

func TestContractGivesUpAfterMaxAge(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		tr := newFake()
		tr.outcome = func(*mailer.Envelope, int) error { return transient() }
		cfg := testConfig()
		cfg.RetryBackoff, cfg.MaxBackoff, cfg.MaxAge = 20*time.Millisecond, 20*time.Millisecond, 300*time.Millisecond
		s := newStorage()
		e := newEngine(t, s, "inst", tr, cfg)
		e.Start()
		id := accept(t, e, "jane@example.org")[0]
		st := waitStatus(t, e, id, Failed, 10*time.Second)
		if st.Attempts < 2 || st.LastCode != mailer.CodeSMTPTransient || tr.deliveries(id) != 0 {
			t.Fatalf("%+v, want failed with smtp_transient after several attempts", st)
		}
		waitStored(t, s, id, Failed)
	})
}

// TestContractQueueFull: with max_queued messages not yet final, Accept
// refuses more with ErrQueueFull and keeps nothing of the refused
// request; once one is final there is room again.
func TestContractQueueFull(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		release := make(chan struct{})
		tr := newFake()
		tr.hold = func(ctx context.Context, env *mailer.Envelope) {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		cfg := testConfig()
		cfg.MaxQueued = 3
		e := newEngine(t, newStorage(), "inst", tr, cfg)
		t.Cleanup(func() { close(release) })
		e.Start()
		for i := range 3 {
			accept(t, e, fmt.Sprintf("u%d@example.org", i))
		}
		if _, err := e.Accept([]*NewMessage{message("late@example.org")}, "", false); !errors.Is(err, ErrQueueFull) {
			t.Fatalf("a fourth message: %v, want ErrQueueFull", err)
		}
		if inv := e.Inventory(); inv.Reserved != 0 || inv.NonFinal != 3 || len(inv.Resident) != 3 {
			t.Fatalf("after the refusal: %d reserved, %d not final, %d in memory; want 0, 3, 3", inv.Reserved, inv.NonFinal, len(inv.Resident))
		}
		if depth, _ := e.QueueStats(); depth != 3 {
			t.Fatalf("queue depth %d, want 3", depth)
		}
		release <- struct{}{} // one delivery finishes
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if _, err := e.Accept([]*NewMessage{message("late@example.org")}, "", false); err == nil {
				break
			} else if !errors.Is(err, ErrQueueFull) || time.Now().After(deadline) {
				t.Fatalf("after a delivery: %v", err)
			}
		}
	})
}

// TestContractLiveInstanceIsLeftAlone: an instance that keeps its
// heartbeat keeps its batches, however long their retry waits; another
// instance on the storage never adopts them.
func TestContractLiveInstanceIsLeftAlone(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
		down := newFake()
		down.outcome = func(*mailer.Envelope, int) error { return transient() }
		a := newEngine(t, newStorage(), "inst-a", down, hourBackoff())
		a.Start()
		id := accept(t, a, "jane@example.org")[0]
		waitAttempted(t, a, id, 1)
		up := newFake()
		b := newEngine(t, newStorage(), "inst-b", up, nil)
		b.Start()
		time.Sleep(3 * time.Second) // three leases
		bid := BatchOf(id)
		if owned, _ := OwnedBatches(context.Background(), a.Storage(), "inst-a"); len(owned) != 1 || owned[0] != bid {
			t.Fatalf("the live instance's batches: %v, want [%s]", owned, bid)
		}
		if b.Inventory().Batches[bid] || up.deliveries(id) != 0 {
			t.Fatal("another instance adopted a live instance's batch")
		}
	})
}

// waitStored waits until the message's state record holds status.
func waitStored(t testing.TB, s certmagic.Storage, id, status string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if st, ok := storedState(t, s, id); ok && st.Status == status {
			return
		}
		if time.Now().After(deadline) {
			st, _ := storedState(t, s, id)
			t.Fatalf("%s in storage: %s, want %s", id, st.Status, status)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
