package outbox

import (
	"bytes"
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

// The crash contract: a message may end unknown only if its final dot
// may have reached the server with no recorded reply. These tests kill
// an engine (its storage stops answering and its transport never returns,
// as with kill -9) at each point of an attempt, then let a new engine on
// the same storage take over, as the same instance (a restart) or as
// another (a takeover), and check what each message became and how often
// it was delivered.

var errKilled = errors.New("the process was killed")

// mortalStorage is a storage whose process can be killed: from then on
// every operation fails, and nothing more reaches the storage behind it.
type mortalStorage struct {
	certmagic.Storage
	dead atomic.Bool
	// holdOutcomes makes every state write that records a delivered
	// message hang until the process dies (a slow storage): then only the
	// dot record can keep the server's answer
	holdOutcomes bool
	died         chan struct{}
	// held are the locks taken through it: they expire when the process
	// dies (the storage module's refresh of them dies with it)
	mu   sync.Mutex
	held map[string]bool
}

func (m *mortalStorage) kill() {
	m.dead.Store(true)
	close(m.died)
	m.mu.Lock()
	defer m.mu.Unlock()
	for name := range m.held {
		_ = m.Storage.Unlock(context.Background(), name)
	}
	m.held = nil
}

func (m *mortalStorage) Store(ctx context.Context, key string, value []byte) error {
	if m.holdOutcomes && strings.HasPrefix(key, KeySt) && bytes.Contains(value, []byte(`"sent_at"`)) {
		<-m.died
	}
	if m.dead.Load() {
		return errKilled
	}
	return m.Storage.Store(ctx, key, value)
}

func (m *mortalStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if m.dead.Load() {
		return nil, errKilled
	}
	return m.Storage.Load(ctx, key)
}

func (m *mortalStorage) Delete(ctx context.Context, key string) error {
	if m.dead.Load() {
		return errKilled
	}
	return m.Storage.Delete(ctx, key)
}

func (m *mortalStorage) Exists(ctx context.Context, key string) bool {
	return !m.dead.Load() && m.Storage.Exists(ctx, key)
}

func (m *mortalStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	if m.dead.Load() {
		return nil, errKilled
	}
	return m.Storage.List(ctx, path, recursive)
}

func (m *mortalStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	if m.dead.Load() {
		return certmagic.KeyInfo{}, errKilled
	}
	return m.Storage.Stat(ctx, key)
}

func (m *mortalStorage) Lock(ctx context.Context, name string) error {
	if m.dead.Load() {
		return errKilled
	}
	if err := m.Storage.Lock(ctx, name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.held == nil {
		if m.dead.Load() {
			_ = m.Storage.Unlock(context.Background(), name)
			return errKilled
		}
		m.held = map[string]bool{}
	}
	m.held[name] = true
	return nil
}

func (m *mortalStorage) Unlock(ctx context.Context, name string) error {
	if m.dead.Load() {
		return errKilled
	}
	m.mu.Lock()
	delete(m.held, name)
	m.mu.Unlock()
	return m.Storage.Unlock(ctx, name)
}

// A crash point: what the dying engine's transport does with the first
// message of the batch (m0) and when the process dies.
type crashPoint struct {
	name string
	// first runs for m0's attempts in the dying engine; it kills the
	// process (die) at its point
	first func(env *mailer.Envelope, n int, die func()) error
	// unknown is whether m0 must end unknown (its dot was in flight)
	unknown bool
	// holdOutcomes: the outcomes of delivered messages never reach the
	// batch's state before the crash; acceptedOthers: m1 and m2 were
	// accepted before m0's dot, so the dot record must say so
	holdOutcomes, acceptedOthers bool
}

var crashPoints = []crashPoint{
	{name: "in MAIL, nothing sent", first: func(_ *mailer.Envelope, _ int, die func()) error {
		die()
		return nil
	}},
	{name: "after a 451, in the next attempt's MAIL", first: func(_ *mailer.Envelope, n int, die func()) error {
		if n == 1 {
			return transient()
		}
		die()
		return nil
	}},
	{name: "dot in flight", first: func(env *mailer.Envelope, _ int, die func()) error {
		if err := env.BeforeDot(); err != nil {
			return err
		}
		die()
		return nil
	}, unknown: true},
	{name: "dot in flight, the outcomes before it not yet written", first: func(env *mailer.Envelope, n int, die func()) error {
		if n == 1 {
			return transient() // the worker goes on to m1 and m2 meanwhile
		}
		if err := env.BeforeDot(); err != nil {
			return err
		}
		die()
		return nil
	}, unknown: true, holdOutcomes: true, acceptedOthers: true},
}

// TestCrashAtEveryPointOfAnAttempt: three messages in one batch, claimed
// as one group by one worker; the process dies during m0's attempt while
// m1 and m2 are claimed ahead. Every message is then delivered exactly
// once by the engine that takes over, except m0 when its dot was in
// flight: that one ends unknown, says the instance stopped, and is never
// sent again.
func TestCrashAtEveryPointOfAnAttempt(t *testing.T) {
	for _, how := range []string{"restart", "takeover"} {
		for _, cp := range crashPoints {
			t.Run(how+"/"+cp.name, func(t *testing.T) {
				redistest.ForEachStorage(t, func(t *testing.T, newStorage func() certmagic.Storage) {
					testCrashAt(t, newStorage, cp, how == "restart")
				})
			})
		}
	}
}

func testCrashAt(t *testing.T, newStorage func() certmagic.Storage, cp crashPoint, restart bool) {
	mortal := &mortalStorage{Storage: newStorage(), holdOutcomes: cp.holdOutcomes, died: make(chan struct{})}
	release := make(chan struct{})
	var died sync.Once
	dead := make(chan struct{})
	die := func() {
		died.Do(func() {
			mortal.kill()
			close(dead)
		})
	}
	var first string
	var mu sync.Mutex
	marked := map[string]bool{} // the dying process marked the dot: it may have been sent
	dying := newFake()
	dying.hold = func(ctx context.Context, env *mailer.Envelope) {
		select {
		case <-dead:
			<-release // a dead process sends nothing more
		default:
		}
		before := env.BeforeDot
		env.BeforeDot = func() error {
			err := before()
			if err == nil {
				mu.Lock()
				marked[env.ID] = true
				mu.Unlock()
			}
			return err
		}
	}
	dying.outcome = func(env *mailer.Envelope, n int) error {
		mu.Lock()
		isFirst := env.ID == first
		mu.Unlock()
		if isFirst {
			if err := cp.first(env, n, die); err != nil {
				return err
			}
		}
		select {
		case <-dead:
			<-release
			return &mailer.Error{Code: mailer.CodeSMTPConnection, Phase: mailer.PhaseConnect, Err: errKilled}
		default:
		}
		return nil
	}
	cfg := testConfig()
	cfg.RetryBackoff, cfg.MaxBackoff = 50*time.Millisecond, 50*time.Millisecond
	a := New("dying", mortal, "inst-a", nil)
	a.Configure(cfg, nil, testProfile, dying, 1) // one worker: it claims the whole batch as one group
	// hold the worker until the batch is accepted, so that it claims the
	// three messages as one group
	gate := make(chan struct{})
	prevHold := dying.hold
	dying.hold = func(ctx context.Context, env *mailer.Envelope) {
		<-gate
		prevHold(ctx, env)
	}
	a.Start()
	t.Cleanup(func() {
		close(release)
		a.Shutdown()
		<-a.Done()
	})
	entries, err := a.Accept([]*NewMessage{message("m0@example.org"), message("m1@example.org"), message("m2@example.org")}, "", false)
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{entries[0].ID(), entries[1].ID(), entries[2].ID()}
	mu.Lock()
	first = ids[0]
	mu.Unlock()
	close(gate)
	select {
	case <-dead:
	case <-time.After(10 * time.Second):
		t.Fatal("the process never reached its crash point")
	}

	iid := "inst-b"
	if restart {
		iid = "inst-a"
	}
	taker := newFake()
	b := newEngine(t, newStorage(), iid, taker, cfg)
	b.Start()
	unknown := 0
	for i, id := range ids {
		st := waitFinal(t, b, id, 20*time.Second)
		mu.Lock()
		inFlight := marked[id]
		mu.Unlock()
		delivered := dying.deliveries(id) + taker.deliveries(id)
		switch {
		case i == 0 && cp.unknown && st.Status != Unknown:
			t.Errorf("m0, whose dot was in flight: %s, want unknown", st.Status)
		case i > 0 && cp.acceptedOthers && (st.Status != Sent || st.SMTPResponse != acceptedBeforeStop || delivered != 1):
			t.Errorf("m%d, accepted before the crash with its outcome unwritten: %s (%q), delivered %d times; want sent from the dot record, once",
				i, st.Status, st.SMTPResponse, delivered)
		case st.Status == Unknown:
			unknown++
			if !inFlight {
				t.Errorf("%s (m%d): unknown, but its dot was never sent", id, i)
			}
			if st.LastError != mailer.InterruptedError || st.LastCode != mailer.CodeUncertain {
				t.Errorf("%s (m%d): unknown with %q (%s), want the instance-stopped error", id, i, st.LastError, st.LastCode)
			}
		case st.Status != Sent:
			t.Errorf("%s (m%d): %s (%s), want sent", id, i, st.Status, st.LastError)
		case inFlight && taker.attempts[id] != 0:
			t.Errorf("%s (m%d): its dot may have been sent, yet it was attempted again", id, i)
		case !inFlight && (delivered != 1 || dying.deliveries(id) != 0):
			t.Errorf("%s (m%d): delivered %d times (%d by the dead process), want once after the crash", id, i, delivered, dying.deliveries(id))
		}
	}
	// at most one message per connection was inside its final dot
	if unknown > 2 {
		t.Errorf("%d messages unknown; the dead process had 2 connections", unknown)
	}
	if restart && b.Instance() != "inst-a" {
		t.Errorf("the restart runs as %q, want the dead process's id", b.Instance())
	}
	// nothing more is attempted later
	time.Sleep(300 * time.Millisecond)
	for _, id := range ids {
		if n := dying.deliveries(id) + taker.deliveries(id); n > 1 {
			t.Errorf("%s delivered %d times", id, n)
		}
	}
}
