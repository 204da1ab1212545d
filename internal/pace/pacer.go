package pace

import (
	"context"
	"errors"
	"math"
	"sync"
	"time"
)

// Config configures a Pacer.
type Config struct {
	// Limit and Window are the configured cap: at most Limit messages per
	// Window (`rate 14/1s`, `rate 30/1m`). Limit 0 means no configured
	// cap: unlimited until the server throttles.
	Limit  int
	Window time.Duration
	// Burst is how many messages may leave back to back when the pacer
	// has been idle. Default: a tenth of a second's worth of the rate,
	// at least 1 (14/1s and 30/1m: 1, spaced evenly; 50/1s: 5; 1000/1s:
	// 100), so that no fixed one-second window sees more than 10% above
	// the rate. In a cluster each instance gets its share of the burst,
	// at least 1.
	Burst int
	// Decrease multiplies the current rate on a throttling reply.
	// Default 0.5.
	Decrease float64
	// Increase is how many messages per second the current rate gains
	// per second of successful sending, back toward the cap. Default: a
	// tenth of the cap (from half the cap back to the cap in about five
	// seconds), with no cap a tenth of the rate the last decrease started
	// from, at least 1 (back where the server throttled in about five
	// seconds, then on up until it throttles again).
	Increase float64
	// MinRate is the floor of the current rate in messages per second.
	// Default 0.1 (one message every ten seconds), or the cap when the
	// cap is lower.
	MinRate float64
	// Hold is the least time between two decreases, so that the replies
	// to messages already in flight when the rate dropped do not drop it
	// again. Default 200ms.
	Hold time.Duration
	// QuotaPause is how long a used-up quota stops the server. Default
	// 15 minutes; Amazon SES advises waiting up to 10 minutes.
	QuotaPause time.Duration
	// Recover is, with no configured cap, how long sending must go
	// without a throttling reply before the pacer is unlimited again.
	// Default 1 minute.
	Recover time.Duration
}

// Snapshot is a pacer's state for /status and metrics. Rates are in
// messages per second; 0 means unlimited.
type Snapshot struct {
	// Configured is Limit/Window, 0 without a cap.
	Configured float64 `json:"configured"`
	// Burst is the configured or default burst.
	Burst int `json:"burst"`
	// Share is this instance's fraction of the configured rate (1 alone).
	Share float64 `json:"share"`
	// Cap is Configured × Share.
	Cap float64 `json:"cap"`
	// Current is the rate in force: Cap, or lower after throttling.
	Current float64 `json:"current"`
	// Tokens is how many messages could leave now without waiting, -1
	// when unlimited.
	Tokens float64 `json:"tokens"`
	// Sent counts reservations granted.
	Sent uint64 `json:"sent"`
	// Throttles counts throttling replies seen (own and, through the
	// share, the cluster's); Decreases counts how many lowered the rate.
	Throttles uint64 `json:"throttles"`
	Decreases uint64 `json:"decreases"`
	// LastDecrease is when the rate was last lowered; ThrottledAt when
	// a throttling reply to this instance (not a peer's, through the
	// share) last lowered it.
	LastDecrease time.Time `json:"last_decrease,omitzero"`
	ThrottledAt  time.Time `json:"throttled_at,omitzero"`
	// PausedUntil is set while a used-up quota stops sending.
	PausedUntil time.Time `json:"paused_until,omitzero"`
}

// Pacer paces the messages to one SMTP server. Its zero value is not
// usable; make one with New. All methods are safe for concurrent use and
// take one short mutex hold; none blocks except Wait.
type Pacer struct {
	cfg        Config
	configured float64 // messages/s, 0: none
	burst      float64

	mu    sync.Mutex
	share float64
	// shareUntil is when share lapses to shareAfter (zero: never)
	shareUntil time.Time
	shareAfter float64
	// cur is the rate in force, 0: unlimited (only without a cap, before
	// the first throttle or after Recover clean)
	cur float64
	// tat is the theoretical arrival time of the next message (GCRA): a
	// reservation at now succeeds when tat-(burst-1)/cur <= now
	tat          time.Time
	lastDecrease time.Time
	ownDecrease  time.Time
	lastIncrease time.Time
	lastThrottle time.Time
	pausedUntil  time.Time
	urgent       int // callers of WaitPriority(urgent) waiting now
	sent         uint64
	throttles    uint64
	decreases    uint64
	// the send rate measured over the last two one-second slots, for the
	// first decrease of an uncapped pacer
	slot      int64
	slotCount float64
	prevCount float64
	// busySince is when sending resumed after a second or more without
	// a message: a burst younger than a second is measured over its own
	// length, not over a whole second it did not use
	busySince time.Time
	// peak is, without a cap, the rate the last decrease started from:
	// the additive increase is a tenth of it per second
	peak float64
}

