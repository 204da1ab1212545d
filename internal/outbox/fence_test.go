package outbox

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/redistest"
)

// fakeClock is a clock that moves only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at      time.Time
	f       func()
	stopped bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Now()} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := !t.stopped
		t.stopped = true
		return was
	}
}

// Advance moves the clock and runs the timers that came due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*fakeTimer
	rest := c.timers[:0]
	for _, t := range c.timers {
		switch {
		case t.stopped:
		case !t.at.After(c.now):
			t.stopped = true
			due = append(due, t)
		default:
			rest = append(rest, t)
		}
	}
	c.timers = rest
	c.mu.Unlock()
	for _, t := range due {
		t.f()
	}
}

// setClock makes an engine, not yet started, run on c.
func setClock(e *Engine, c clock) {
	e.clk = c
	e.gate = newLeaseGate(c)
}

func TestLeaseGateCountsFromTheSendAndLapsesByItsTimer(t *testing.T) {
	c := newFakeClock()
	g := newLeaseGate(c)
	if g.valid() {
		t.Fatal("valid before any ownership was established")
	}
	sent := c.Now()
	c.Advance(300 * time.Millisecond) // the write took 300 ms to be answered
	g.establish(sent, time.Second)
	ctx, _, err := g.check()
	if err != nil {
		t.Fatal(err)
	}
	c.Advance(699 * time.Millisecond)
	if !g.valid() {
		t.Fatal("lapsed before sent + valid")
	}
	// a renewal sent now extends from its send
	sent2 := c.Now()
	if !g.renew(sent2, time.Second) {
		t.Fatal("a renewal within the holding failed")
	}
	c.Advance(time.Millisecond) // sent + 1000 ms: the first holding ended
	if !g.valid() || ctx.Err() != nil {
		t.Fatal("the renewal did not extend the holding")
	}
	// no renewal: the timer ends the holding at sent2 + 1 s, whether or
	// not anybody checks
	c.Advance(999 * time.Millisecond)
	if ctx.Err() == nil {
		t.Fatal("the holding's context was not cancelled when it lapsed")
	}
	if g.valid() {
		t.Fatal("valid after the lapse")
	}
	// a renewal that gets through after the lapse does not revive it
	if g.renew(c.Now(), time.Second) || g.valid() {
		t.Fatal("a renewal after the lapse revived the holding without re-establishing it")
	}
	g.establish(c.Now(), time.Second)
	ctx2, _, err := g.check()
	if err != nil || ctx2.Err() != nil {
		t.Fatalf("re-established: %v", err)
	}
}

// heldStorage fails the heartbeat's writes while blocked: the instance is
// cut off from its storage for its renewals.
type heldStorage struct {
	certmagic.Storage
	blocked atomic.Bool
}

func (h *heldStorage) Store(ctx context.Context, key string, value []byte) error {
	if h.blocked.Load() && strings.HasPrefix(key, KeyInst) {
		return errors.New("storage unreachable")
	}
	return h.Storage.Store(ctx, key, value)
}

// A pause between the ownership check that starts an attempt and the
// final dot, longer than the lease: the dot is not sent.
func TestNoDotAfterTheLeaseLapsedMidAttempt(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		c := newFakeClock()
		hs := &heldStorage{Storage: open()}
		tr := newFake()
		inAttempt, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		tr.hold = func(ctx context.Context, env *mailer.Envelope) {
			once.Do(func() { close(inAttempt); <-release })
		}
		cfg := testConfig()
		cfg.RetryBackoff = 100 * time.Millisecond
		e := newEngine(t, hs, "inst-a", tr, cfg)
		setClock(e, c)
		e.Start()
		id := accept(t, e, "a@example.org")[0]
		<-inAttempt
		hs.blocked.Store(true)
		c.Advance(e.leaseDuration()) // past lease − margin since the last renewal
		close(release)
		st := waitLookup(t, e, id, 10*time.Second, "the attempt's outcome", func(st State) bool { return st.Status != Sending })
		if n := tr.deliveries(id); n != 0 {
			t.Fatalf("delivered %d times after the lease lapsed mid-attempt", n)
		}
		if st.Status != Queued {
			t.Fatalf("%s, want queued again", st.Status)
		}
		// once the storage answers again the instance re-establishes its
		// ownership and delivers it, once
		hs.blocked.Store(false)
		waitStatus(t, e, id, Sent, 20*time.Second)
		if n := tr.deliveries(id); n != 1 {
			t.Fatalf("delivered %d times, want once", n)
		}
	})
}

