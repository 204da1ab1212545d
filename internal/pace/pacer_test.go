package pace

import (
	"context"
	"errors"
	"math"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func mustNew(t testing.TB, c Config) *Pacer {
	t.Helper()
	p, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// reserveN reserves until one fails and returns how many succeeded and
// the wait of the failure.
func reserveN(p *Pacer, now time.Time) (int, time.Duration) {
	for n := 0; ; n++ {
		if ok, wait := p.Reserve(now); !ok {
			return n, wait
		} else if n > 1e6 {
			return n, 0
		}
	}
}

func TestNewRefusesInvalid(t *testing.T) {
	for _, c := range []Config{
		{Limit: -1, Window: time.Second},
		{Limit: 5},
		{Limit: 5, Window: time.Second, Decrease: 1},
		{Limit: 5, Window: time.Second, Decrease: -0.5},
		{Limit: 5, Window: time.Second, Burst: -1},
		{Hold: -time.Second},
	} {
		if _, err := New(c); !errors.Is(err, ErrInvalid) {
			t.Errorf("New(%+v) = %v, want ErrInvalid", c, err)
		}
	}
}

// 30/1m spaces messages two seconds apart: the default burst is 1.
func TestThirtyPerMinuteIsSpaced(t *testing.T) {
	p := mustNew(t, Config{Limit: 30, Window: time.Minute})
	n, wait := reserveN(p, t0)
	if n != 1 || wait != 2*time.Second {
		t.Fatalf("at t0: %d reserved, wait %v; want 1 and 2s", n, wait)
	}
	if ok, _ := p.Reserve(t0.Add(1999 * time.Millisecond)); ok {
		t.Fatal("a second message before 2s")
	}
	if ok, _ := p.Reserve(t0.Add(2 * time.Second)); !ok {
		t.Fatal("no message at 2s")
	}
	if got := p.Next(t0.Add(2 * time.Second)); !got.Equal(t0.Add(4 * time.Second)) {
		t.Fatalf("Next = %v, want t0+4s", got.Sub(t0))
	}
	// in a minute of continuous demand: 30, plus the one at t0
	sent := 1
	for ms := 2001; ms <= 60000; ms++ {
		if ok, _ := p.Reserve(t0.Add(time.Duration(ms) * time.Millisecond)); ok {
			sent++
		}
	}
	if sent != 30 {
		t.Fatalf("%d in the first minute, want 30", sent)
	}
}

// 20/1s: burst 2 (a tenth of a second's worth), then one every 50ms;
// an explicit burst is honoured.
func TestBurst(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second})
	if n, wait := reserveN(p, t0); n != 2 || wait != 50*time.Millisecond {
		t.Fatalf("%d at once, wait %v; want 2 and 50ms", n, wait)
	}
	if s := p.Snapshot(t0); s.Burst != 2 || s.Configured != 20 || s.Current != 20 || s.Tokens != 0 {
		t.Fatalf("snapshot %+v", s)
	}
	if s := p.Snapshot(t0.Add(time.Second)); s.Tokens != 2 {
		t.Fatalf("tokens after a second idle: %v, want 2", s.Tokens)
	}
	q := mustNew(t, Config{Limit: 30, Window: time.Minute, Burst: 30})
	if n, _ := reserveN(q, t0); n != 30 {
		t.Fatalf("burst 30: %d at once", n)
	}
}

// Over any window the pacer lets out at most rate×window + burst.
func TestNeverAboveRatePlusBurst(t *testing.T) {
	p := mustNew(t, Config{Limit: 50, Window: time.Second})
	var times []time.Time
	for us := 0; us < 5_000_000; us += 700 {
		now := t0.Add(time.Duration(us) * time.Microsecond)
		if ok, _ := p.Reserve(now); ok {
			times = append(times, now)
		}
	}
	if max := maxInWindow(times, time.Second); max > 55 {
		t.Fatalf("%d in one second, want at most 50+5", max)
	}
	if len(times) < 249 || len(times) > 255 {
		t.Fatalf("%d in 5s, want about 250", len(times))
	}
}

func maxInWindow(ts []time.Time, w time.Duration) int {
	best, j := 0, 0
	for i := range ts {
		for ts[i].Sub(ts[j]) >= w {
			j++
		}
		best = max(best, i-j+1)
	}
	return best
}

