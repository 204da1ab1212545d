package pace

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/redistest"
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
// measures what the server sees: the most attempts in any one second
// (fixed and sliding). Time is simulated in steps of a millisecond (the
// storage is real, file and Redis): the bound is the design's, not the
// machine's, and a loaded machine cannot make the test fail or pass. A
// stalled instance (its share rounds stop for two seconds while it
// keeps sending, as a slow storage or a paused process does) stays in
// the same bound, because its share lapses when the others stop
// counting it.
func TestClusterOvershoot(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		for _, n := range []int{2, 3} {
			t.Run(fmt.Sprintf("%d_instances", n), func(t *testing.T) {
				runCluster(t, open, n, false)
			})
			t.Run(fmt.Sprintf("%d_instances_one_stalled", n), func(t *testing.T) {
				runCluster(t, open, n, true)
			})
		}
	})
}

func runCluster(t *testing.T, open func() certmagic.Storage, n int, stall bool) {
	const (
		limit   = 20
		period  = 200 * time.Millisecond
		run     = 6 * time.Second
		warm    = time.Second
		step    = time.Millisecond
		rtt     = 30 * time.Millisecond // from the send to the reply
		workers = 4                     // per instance, as the engine's connections
	)
	stallFrom, stallTo := 2*time.Second, 4*time.Second
	// the provider allows a quarter second's burst: instances cannot
	// align their phases, so a stricter bucket refuses coincidences of
	// evenly spaced streams that are within the rate
	srv := &limitedServer{rate: limit, burst: limit / 4}
	type worker struct {
		replyAt, sent time.Time
		busy, ok      bool
	}
	type inst struct {
		*member
		workers  []worker
		nextSync time.Duration
	}
	start := time.Unix(1_900_000_000, 0)
	var members []*inst
	for i := 0; i < n; i++ {
		m := newMember(t, open(), fmt.Sprintf("i%d", i), limit, ShareOptions{Period: period})
		m.demand.Store(1000)
		// the instances' rounds are out of phase, as processes started
		// apart are
		members = append(members, &inst{member: m, workers: make([]worker, workers), nextSync: period * time.Duration(i) / time.Duration(n)})
	}
	for el := time.Duration(0); el < run; el += step {
		now := start.Add(el)
		for i, m := range members {
			stalled := stall && i == 0 && el >= stallFrom && el < stallTo
			if el >= m.nextSync && !stalled {
				m.sync(t, now)
				m.nextSync += period
				for m.nextSync <= el {
					m.nextSync += period
				}
			}
			for w := range m.workers {
				wk := &m.workers[w]
				if wk.busy && !now.Before(wk.replyAt) {
					if wk.ok {
						m.p.Succeeded(now)
					} else {
						m.p.Throttled(now, wk.sent)
					}
					wk.busy = false
				}
				if !wk.busy {
					if ok, _ := m.p.Reserve(now); ok {
						*wk = worker{busy: true, sent: now, replyAt: now.Add(rtt), ok: srv.try(now)}
					}
				}
			}
		}
	}
	var shares []string
	for _, m := range members {
		s := m.p.Snapshot(start.Add(run))
		shares = append(shares, fmt.Sprintf("%.2f(cur %.1f, %d decr)", s.Share, s.Current, s.Decreases))
	}
	var steady []time.Time
	for _, a := range srv.attempts {
		if a.Sub(start) >= warm {
			steady = append(steady, a)
		}
	}
	fixed, sliding := maxPerFixedSecond(srv.attempts), maxInWindow(srv.attempts, time.Second)
	steadySliding := maxInWindow(steady, time.Second)
	throttled := len(srv.attempts) - len(srv.accepted)
	t.Logf("%d instances, rate %d/1s, %v: %d attempts (%.1f/s), %d accepted, %d throttled; max per fixed second %d (%+.0f%%), per sliding second %d (%+.0f%%), after %v warm-up %d (%+.0f%%); shares at the end %v",
		n, limit, run, len(srv.attempts), float64(len(srv.attempts))/run.Seconds(), len(srv.accepted), throttled,
		fixed, pct(fixed, limit), sliding, pct(sliding, limit), warm, steadySliding, pct(steadySliding, limit), shares)
	// the cap plus each instance's burst and a round's lag
	if sliding > limit*23/20 {
		t.Fatalf("the server saw %d in one second at rate %d", sliding, limit)
	}
	if throttled != 0 {
		t.Fatalf("%d attempts throttled by a server that allows the rate", throttled)
	}
	if len(srv.accepted) < limit*int(run/time.Second)*7/10 {
		t.Fatalf("only %d accepted in %v at %d/s: the share starves the cluster", len(srv.accepted), run, limit)
	}
}

func pct(got, want int) float64 { return 100 * float64(got-want) / float64(want) }