// A fenced write that reaches the storage after the epoch it was made
// under moved on, or after its deadline, is refused and changes nothing.
func TestFencedWritesAreRefusedAfterTheOwnershipEnded(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		s := open()
		f := fencerFor(s)
		ctx := context.Background()
		ep, err := f.bump(ctx, "inst-a", nil)
		if err != nil {
			t.Fatal(err)
		}
		key := KeySt + "06h5000000000000000000000"
		if err := f.apply(ctx, []fenceCond{{"inst-a", ep}}, time.Now().Add(time.Minute), []fenceOp{{key: key, value: []byte(`{"owner":"inst-a"}`)}}); err != nil {
			t.Fatalf("a write under the current epoch: %v", err)
		}
		// another instance adopts: the epoch moves on
		ep2, err := f.bump(ctx, "inst-a", nil)
		if err != nil || ep2 != ep+1 {
			t.Fatalf("bump: %d, %v", ep2, err)
		}
		if err := f.apply(ctx, []fenceCond{{"inst-b", 0}, {"inst-a", ep2}}, time.Now().Add(time.Minute), []fenceOp{{key: key, value: []byte(`{"owner":"inst-b","status":"unknown"}`)}}); err != nil {
			t.Fatalf("the adopter's write: %v", err)
		}
		// the old owner's write, held by the network until now
		err = f.apply(ctx, []fenceCond{{"inst-a", ep}}, time.Now().Add(time.Minute), []fenceOp{{key: key, value: []byte(`{"owner":"inst-a","status":"queued"}`)}})
		if !errors.Is(err, errFenced) {
			t.Fatalf("a write under an old epoch: %v, want refused", err)
		}
		// a write that arrives after its deadline
		err = f.apply(ctx, []fenceCond{{"inst-b", 0}}, time.Now().Add(-time.Millisecond), []fenceOp{{key: key, value: []byte(`late`)}})
		if !errors.Is(err, errFenced) {
			t.Fatalf("a write past its deadline: %v, want refused", err)
		}
		b, err := s.Load(ctx, key)
		if err != nil || string(b) != `{"owner":"inst-b","status":"unknown"}` {
			t.Fatalf("stored %q, %v: the adopter's decision was overwritten", b, err)
		}
		// the adopter's raise is conditional on the heartbeat it watched
		if err := s.Store(ctx, KeyInst+"inst-a", []byte(`hb1`)); err != nil {
			t.Fatal(err)
		}
		if _, err := f.bump(ctx, "inst-a", []byte(`hb0`)); !errors.Is(err, errFenced) {
			t.Fatalf("a raise on a heartbeat that changed: %v, want refused", err)
		}
		if _, err := f.bump(ctx, "inst-a", []byte(`hb1`)); err != nil {
			t.Fatalf("a raise on the heartbeat watched: %v", err)
		}
		// values written by the script read back through the module
		keys, err := s.List(ctx, strings.TrimSuffix(KeySt, "/"), false)
		if err != nil || len(keys) != 1 || keys[0] != key {
			t.Fatalf("listed %v, %v", keys, err)
		}
	})
}

// An instance cut off from its storage for longer than the lease, while
// an attempt of it is in flight, is adopted; when it heals it sends
// nothing of the adopted work and writes none of it: every message is
// delivered once, by the adopter.
func TestAdoptedInstanceSendsNothingAfterItHeals(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		c := newFakeClock()
		hs := &heldStorage{Storage: open()}
		trA := newFake()
		inAttempt, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		trA.hold = func(ctx context.Context, env *mailer.Envelope) {
			once.Do(func() { close(inAttempt) })
			<-release
		}
		a := newEngine(t, hs, "inst-a", trA, nil)
		setClock(a, c)
		a.Start()
		ids := accept(t, a, "a@example.org", "b@example.org", "c@example.org")
		<-inAttempt
		hs.blocked.Store(true) // its heartbeats stop reaching the storage
		c.Advance(a.leaseDuration())
		trB := newFake()
		b := newEngine(t, open(), "inst-b", trB, nil)
		b.Start()
		for _, id := range ids {
			waitStatus(t, b, id, Sent, 20*time.Second)
		}
		close(release) // the cut-off instance's attempt goes on
		hs.blocked.Store(false)
		// it re-establishes its ownership and finds its work adopted
		deadline := time.Now().Add(10 * time.Second)
		for {
			inv := a.Inventory()
			if len(inv.Resident) == 0 && len(inv.Parked) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the healed instance still holds %d messages", len(inv.Resident))
			}
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond)
		for _, id := range ids {
			if n := trA.deliveries(id); n != 0 {
				t.Errorf("%s: the adopted instance delivered it %d times after it healed", id, n)
			}
			if n := trB.deliveries(id); n != 1 {
				t.Errorf("%s: delivered %d times by the adopter, want once", id, n)
			}
			if st, ok := storedState(t, hs, id); !ok || st.Status != Sent {
				t.Errorf("%s: stored %s, want sent (the healed instance wrote over the adopter's state?)", id, st.Status)
			}
		}
	})
}

// stallingStorage never answers a write of an accepted batch until the
// caller gives up (a storage that stalls or crawls).
type stallingStorage struct {
	certmagic.Storage
	stall atomic.Bool
}

func (s *stallingStorage) Store(ctx context.Context, key string, value []byte) error {
	if s.stall.Load() && (strings.HasPrefix(key, KeySeg) || strings.HasPrefix(key, KeyOwn)) {
		<-ctx.Done()
		return ctx.Err()
	}
	return s.Storage.Store(ctx, key, value)
}

// An accept answers by its deadline whatever the storage does: with the
// messages durable, or with an error (the handler's 503), and a request
// answered with an error leaves nothing to deliver.
func TestAcceptAnswersByItsDeadline(t *testing.T) {
	prev := acceptTimeout
	acceptTimeout = 500 * time.Millisecond
	t.Cleanup(func() { acceptTimeout = prev })
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		ss := &stallingStorage{Storage: open()}
		tr := newFake()
		e := newEngine(t, ss, "inst-a", tr, nil)
		e.Start()
		ss.stall.Store(true)
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				_, err := e.Accept([]*NewMessage{message("a@example.org")}, "", false)
				if took := time.Since(start); took > 5*time.Second {
					t.Errorf("accept %d answered after %s", i, took)
				}
				if err == nil {
					t.Errorf("accept %d succeeded on a storage that never answered", i)
				}
			}()
		}
		wg.Wait()
		ss.stall.Store(false)
		accept(t, e, "b@example.org") // and the engine works on once it answers
		time.Sleep(200 * time.Millisecond)
		tr.mu.Lock()
		n := len(tr.attempts)
		tr.mu.Unlock()
		if n != 1 {
			t.Fatalf("%d messages attempted, want only the one accepted", n)
		}
	})
}
