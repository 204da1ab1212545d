package pace

import (
	"context"
	"errors"
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/redistest"
)

// member is one instance: its pacer, share and demand.
type member struct {
	p      *Pacer
	s      *Share
	demand atomic.Int64
}

func newMember(t *testing.T, st certmagic.Storage, id string, limit int, opts ShareOptions) *member {
	t.Helper()
	m := &member{p: mustNew(t, Config{Limit: limit, Window: time.Second})}
	s, err := NewShare(st, "smtp.example.com-587", id, m.p, func() int { return int(m.demand.Load()) }, opts)
	if err != nil {
		t.Fatal(err)
	}
	m.s = s
	return m
}

func (m *member) sync(t *testing.T, now time.Time) {
	t.Helper()
	if err := m.s.Sync(context.Background(), now); err != nil {
		t.Fatalf("%s: %v", m.s.id, err)
	}
}

func (m *member) share(now time.Time) float64 { return m.p.Snapshot(now).Share }

func near(a, b float64) bool { return math.Abs(a-b) < 1e-6 }

func TestNewShareRefuses(t *testing.T) {
	st := &certmagic.FileStorage{Path: t.TempDir()}
	p := mustNew(t, Config{Limit: 1, Window: time.Second})
	d := func() int { return 0 }
	for _, c := range []struct{ server, inst string }{{"", "a"}, {"s", ""}, {"a/b", "i"}, {"s", ".."}, {"s", `a\b`}} {
		if _, err := NewShare(st, c.server, c.inst, p, d, ShareOptions{}); err == nil {
			t.Errorf("NewShare(%q, %q) accepted", c.server, c.inst)
		}
	}
	if _, err := NewShare(nil, "s", "i", p, d, ShareOptions{}); err == nil {
		t.Error("NewShare without a storage accepted")
	}
}

func TestShareContract(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		now := time.Now()
		step := func() { now = now.Add(100 * time.Millisecond) }
		opts := ShareOptions{Period: 100 * time.Millisecond}
		a := newMember(t, open(), "a", 20, opts)
		if s := a.share(now); s != 0 {
			t.Fatalf("before its first round an instance holds %v", s)
		}
		a.demand.Store(1000)
		a.sync(t, now)
		if s := a.share(now); s != 1 {
			t.Fatalf("alone: share %v, want 1", s)
		}

		// a newcomer holds nothing until the running one gave up half
		b := newMember(t, open(), "b", 20, opts)
		b.demand.Store(1000)
		step()
		b.sync(t, now)
		if s := b.share(now); s != 0 {
			t.Fatalf("newcomer's first round: %v, want 0 (a holds everything)", s)
		}
		a.sync(t, now)
		if s := a.share(now); !near(s, 0.5) {
			t.Fatalf("a after seeing b: %v, want 0.5", s)
		}
		step()
		b.sync(t, now)
		if s := b.share(now); !near(s, 0.5) {
			t.Fatalf("b's second round: %v, want 0.5", s)
		}
		if sa, sb := a.share(now), b.share(now); sa+sb > 1+1e-9 {
			t.Fatalf("shares %v + %v above 1", sa, sb)
		}

		// b goes idle: it drops to the floor at once, a takes the rest a
		// round after b published it
		b.demand.Store(0)
		step()
		a.sync(t, now)
		b.sync(t, now) // b's own sends in the last period still count as demand
		step()
		a.sync(t, now)
		b.sync(t, now)
		if s := b.share(now); !near(s, 0.05) {
			t.Fatalf("idle b: %v, want 0.05", s)
		}
		a.sync(t, now)
		step()
		a.sync(t, now)
		if s := a.share(now); !near(s, 0.95) {
			t.Fatalf("busy a beside an idle b: %v, want 0.95", s)
		}

		// a throttle seen by a slows b on b's next round, once, and b's
		// decrease does not echo back to a
		a.p.Throttled(now, time.Time{})
		step()
		a.sync(t, now)
		b.sync(t, now)
		if s := b.p.Snapshot(now); s.Decreases != 1 || !s.ThrottledAt.IsZero() {
			t.Fatalf("b after a's throttle: %+v", s)
		}
		step()
		a.sync(t, now)
		b.sync(t, now)
		if s := a.p.Snapshot(now); s.Decreases != 1 {
			t.Fatalf("a decreased %d times for one throttle", s.Decreases)
		}
		if s := b.p.Snapshot(now); s.Decreases != 1 {
			t.Fatalf("b decreased %d times for one throttle", s.Decreases)
		}

		// a quota pause travels too
		a.p.Exhausted(now)
		step()
		a.sync(t, now)
		b.sync(t, now)
		if s := b.p.Snapshot(now); s.PausedUntil.IsZero() {
			t.Fatal("b did not take a's quota pause")
		}

		// b stops: after StaleAfter a counts alone; after DeleteAfter the
		// record is gone
		for i := 0; i < 4; i++ {
			step()
			a.sync(t, now)
		}
		step()
		a.sync(t, now)
		if s := a.share(now); s != 1 {
			t.Fatalf("a after b went stale: %v, want 1", s)
		}
		now = now.Add(opts.Period * 60)
		a.sync(t, now)
		keys, err := open().List(context.Background(), KeyPrefix+"/smtp.example.com-587", false)
		if err != nil || len(keys) != 1 {
			t.Fatalf("after DeleteAfter: %q %v, want a's record alone", keys, err)
		}
	})
}

