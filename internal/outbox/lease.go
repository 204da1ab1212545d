package outbox

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Self-fencing: an instance works only while it provably owns its work.
//
// The instance renews its lease by writing its heartbeat. A renewal
// counts once the storage acknowledged it, and from the moment the write
// was SENT: the write reached the storage at that moment or later, so an
// adopter, which waits lease + margin after it first saw the heartbeat
// unchanged, cannot start before sent + lease + margin (by the two
// monotonic clocks, whose rates differ by far less than margin/lease).
// The instance's ownership is valid until sent + lease − margin, by its
// own monotonic clock: 2 × margin before any adopter may touch its work.
//
// While it is valid the instance may start an SMTP transaction, send a
// final dot, accept mail and write its records. When it lapses (the
// storage errs, stalls or does not answer; the process paused), a timer
// fires at that moment: the lease's context is cancelled, which stops
// every wait of every attempt, and every later check fails, the one right
// before each final dot included. The lease is not simply renewed by the
// next heartbeat that gets through: the instance re-establishes its
// ownership first (cluster.go: reestablish), under the adoption lock,
// raising its fencing epoch and dropping from memory, without writing
// them, the batches another instance adopted meanwhile.

// clock is the engine's source of time: the monotonic clock in
// production, a fake one in tests.
type clock interface {
	Now() time.Time
	// AfterFunc runs f after d; the returned func stops it.
	AfterFunc(d time.Duration, f func()) func() bool
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

// leaseMargin is how much of the lease an instance gives up for clock
// drift and for the storage's own latency: it stops working margin
// before its lease ends, and an adopter waits margin after it. It is a
// fifth of the lease, at least 50 ms.
func leaseMargin(lease time.Duration) time.Duration {
	return max(lease/5, 50*time.Millisecond)
}

// errLeaseLapsed is the error of work refused because the instance's
// ownership is not valid now.
var errLeaseLapsed = errors.New("this instance's lease on its work is not valid now (the storage did not acknowledge a heartbeat in time); it does no work until it re-establishes its ownership")

// leaseGate holds whether, and until when, the instance owns its work.
type leaseGate struct {
	clk clock

	mu     sync.Mutex
	held   bool      // ownership established, not lapsed since
	until  time.Time // valid before this, by the monotonic clock
	ctx    context.Context
	cancel context.CancelCauseFunc
	stop   func() bool // the lapse timer
}

func newLeaseGate(clk clock) *leaseGate {
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(errLeaseLapsed)
	return &leaseGate{clk: clk, ctx: ctx, cancel: cancel}
}

// establish starts a new holding, valid until sent + valid: the
// instance re-established its ownership with a heartbeat sent at sent.
func (g *leaseGate) establish(sent time.Time, valid time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.held {
		g.ctx, g.cancel = context.WithCancelCause(context.Background())
		g.held = true
	}
	g.until = sent.Add(valid)
	g.armLocked()
}

// renew extends the holding with a heartbeat sent at sent and
// acknowledged; it reports false, and extends nothing, when the holding
// lapsed (the instance must re-establish its ownership first).
func (g *leaseGate) renew(sent time.Time, valid time.Duration) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.held || !g.clk.Now().Before(g.until) {
		g.lapseLocked()
		return false
	}
	if u := sent.Add(valid); u.After(g.until) {
		g.until = u
	}
	g.armLocked()
	return true
}

// armLocked sets the lapse timer for until.
func (g *leaseGate) armLocked() {
	if g.stop != nil {
		g.stop()
	}
	d := g.until.Sub(g.clk.Now())
	g.stop = g.clk.AfterFunc(max(d, 0), g.fire)
}

// fire is the lapse timer: the holding lapses unless a renewal moved
// until meanwhile (then the timer is set again).
func (g *leaseGate) fire() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.held {
		return
	}
	if g.clk.Now().Before(g.until) {
		g.armLocked()
		return
	}
	g.lapseLocked()
}

func (g *leaseGate) lapseLocked() {
	if !g.held {
		return
	}
	g.held = false
	g.cancel(errLeaseLapsed)
	if g.stop != nil {
		g.stop()
		g.stop = nil
	}
}

// check reports whether the instance owns its work at this moment, and
// returns the holding's context (cancelled the moment it lapses) and
// the monotonic time it is valid until.
func (g *leaseGate) check() (context.Context, time.Time, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.held {
		return g.ctx, time.Time{}, errLeaseLapsed
	}
	if !g.clk.Now().Before(g.until) {
		g.lapseLocked()
		return g.ctx, time.Time{}, errLeaseLapsed
	}
	return g.ctx, g.until, nil
}

// valid reports whether the instance owns its work now.
func (g *leaseGate) valid() bool {
	_, _, err := g.check()
	return err == nil
}

// wallDeadline turns a monotonic instant into a wall-clock one (for a
// storage that compares it with its own clock), without the monotonic
// reading.
func wallDeadline(clk clock, until time.Time) time.Time {
	now := clk.Now()
	return time.Now().Round(0).Add(until.Sub(now))
}
