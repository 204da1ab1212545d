package pace

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// limitedServer is the provider: a token bucket (rate, burst) that
// refuses what is above it, and a record of every attempt.
type limitedServer struct {
	mu       sync.Mutex
	rate     float64
	burst    float64
	tokens   float64
	last     time.Time
	attempts []time.Time
	accepted []time.Time
}

func (s *limitedServer) try(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last.IsZero() {
		s.tokens = s.burst
	} else {
		s.tokens = min(s.burst, s.tokens+now.Sub(s.last).Seconds()*s.rate)
	}
	s.last = now
	s.attempts = append(s.attempts, now)
	if s.tokens >= 1 {
		s.tokens--
		s.accepted = append(s.accepted, now)
		return true
	}
	return false
}

// maxPerFixedSecond is the most timestamps in one wall-clock second.
func maxPerFixedSecond(ts []time.Time) int {
	counts := map[int64]int{}
	best := 0
	for _, t := range ts {
		k := t.Unix()
		counts[k]++
		best = max(best, counts[k])
	}
	return best
}

// TestClusterOvershoot runs 2 and 3 instances (each its own pacer and
// share on its own storage handle, as separate processes) with `rate
// 20/1s` and continuous demand against one server limited to 20/s, and
// measures what the server sees: the most attempts and acceptances in
// any one second (fixed and sliding).
func TestClusterOvershoot(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for seconds")
	}
	storages(t, func(t *testing.T, open func() certmagic.Storage) {
		for _, n := range []int{2, 3} {
			t.Run(fmt.Sprintf("%d_instances", n), func(t *testing.T) {
				runCluster(t, open, n)
			})
		}
	})
}

func runCluster(t *testing.T, open func() certmagic.Storage, n int) {
	const (
		limit  = 20
		period = 200 * time.Millisecond
		run    = 5 * time.Second
		warm   = time.Second
	)
	// the provider allows a quarter second's burst: instances cannot
	// align their phases, so a stricter bucket refuses coincidences of
	// evenly spaced streams that are within the rate
	srv := &limitedServer{rate: limit, burst: limit / 4}
	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	var wg sync.WaitGroup
	var members []*member
	for i := 0; i < n; i++ {
		m := newMember(t, open(), fmt.Sprintf("i%d", i), limit, ShareOptions{Period: period})
		m.demand.Store(1000)
		members = append(members, m)
		wg.Add(1)
		go func() { defer wg.Done(); m.s.Run(ctx) }()
		// four workers per instance, as the engine's connections
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for m.p.Wait(ctx) == nil {
					sent := time.Now()
					if srv.try(sent) {
						m.p.Succeeded(time.Now())
					} else {
						m.p.Throttled(time.Now(), sent)
					}
				}
			}()
		}
	}
	time.Sleep(run - 100*time.Millisecond)
	var shares []string
	for _, m := range members {
		s := m.p.Snapshot(time.Now())
		shares = append(shares, fmt.Sprintf("%.2f(cur %.1f, %d decr)", s.Share, s.Current, s.Decreases))
	}
	wg.Wait()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	start := srv.attempts[0]
	var steady []time.Time
	for _, a := range srv.attempts {
		if a.Sub(start) >= warm {
			steady = append(steady, a)
		}
	}
	fixed, sliding := maxPerFixedSecond(srv.attempts), maxInWindow(srv.attempts, time.Second)
	steadySliding := maxInWindow(steady, time.Second)
	throttled := len(srv.attempts) - len(srv.accepted)
	t.Logf("%d instances, rate %d/1s, %v: %d attempts (%.1f/s), %d accepted, %d throttled; max per fixed second %d (%+.0f%%), per sliding second %d (%+.0f%%), after %v warm-up %d (%+.0f%%); shares %v",
		n, limit, run, len(srv.attempts), float64(len(srv.attempts))/run.Seconds(), len(srv.accepted), throttled,
		fixed, pct(fixed, limit), sliding, pct(sliding, limit), warm, steadySliding, pct(steadySliding, limit), shares)
	// the cap plus each instance's burst and a round's lag
	if sliding > limit*5/4 {
		t.Fatalf("the server saw %d in one second at rate %d", sliding, limit)
	}
	if len(srv.accepted) < limit*int(run/time.Second)*7/10 {
		t.Fatalf("only %d accepted in %v at %d/s: the share starves the cluster", len(srv.accepted), run, limit)
	}
}

func pct(got, want int) float64 { return 100 * float64(got-want) / float64(want) }