// Three busy instances split equally; storage cost per round is
// 1 List + (N-1) Loads + 1 Store.
func TestShareEqualSplitAndCost(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		now := time.Now()
		var ms []*member
		var counters []*countingStorage
		for _, id := range []string{"a", "b", "c"} {
			cs := &countingStorage{Storage: open()}
			counters = append(counters, cs)
			m := newMember(t, cs, id, 30, ShareOptions{Period: time.Second})
			m.demand.Store(500)
			ms = append(ms, m)
		}
		for r := 0; r < 3; r++ {
			now = now.Add(time.Second)
			for _, m := range ms {
				m.sync(t, now)
			}
		}
		sum := 0.0
		for _, m := range ms {
			s := m.share(now)
			sum += s
			if !near(s, 1.0/3) {
				t.Fatalf("%s: share %v, want 1/3", m.s.id, s)
			}
		}
		if sum > 1+1e-9 {
			t.Fatalf("sum %v", sum)
		}
		for _, c := range counters {
			c.stores.Store(0)
			c.lists.Store(0)
			c.loads.Store(0)
		}
		now = now.Add(time.Second)
		ms[0].sync(t, now)
		if c := counters[0]; c.stores.Load() != 1 || c.lists.Load() != 1 || c.loads.Load() != 2 {
			t.Fatalf("one round: %d Store, %d List, %d Load; want 1, 1, 2", c.stores.Load(), c.lists.Load(), c.loads.Load())
		}
	})
}