func TestThrottledHalvesOncePerHoldAndRecovers(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second})
	p.Throttled(t0, time.Time{})
	if s := p.Snapshot(t0); s.Current != 10 || s.Decreases != 1 || s.Throttles != 1 {
		t.Fatalf("after one throttle: %+v", s)
	}
	// the next message waits one interval of the lowered rate
	if ok, wait := p.Reserve(t0); ok || wait != 100*time.Millisecond {
		t.Fatalf("Reserve right after a throttle = %v, %v; want false, 100ms", ok, wait)
	}
	// a burst of replies within Hold: one decrease
	for i := 1; i < 10; i++ {
		p.Throttled(t0.Add(time.Duration(i)*10*time.Millisecond), time.Time{})
	}
	if s := p.Snapshot(t0); s.Current != 10 || s.Throttles != 10 || s.Decreases != 1 {
		t.Fatalf("a burst of throttles within Hold: %+v", s)
	}
	// a reply to a message reserved before the decrease: no decrease
	p.Throttled(t0.Add(time.Second), t0.Add(-time.Millisecond))
	if s := p.Snapshot(t0); s.Current != 10 {
		t.Fatalf("a reply to a message sent before the decrease lowered the rate: %v", s.Current)
	}
	// a reply to a message sent after it: decrease
	p.Throttled(t0.Add(time.Second), t0.Add(500*time.Millisecond))
	if s := p.Snapshot(t0); s.Current != 5 {
		t.Fatalf("current %v, want 5", s.Current)
	}
	// success grows it by a tenth of the cap (2/s) per second of sending
	now := t0.Add(time.Second)
	for i := 0; i < 50; i++ {
		now = now.Add(100 * time.Millisecond)
		p.Succeeded(now)
	}
	if s := p.Snapshot(now); math.Abs(s.Current-15) > 0.01 {
		t.Fatalf("after 5s of success: %v, want 15", s.Current)
	}
	for i := 0; i < 50; i++ {
		now = now.Add(100 * time.Millisecond)
		p.Succeeded(now)
	}
	if s := p.Snapshot(now); s.Current != 20 {
		t.Fatalf("after 10s of success: %v, want the cap 20", s.Current)
	}
	// idling earns nothing: one success after a long pause adds at most 1s worth
	p.Throttled(now.Add(time.Second), time.Time{})
	p.Succeeded(now.Add(time.Hour))
	if s := p.Snapshot(now); s.Current != 12 {
		t.Fatalf("after an idle hour: %v, want 12", s.Current)
	}
}

func TestFloor(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second, Hold: time.Millisecond})
	for i := 0; i < 30; i++ {
		p.Throttled(t0.Add(time.Duration(i)*time.Second), time.Time{})
	}
	if s := p.Snapshot(t0); s.Current != 0.1 {
		t.Fatalf("floor %v, want 0.1", s.Current)
	}
	slow := mustNew(t, Config{Limit: 1, Window: time.Minute, Hold: time.Millisecond})
	for i := 0; i < 30; i++ {
		slow.Throttled(t0.Add(time.Duration(i)*time.Second), time.Time{})
	}
	if s := slow.Snapshot(t0); math.Abs(s.Current-1.0/60) > 1e-9 {
		t.Fatalf("floor of 1/1m: %v, want the cap", s.Current)
	}
}

// No cap: unlimited until throttled, then half the measured rate, and
// unlimited again after Recover.
func TestUncapped(t *testing.T) {
	p := mustNew(t, Config{})
	if n, _ := reserveN(p, t0); n < 1e6 {
		t.Fatalf("unlimited pacer refused after %d", n)
	}
	q := mustNew(t, Config{})
	// 200 messages over the last second
	for i := 0; i < 200; i++ {
		if ok, _ := q.Reserve(t0.Add(time.Duration(i) * 5 * time.Millisecond)); !ok {
			t.Fatal("refused")
		}
	}
	now := t0.Add(time.Second)
	q.Throttled(now, time.Time{})
	s := q.Snapshot(now)
	if s.Current < 90 || s.Current > 110 || s.Configured != 0 {
		t.Fatalf("after a throttle at ~200/s: %+v, want ~100", s)
	}
	if s.Burst != 10 {
		t.Fatalf("burst %d, want a tenth of the learnt rate", s.Burst)
	}
	if s := q.Snapshot(now.Add(59 * time.Second)); s.Current == 0 {
		t.Fatal("unlimited again before Recover")
	}
	if s := q.Snapshot(now.Add(time.Minute)); s.Current != 0 || s.Tokens != -1 {
		t.Fatalf("not unlimited after Recover: %+v", s)
	}
}

func TestExhaustedPauses(t *testing.T) {
	p := mustNew(t, Config{Limit: 14, Window: time.Second, QuotaPause: 10 * time.Minute})
	p.Exhausted(t0)
	if ok, wait := p.Reserve(t0.Add(time.Minute)); ok || wait != 9*time.Minute {
		t.Fatalf("during the pause: %v %v", ok, wait)
	}
	if s := p.Snapshot(t0); !s.PausedUntil.Equal(t0.Add(10*time.Minute)) || s.Tokens != 0 {
		t.Fatalf("snapshot %+v", s)
	}
	p.PauseUntil(t0.Add(time.Minute)) // earlier: no change
	if ok, _ := p.Reserve(t0.Add(10 * time.Minute)); !ok {
		t.Fatal("refused after the pause")
	}
}