// ErrInvalid is returned by New for a configuration that cannot pace.
var ErrInvalid = errors.New("pace: invalid configuration")

// New makes a pacer. It returns ErrInvalid for a negative limit, a
// limit without a positive window, or a decrease outside (0, 1).
func New(cfg Config) (*Pacer, error) {
	if cfg.Limit < 0 || (cfg.Limit > 0 && cfg.Window <= 0) || cfg.Burst < 0 ||
		cfg.Decrease < 0 || cfg.Decrease >= 1 || cfg.Increase < 0 || cfg.MinRate < 0 ||
		cfg.Hold < 0 || cfg.QuotaPause < 0 || cfg.Recover < 0 {
		return nil, ErrInvalid
	}
	p := &Pacer{cfg: cfg, share: 1}
	if cfg.Limit > 0 {
		p.configured = float64(cfg.Limit) / cfg.Window.Seconds()
	}
	if p.cfg.Decrease == 0 {
		p.cfg.Decrease = 0.5
	}
	if p.cfg.Hold == 0 {
		p.cfg.Hold = 200 * time.Millisecond
	}
	if p.cfg.QuotaPause == 0 {
		p.cfg.QuotaPause = 15 * time.Minute
	}
	if p.cfg.Recover == 0 {
		p.cfg.Recover = time.Minute
	}
	if p.cfg.MinRate == 0 {
		p.cfg.MinRate = 0.1
	}
	p.burst = float64(cfg.Burst)
	if cfg.Burst == 0 {
		p.burst = math.Max(1, math.Floor(p.configured/10))
	}
	p.cur = p.configured
	return p, nil
}

// capLocked is the share of the configured rate, 0 without a cap.
func (p *Pacer) capLocked() float64 { return p.configured * p.share }

func (p *Pacer) minRateLocked() float64 {
	if c := p.capLocked(); c > 0 && c < p.cfg.MinRate {
		return c
	}
	return p.cfg.MinRate
}

// interval is the spacing at the current rate, 0 when unlimited.
func (p *Pacer) intervalLocked() time.Duration {
	if p.cur <= 0 {
		return 0
	}
	return time.Duration(float64(time.Second) / p.cur)
}

func (p *Pacer) burstLocked() float64 {
	if p.cfg.Burst == 0 && p.configured == 0 && p.cur > 0 {
		// no cap: the default burst follows the rate learnt
		return math.Max(1, math.Floor(p.cur/10))
	}
	// the provider's burst is the cluster's: each instance its share
	return math.Max(1, math.Floor(p.burst*p.share))
}

// nextLocked is the earliest time a reservation succeeds.
func (p *Pacer) nextLocked(now time.Time) time.Time {
	next := now
	if p.blockedLocked() {
		// no share of the cap (yet): the share's next round gives one
		return now.Add(blockedPoll)
	}
	if p.pausedUntil.After(next) {
		next = p.pausedUntil
	}
	if iv := p.intervalLocked(); iv > 0 {
		tol := time.Duration((p.burstLocked() - 1) * float64(iv))
		if at := p.tat.Add(-tol); at.After(next) {
			next = at
		}
	}
	return next
}

// Reserve takes the right to send one message now. When it returns
// ok, the caller sends, and reports the reply with Succeeded or
// Throttled. Otherwise nothing was taken and wait is how long until a
// reservation can succeed (it may be taken by another caller first).
func (p *Pacer) Reserve(now time.Time) (ok bool, wait time.Duration) {
	return p.reserve(now, false)
}

// reserve is Reserve; with yield it takes nothing while an urgent
// caller waits.
func (p *Pacer) reserve(now time.Time, yield bool) (ok bool, wait time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.recoverLocked(now)
	next := p.nextLocked(now)
	if yield && p.urgent > 0 {
		// an urgent caller takes this slot; look again after it
		return false, max(next.Sub(now), time.Millisecond)
	}
	if next.After(now) {
		return false, next.Sub(now)
	}
	if iv := p.intervalLocked(); iv > 0 {
		if p.tat.Before(now) {
			p.tat = now
		}
		p.tat = p.tat.Add(iv)
	}
	p.sent++
	p.countLocked(now)
	return true, 0
}

