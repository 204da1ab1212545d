package outbox

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/redistest"
)

func TestLingeringStateIsWrittenDespiteConstantUrgentWrites(t *testing.T) {
	redistest.ForEachStorage(t, testLingeringStateIsWrittenDespiteConstantUrgentWrites)
}

func testLingeringStateIsWrittenDespiteConstantUrgentWrites(t *testing.T, newStorage func() certmagic.Storage) {
	e := newEngine(t, newStorage(), "inst", newFake(), nil)
	e.Start()
	ctx := context.Background()
	lazy := &batch{id: NewID(time.Now())}
	e.mu.Lock()
	e.markDirtyLocked(lazy, nil, false)
	e.mu.Unlock()
	// four workers keep claiming: some urgent change is always pending
	var stop atomic.Bool
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				b := &batch{id: NewID(time.Now())}
				done := make(chan error, 1)
				e.mu.Lock()
				e.markDirtyLocked(b, func(err error) { done <- err }, true)
				e.mu.Unlock()
				<-done
			}
		}()
	}
	defer func() { stop.Store(true); wg.Wait() }()
	deadline := time.Now().Add(5 * time.Second)
	for !e.Storage().Exists(ctx, KeySt+lazy.id) {
		if time.Now().After(deadline) {
			t.Fatal("a lingering state change waited behind urgent writes for 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAcceptRacingShutdownDoesNotHang: a request that passed the
// engine's closing check just before a shutdown began (a reload that
// drops the engine, with a request in flight on the old server) gets an
// error once the engine has stopped, instead of waiting forever for an
// appender that is gone; nothing stays reserved against max_queued.
func TestAcceptRacingShutdownDoesNotHang(t *testing.T) {
	redistest.ForEachStorage(t, testAcceptRacingShutdownDoesNotHang)
}

func testAcceptRacingShutdownDoesNotHang(t *testing.T, newStorage func() certmagic.Storage) {
	e := newEngine(t, newStorage(), "inst", newFake(), nil)
	e.Start()
	e.Shutdown()
	<-e.Done()
	e.mu.Lock()
	e.closing = false // as seen by the request before the shutdown
	e.mu.Unlock()
	msg := &NewMessage{KeyID: "app", Flow: "otp", Env: &mailer.Envelope{From: "no-reply@example.com", To: []string{"jane@example.org"}, Data: []byte("x")}}
	expectShuttingDown(t, "accept after the engine stopped", func() error {
		_, err := e.Accept([]*NewMessage{msg}, "", false)
		return err
	})
	e.mu.Lock()
	e.closing = true
	reserved := e.reserved
	e.mu.Unlock()
	if reserved != 0 {
		t.Fatalf("%d messages still reserved", reserved)
	}
}

// TestBackoffDoublesWithJitterUnderTheCap: retry_backoff doubles per
// attempt with ±25% jitter drawn per batch and attempt, and max_backoff
// is a hard cap, with capped delays still spread out.
func TestBackoffDoublesWithJitterUnderTheCap(t *testing.T) {
	cfg := &Config{RetryBackoff: 30 * time.Second, MaxBackoff: 30 * time.Minute}
	for i := range 200 {
		bid := NewID(time.Now().Add(time.Duration(i) * time.Millisecond))
		for attempts, base := range map[int]time.Duration{1: 30 * time.Second, 2: time.Minute, 3: 2 * time.Minute, 6: 16 * time.Minute} {
			if d := backoff(cfg, attempts, bid); d < base*3/4 || d > base*5/4 {
				t.Fatalf("attempt %d: %s, want %s ±25%%", attempts, d, base)
			}
		}
		for _, attempts := range []int{7, 8, 20, 300} {
			if d := backoff(cfg, attempts, bid); d > cfg.MaxBackoff || d < cfg.MaxBackoff*3/4 {
				t.Fatalf("attempt %d: %s, want within [22m30s, 30m]", attempts, d)
			}
		}
		if backoff(cfg, 2, bid) != backoff(cfg, 2, bid) {
			t.Fatal("the jitter of a batch and attempt must be the same every time")
		}
	}
	// the jitter spreads batches out, at the cap too
	seen := map[time.Duration]bool{}
	for i := range 50 {
		seen[backoff(cfg, 10, NewID(time.Now().Add(time.Duration(i)*time.Second)))] = true
	}
	if len(seen) < 40 {
		t.Errorf("only %d distinct capped delays for 50 batches", len(seen))
	}
}

// TestStopBetweenClaimAndClaimWrite: a worker took a group from the
// ready queue (claimed, counted as an attempt) and has not written the
// claims yet when a stop begins. The stop gives the claims back (queued,
// the attempt count undone), and the worker's claim write then writes
// nothing and returns at once: before, it could mark the given-back
// messages "sending" (unknown at the next start) or wait forever for a
// state writer that had exited.
func TestStopBetweenClaimAndClaimWrite(t *testing.T) {
	redistest.ForEachStorage(t, testStopBetweenClaimAndClaimWrite)
}

func testStopBetweenClaimAndClaimWrite(t *testing.T, newStorage func() certmagic.Storage) {
	hang := make(chan struct{})
	var mails atomic.Int32
	tr := newFake()
	tr.hold = func(context.Context, *mailer.Envelope) { mails.Add(1); <-hang }
	s := newStorage()
	e := newEngine(t, s, "inst", tr, nil)
	// the held workers are not waited for by the stop: once released,
	// they record their attempts after the test's own end; on file
	// storage the temporary directory is removed only once that is done
	t.Cleanup(func() {
		close(hang)
		if fs, ok := s.(*certmagic.FileStorage); ok {
			waitQuiet(t, fs.Path)
		}
	})
	e.Start()
	// both workers hang in MAIL
	accept(t, e, "blocker1@example.org")
	accept(t, e, "blocker2@example.org")
	waitCount(t, &mails, 2, "MAIL commands")
	ids := []string{accept(t, e, "c0@example.org")[0], accept(t, e, "c1@example.org")[0], accept(t, e, "c2@example.org")[0]}
	group := e.nextReady() // a third worker, between nextReady and its claim write
	if len(group) == 0 {
		t.Fatal("nothing to claim")
	}
	e.Shutdown()
	expectShuttingDown(t, "holding the claims after the stop", func() error { return e.holdClaims(group) })
	e.mu.Lock()
	for _, en := range group {
		if en.claimed || en.st.Status != Queued || en.st.Attempts != 0 {
			t.Errorf("%s after the stop: claimed %v, %s, %d attempts", en.st.ID, en.claimed, en.st.Status, en.st.Attempts)
		}
	}
	e.mu.Unlock()
	for _, id := range ids {
		if m, ok := storedState(t, s, id); !ok || m.Status != Queued || m.Attempts != 0 {
			t.Errorf("%s in storage: %s with %d attempts (found: %v), want queued with 0", id, m.Status, m.Attempts, ok)
		}
	}
}

// expectShuttingDown runs f, which must return errShuttingDown within
// 5 seconds instead of waiting for an engine that stopped.
func expectShuttingDown(t *testing.T, what string, f func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrShuttingDown) {
			t.Fatalf("%s: %v, want errShuttingDown", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s never returned", what)
	}
}

// waitQuiet waits, up to 10 s, until nothing below dir has changed for
// half a second: writes still in flight after a test's end would make
// the removal of its temporary directory fail.
func waitQuiet(t *testing.T, dir string) {
	t.Helper()
	stamp := func() string {
		var b strings.Builder
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil {
				if fi, err := d.Info(); err == nil {
					fmt.Fprintf(&b, "%s %d %d\n", p, fi.Size(), fi.ModTime().UnixNano())
				}
			}
			return nil
		})
		return b.String()
	}
	deadline := time.Now().Add(10 * time.Second)
	last := stamp()
	for time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		now := stamp()
		if now == last {
			return
		}
		last = now
	}
}