// A storage that fails: the share is kept while the peers still count
// the instance, then it drops to the least share; an instance that never
// reached the storage gets the least share after StaleAfter.
func TestShareStorageDown(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	opts := ShareOptions{Period: time.Second}
	fa := &failingStorage{Storage: &certmagic.FileStorage{Path: dir}}
	a := newMember(t, fa, "a", 20, opts)
	b := newMember(t, &certmagic.FileStorage{Path: dir}, "b", 20, opts)
	a.demand.Store(100)
	b.demand.Store(100)
	for r := 0; r < 3; r++ {
		now = now.Add(time.Second)
		a.sync(t, now)
		b.sync(t, now)
	}
	if s := a.share(now); !near(s, 0.5) {
		t.Fatalf("a: %v", s)
	}
	fa.down.Store(true)
	now = now.Add(time.Second)
	if err := a.s.Sync(context.Background(), now); err == nil || a.s.Err() == nil {
		t.Fatal("a round on a storage that is down succeeded")
	}
	if s := a.share(now); !near(s, 0.5) {
		t.Fatalf("right after the failure: %v, want the last share 0.5", s)
	}
	now = now.Add(3 * time.Second)
	_ = a.s.Sync(context.Background(), now)
	if s := a.share(now); !near(s, 0.05) {
		t.Fatalf("after StaleAfter down: %v, want the least share 0.05", s)
	}
	fa.down.Store(false)
	now = now.Add(time.Second)
	b.sync(t, now)
	a.sync(t, now)
	if a.s.Err() != nil {
		t.Fatal(a.s.Err())
	}

	// never reached the storage
	fc := &failingStorage{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	fc.down.Store(true)
	c := newMember(t, fc, "c", 20, opts)
	start := time.Now()
	_ = c.s.Sync(context.Background(), start)
	if s := c.share(start); s != 0 {
		t.Fatalf("c at first: %v", s)
	}
	_ = c.s.Sync(context.Background(), start.Add(3*time.Second))
	if s := c.share(start); !near(s, 0.05) {
		t.Fatalf("c never reached the storage: %v, want 0.05", s)
	}
}

// Run deletes the record when its context ends.
func TestShareRunDeletesItsRecord(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		st := open()
		m := newMember(t, st, "a", 10, ShareOptions{Period: 20 * time.Millisecond})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { m.s.Run(ctx); close(done) }()
		deadline := time.Now().Add(5 * time.Second)
		for !st.Exists(context.Background(), KeyPrefix+"/smtp.example.com-587/a") {
			if time.Now().After(deadline) {
				t.Fatal("no record")
			}
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		<-done
		if st.Exists(context.Background(), KeyPrefix+"/smtp.example.com-587/a") {
			t.Fatal("record left after Run ended")
		}
	})
}

func TestFairShares(t *testing.T) {
	cases := []struct {
		demands []float64
		want    []float64
	}{
		{[]float64{0, 0}, []float64{0.5, 0.5}},
		{[]float64{100, 100, 100}, []float64{1.0 / 3, 1.0 / 3, 1.0 / 3}},
		{[]float64{100, 0}, []float64{0.95, 0.05}},
		// 20/s cap: a needs 2/s (0.1), b and c split the rest
		{[]float64{2, 100, 100}, []float64{0.1, 0.45, 0.45}},
		// all small: the rest spread equally
		{[]float64{2, 2}, []float64{0.5, 0.5}},
	}
	for _, c := range cases {
		got := fairShares(c.demands, 20, 0.05)
		sum := 0.0
		for i := range got {
			sum += got[i]
			if !near(got[i], c.want[i]) {
				t.Errorf("fairShares(%v) = %v, want %v", c.demands, got, c.want)
				break
			}
		}
		if !near(sum, 1) {
			t.Errorf("fairShares(%v) sums to %v", c.demands, sum)
		}
	}
}

type countingStorage struct {
	certmagic.Storage
	stores, lists, loads atomic.Int64
}

func (c *countingStorage) Store(ctx context.Context, k string, v []byte) error {
	c.stores.Add(1)
	return c.Storage.Store(ctx, k, v)
}

func (c *countingStorage) List(ctx context.Context, p string, r bool) ([]string, error) {
	c.lists.Add(1)
	return c.Storage.List(ctx, p, r)
}

func (c *countingStorage) Load(ctx context.Context, k string) ([]byte, error) {
	c.loads.Add(1)
	return c.Storage.Load(ctx, k)
}

var errDown = errors.New("storage down")

type failingStorage struct {
	certmagic.Storage
	down atomic.Bool
}

func (f *failingStorage) Store(ctx context.Context, k string, v []byte) error {
	if f.down.Load() {
		return errDown
	}
	return f.Storage.Store(ctx, k, v)
}

func (f *failingStorage) List(ctx context.Context, p string, r bool) ([]string, error) {
	if f.down.Load() {
		return nil, errDown
	}
	return f.Storage.List(ctx, p, r)
}

func (f *failingStorage) Load(ctx context.Context, k string) ([]byte, error) {
	if f.down.Load() {
		return nil, errDown
	}
	return f.Storage.Load(ctx, k)
}