// Next returns the earliest time a Reserve can succeed: now, or later.
// A scheduler sleeps until then on one timer for all its messages.
func (p *Pacer) Next(now time.Time) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.recoverLocked(now)
	return p.nextLocked(now)
}

// Wait blocks until it has reserved a send (nil) or ctx is done (its
// error). It uses one timer, stopped before it returns.
func (p *Pacer) Wait(ctx context.Context) error { return p.WaitPriority(ctx, false) }

// MaxYield is how long a caller that is not urgent lets urgent callers
// go first: after that it competes as their equal, so a stream of
// urgent messages never starves the others.
const MaxYield = time.Second

// WaitPriority is Wait for a caller that is urgent (a code a person
// waits for) or not. While an urgent caller waits, the others take no
// reservation for up to MaxYield of their wait, so the urgent one gets
// the next slot instead of a place behind every caller already waiting.
func (p *Pacer) WaitPriority(ctx context.Context, urgent bool) error {
	if urgent {
		p.mu.Lock()
		p.urgent++
		p.mu.Unlock()
		defer func() {
			p.mu.Lock()
			p.urgent--
			p.mu.Unlock()
		}()
	}
	var t *time.Timer
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	start := time.Now()
	for {
		now := time.Now()
		ok, wait := p.reserve(now, !urgent && now.Sub(start) < MaxYield)
		if ok {
			return nil
		}
		if t == nil {
			t = time.NewTimer(wait)
		} else {
			t.Reset(wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// countLocked measures the send rate in one-second slots.
func (p *Pacer) countLocked(now time.Time) {
	s := now.Unix()
	switch {
	case s == p.slot:
	case s == p.slot+1:
		p.prevCount, p.slotCount = p.slotCount, 0
	default:
		p.prevCount, p.slotCount = 0, 0
		p.busySince = now
	}
	p.slot = s
	p.slotCount++
}

// measuredLocked is the send rate over the last one to two seconds.
func (p *Pacer) measuredLocked(now time.Time) float64 {
	s := now.Unix()
	cur, prev := p.slotCount, p.prevCount
	switch {
	case s == p.slot:
	case s == p.slot+1:
		cur, prev = 0, cur
	default:
		return 0
	}
	frac := float64(now.UnixNano()%int64(time.Second)) / float64(time.Second)
	// a one-second window ending now: this slot so far and the part of
	// the previous one that is still less than a second old
	n := cur + prev*(1-frac)
	if el := now.Sub(p.busySince); el < time.Second {
		// 10 messages in the first 20 ms are 500 a second, not 10
		return n / max(el, 50*time.Millisecond).Seconds()
	}
	return n
}

// Succeeded reports a message the server accepted (or refused for a
// reason that is not the rate). The current rate grows by Increase per
// second of sending, up to the cap.
func (p *Pacer) Succeeded(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur <= 0 {
		return
	}
	dt := now.Sub(p.lastIncrease)
	p.lastIncrease = now
	if dt <= 0 {
		return
	}
	if dt > time.Second {
		// growth is earned by sending, not by idling
		dt = time.Second
	}
	inc := p.cfg.Increase
	if inc == 0 {
		if c := p.capLocked(); c > 0 {
			inc = c / 10
		} else {
			inc = math.Max(1, p.peak/10)
		}
	}
	p.cur += inc * dt.Seconds()
	if c := p.capLocked(); c > 0 && p.cur > c {
		p.cur = c
	}
}

// Throttled reports a reply that Classify called Rate or Connections
// for a message reserved at sent (zero if unknown). It lowers the
// current rate by Decrease, at most once per Hold, and not for a
// message reserved before the last decrease: its reply says nothing
// about the rate in force now. The next reservation waits one interval
// of the lowered rate, so the throttled message goes again as soon as
// the lowered rate allows and not sooner.
func (p *Pacer) Throttled(now, sent time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.throttles++
	p.lastThrottle = now
	if !sent.IsZero() && sent.Before(p.lastDecrease) {
		return
	}
	if p.decreaseLocked(now) {
		p.ownDecrease = now
	}
}

// PeerThrottled applies a decrease another instance made at at (read
// from the shared storage): once per Hold, like Throttled. A decrease
// made within Hold after this pacer's last one is the same burst of
// throttling replies and changes nothing.
func (p *Pacer) PeerThrottled(now, at time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.lastDecrease.IsZero() && !at.After(p.lastDecrease.Add(p.cfg.Hold)) {
		return
	}
	p.throttles++
	p.lastThrottle = now
	p.decreaseLocked(now)
}

func (p *Pacer) decreaseLocked(now time.Time) bool {
	if !p.lastDecrease.IsZero() && now.Sub(p.lastDecrease) < p.cfg.Hold {
		return false
	}
	if p.cur <= 0 {
		// unlimited until now: start below what was getting through
		p.cur = p.measuredLocked(now)
		if p.cur <= 0 {
			p.cur = 1
		}
	}
	if p.configured == 0 {
		p.peak = p.cur
	}
	p.cur *= p.cfg.Decrease
	if floor := p.minRateLocked(); p.cur < floor {
		p.cur = floor
	}
	p.decreases++
	p.lastDecrease = now
	p.lastIncrease = now
	// the bucket is emptied: the next message leaves one lowered
	// interval from now
	iv := p.intervalLocked()
	if next := now.Add(time.Duration(p.burstLocked() * float64(iv))); p.tat.Before(next) {
		p.tat = next
	}
	return true
}

// Exhausted reports a reply that Classify called Quota: nothing is
// reserved until QuotaPause has passed.
func (p *Pacer) Exhausted(now time.Time) {
	p.PauseUntil(now.Add(p.cfg.QuotaPause))
}

// PauseUntil stops reservations until t (a quota reported by another
// instance, or an operator's pause). An earlier t than the pause in
// force changes nothing.
func (p *Pacer) PauseUntil(t time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t.After(p.pausedUntil) {
		p.pausedUntil = t
	}
}

// recoverLocked makes an uncapped pacer unlimited again after Recover
// without a throttling reply.
func (p *Pacer) recoverLocked(now time.Time) {
	p.lapseLocked(now)
	if p.configured == 0 && p.cur > 0 && now.Sub(p.lastThrottle) >= p.cfg.Recover {
		p.cur = 0
	}
}

// SetShare sets this instance's fraction of the configured rate (0 to
// 1; the cluster share sets it). A lower share lowers the current rate
// at once; a higher one raises the cap, and the current rate follows
// when it was at the old cap (a throttled rate keeps climbing
// additively).
func (p *Pacer) SetShare(f float64) { p.SetShareUntil(f, time.Time{}, f) }

// SetShareUntil sets the share f until the time until, and the share
// after from then on (a zero until: f for good). A cluster share lapses
// this way: the others stop counting an instance whose record has not
// been renewed for a while, so the instance must not keep sending at
// the share they no longer leave it, even when nothing renews it (its
// rounds stalled behind a slow storage or a paused process).
func (p *Pacer) SetShareUntil(f float64, until time.Time, after float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.setShareLocked(f)
	p.shareUntil, p.shareAfter = until, clampShare(after)
}

func clampShare(f float64) float64 {
	if f < 0 || math.IsNaN(f) {
		return 0
	}
	return math.Min(f, 1)
}

func (p *Pacer) setShareLocked(f float64) {
	old := p.capLocked()
	p.share = clampShare(f)
	if p.configured == 0 {
		return
	}
	c := p.capLocked()
	if p.cur > c || p.cur >= old {
		p.cur = c
	}
}

// lapseLocked applies the share's lapse once its time has come.
func (p *Pacer) lapseLocked(now time.Time) {
	if !p.shareUntil.IsZero() && !now.Before(p.shareUntil) {
		p.shareUntil = time.Time{}
		p.setShareLocked(p.shareAfter)
	}
}

// blockedPoll is how long Reserve tells a pacer without a share to
// wait before asking again.
const blockedPoll = 100 * time.Millisecond

// blockedLocked: a capped pacer whose share is 0 reserves nothing.
func (p *Pacer) blockedLocked() bool { return p.configured > 0 && p.share == 0 }

// Snapshot returns the pacer's state.
func (p *Pacer) Snapshot(now time.Time) Snapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.recoverLocked(now)
	s := Snapshot{
		Configured: p.configured, Burst: int(p.burstLocked()), Share: p.share, Cap: p.capLocked(),
		Current: p.cur, Sent: p.sent, Throttles: p.throttles, Decreases: p.decreases,
		LastDecrease: p.lastDecrease, ThrottledAt: p.ownDecrease,
	}
	if p.pausedUntil.After(now) {
		s.PausedUntil = p.pausedUntil
	}
	if iv := p.intervalLocked(); iv > 0 {
		b := p.burstLocked()
		tat := p.tat
		if tat.Before(now) {
			tat = now
		}
		s.Tokens = math.Max(0, b-float64(tat.Sub(now))/float64(iv))
	} else if !p.blockedLocked() {
		s.Tokens = -1
	}
	if !s.PausedUntil.IsZero() {
		s.Tokens = 0
	}
	return s
}
