package outbox

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// The engine's own tests drive it through a fake transport, with no
// handler: a message is what Accept takes, a delivery is a call of the
// transport's Send, and storage is a real certmagic FileStorage or a
// real redis-server through the Redis storage module
// (redistest.ForEachStorage).

const testFrom = "no-reply@example.com"

var testProfile = SenderProfile(testFrom, "fake")

// fakeTransport delivers by counting. outcome, when set, decides each
// attempt (n counts the attempts of that message, from 1); hold, when
// set, runs first and may block (a server that hangs in MAIL).
type fakeTransport struct {
	mu        sync.Mutex
	outcome   func(env *mailer.Envelope, n int) error
	hold      func(ctx context.Context, env *mailer.Envelope)
	attempts  map[string]int
	delivered map[string]int
}

func newFake() *fakeTransport {
	return &fakeTransport{attempts: map[string]int{}, delivered: map[string]int{}}
}

func (f *fakeTransport) Send(ctx context.Context, env *mailer.Envelope) (mailer.Result, error) {
	f.mu.Lock()
	f.attempts[env.ID]++
	n, outcome, hold := f.attempts[env.ID], f.outcome, f.hold
	f.mu.Unlock()
	if hold != nil {
		hold(ctx, env)
	}
	if outcome != nil {
		if err := outcome(env, n); err != nil {
			return mailer.Result{}, err
		}
	}
	if env.BeforeDot != nil {
		if err := env.BeforeDot(); err != nil {
			return mailer.Result{}, &mailer.Error{Code: mailer.CodeOutboxUnavailable, Phase: mailer.PhaseBody, Err: err}
		}
	}
	f.mu.Lock()
	f.delivered[env.ID]++
	f.mu.Unlock()
	return mailer.Result{Status: "sent", Response: "2.0.0 Ok: queued"}, nil
}

func (f *fakeTransport) deliveries(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.delivered[id]
}

// testConfig is the handler's defaults with a short lease and drain.
func testConfig() *Config {
	return &Config{Wait: 8 * time.Second, RetryBackoff: 30 * time.Second, MaxBackoff: 30 * time.Minute,
		MaxAge: 24 * time.Hour, Retention: 7 * 24 * time.Hour, IdemTTL: 24 * time.Hour,
		Lease: time.Second, Drain: 200 * time.Millisecond}
}

var engineSeq sync.Mutex
var engineN int

// newEngine makes an engine on s as instance iid, configured with cfg
// (testConfig when nil) and tr, not yet started; it is shut down when t
// ends.
func newEngine(t testing.TB, s certmagic.Storage, iid string, tr mailer.Transport, cfg *Config) *Engine {
	t.Helper()
	if cfg == nil {
		cfg = testConfig()
	}
	engineSeq.Lock()
	engineN++
	key := fmt.Sprintf("test.%d", engineN)
	engineSeq.Unlock()
	e := New(key, s, iid, nil)
	e.Configure(cfg, zap.NewNop(), testProfile, tr, 2)
	t.Cleanup(func() {
		e.Shutdown()
		if e.Started() {
			<-e.Done()
		}
	})
	return e
}

// message is an OTP to one recipient from the test profile.
func message(to string) *NewMessage {
	return &NewMessage{KeyID: "app", Flow: "otp", Profile: testProfile, Tenant: "app",
		Env: &mailer.Envelope{From: testFrom, To: []string{to}, Data: []byte("Subject: x\r\n\r\nbody\r\n")}}
}

// accept accepts one message per recipient in one batch and returns
// their ids.
func accept(t testing.TB, e *Engine, to ...string) []string {
	t.Helper()
	msgs := make([]*NewMessage, len(to))
	for i, r := range to {
		msgs[i] = message(r)
	}
	entries, err := e.Accept(msgs, "", false)
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	ids := make([]string, len(entries))
	for i, en := range entries {
		ids[i] = en.ID()
	}
	return ids
}

// storedState is a message's state as its batch's state record holds it.
func storedState(t testing.TB, s certmagic.Storage, id string) (State, bool) {
	t.Helper()
	bs, err := store{s: s}.loadState(context.Background(), BatchOf(id))
	if err != nil {
		return State{}, false
	}
	return bs.Message(id)
}

// waitCount waits until c reaches n.
func waitCount(t testing.TB, c *atomic.Int32, n int32, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for c.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d %s, want %d", c.Load(), what, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// transient is a 451 at MAIL.
func transient() error {
	return &mailer.Error{Code: mailer.CodeSMTPTransient, Phase: mailer.PhaseMail,
		Reply: &mailer.Reply{Code: 451, Enhanced: "4.3.0", Text: "try again later"}}
}

// hourBackoff is testConfig with every retry an hour away.
func hourBackoff() *Config {
	cfg := testConfig()
	cfg.RetryBackoff, cfg.MaxBackoff = time.Hour, time.Hour
	return cfg
}

// residentIDs returns how many of ids are in memory, and the number of
// parked batches.
func residentIDs(e *Engine, ids []string) (int, int) {
	inv := e.Inventory()
	n := 0
	for _, id := range ids {
		if _, ok := inv.Resident[id]; ok {
			n++
		}
	}
	return n, len(inv.Parked)
}

// waitLookup waits up to d until Lookup finds the message in a state for
// which want is true; what names that state when it never comes.
func waitLookup(t testing.TB, e *Engine, id string, d time.Duration, what string, want func(State) bool) State {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, ok, err := e.Lookup(context.Background(), id)
		if err == nil && ok && want(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s with %d attempts (found %v, %v) after %s, want %s", id, st.Status, st.Attempts, ok, err, d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitStatus waits up to d for the message to reach status.
func waitStatus(t testing.TB, e *Engine, id, status string, d time.Duration) State {
	t.Helper()
	return waitLookup(t, e, id, d, status, func(st State) bool { return st.Status == status })
}

// waitFinal waits up to d for the message to reach a final state.
func waitFinal(t testing.TB, e *Engine, id string, d time.Duration) State {
	t.Helper()
	return waitLookup(t, e, id, d, "a final state", func(st State) bool { return IsFinal(st.Status) })
}

// waitAttempted waits until the message's outcome records n attempts.
func waitAttempted(t testing.TB, e *Engine, id string, n int) {
	t.Helper()
	waitLookup(t, e, id, 10*time.Second, fmt.Sprintf("%d attempts recorded", n), func(st State) bool {
		return st.Attempts >= n && st.Status != Sending
	})
}