func TestShareScalesTheCap(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second})
	p.SetShare(0)
	if ok, wait := p.Reserve(t0); ok || wait != blockedPoll {
		t.Fatalf("share 0: %v %v", ok, wait)
	}
	if s := p.Snapshot(t0); s.Tokens != 0 || s.Cap != 0 {
		t.Fatalf("share 0 snapshot: %+v", s)
	}
	p.SetShare(0.5)
	if s := p.Snapshot(t0); s.Cap != 10 || s.Current != 10 {
		t.Fatalf("share 0.5: %+v", s)
	}
	p.Throttled(t0, time.Time{})
	p.SetShare(1) // a throttled rate is not lifted by a larger share
	if s := p.Snapshot(t0); s.Cap != 20 || s.Current != 5 {
		t.Fatalf("share 1 after a throttle: %+v", s)
	}
	p.SetShare(0.1) // a smaller share lowers at once
	if s := p.Snapshot(t0); s.Current != 2 {
		t.Fatalf("share 0.1: %+v", s)
	}
}

func TestPeerThrottled(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second})
	p.PeerThrottled(t0, t0.Add(-time.Second))
	p.PeerThrottled(t0.Add(time.Second), t0.Add(-500*time.Millisecond)) // before our decrease: same event
	s := p.Snapshot(t0)
	if s.Current != 10 || s.Decreases != 1 || !s.ThrottledAt.IsZero() {
		t.Fatalf("%+v", s)
	}
}

func TestWait(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second, Burst: 1})
	ctx := context.Background()
	start := time.Now()
	for i := 0; i < 5; i++ {
		if err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if el := time.Since(start); el < 190*time.Millisecond || el > 10*time.Second {
		t.Fatalf("5 at 20/s took %v, want ~200ms", el)
	}
	p.Exhausted(time.Now())
	cctx, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	if err := p.Wait(cctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait during a pause = %v", err)
	}
}

// Many goroutines reserving at once never get more than the bucket.
func TestConcurrentReserve(t *testing.T) {
	p := mustNew(t, Config{Limit: 100, Window: time.Second})
	var mu sync.Mutex
	var times []time.Time
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p.Wait(ctx) == nil {
				now := time.Now()
				mu.Lock()
				times = append(times, now)
				mu.Unlock()
				p.Succeeded(now)
			}
		}()
	}
	wg.Wait()
	if s := p.Snapshot(time.Now()); int(s.Sent) != len(times) {
		t.Fatalf("sent %d, recorded %d", s.Sent, len(times))
	}
	// 600ms at 100/s with burst 10: at most 70 (the burst at least,
	// however loaded the machine)
	if len(times) > 71 || len(times) < 10 {
		t.Fatalf("%d reserved in 600ms at 100/s", len(times))
	}
}

// A share set until a time lapses to the share after it at that time,
// with no call but the pacer's own: a stalled round cannot keep it.
func TestShareLapses(t *testing.T) {
	p := mustNew(t, Config{Limit: 20, Window: time.Second})
	now := time.Unix(1_900_000_000, 0)
	p.SetShareUntil(0.5, now.Add(time.Second), 0.05)
	if s := p.Snapshot(now); s.Share != 0.5 || s.Current != 10 {
		t.Fatalf("before the lapse: %+v", s)
	}
	if s := p.Snapshot(now.Add(999 * time.Millisecond)); s.Share != 0.5 {
		t.Fatalf("a millisecond before the lapse: share %v", s.Share)
	}
	if ok, _ := p.Reserve(now.Add(time.Second)); !ok {
		t.Fatal("the lapsed share reserves nothing")
	}
	if s := p.Snapshot(now.Add(time.Second)); s.Share != 0.05 || s.Current != 1 {
		t.Fatalf("after the lapse: %+v", s)
	}
	// the lapsed share paces at 1/s: the next slot is a second later
	if ok, wait := p.Reserve(now.Add(1500 * time.Millisecond)); ok || wait != 500*time.Millisecond {
		t.Fatalf("at the lapsed share: ok %v, wait %v", ok, wait)
	}
	// a share set for good clears the lapse
	p.SetShare(1)
	if s := p.Snapshot(now.Add(time.Hour)); s.Share != 1 {
		t.Fatalf("SetShare after a lapse: share %v", s.Share)
	}
}

func BenchmarkReserve(b *testing.B) {
	p := mustNew(b, Config{})
	now := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			p.Reserve(now)
			p.Succeeded(now)
		}
	})
}
