package pace

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"math"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
)

// ShareOptions configure a Share.
type ShareOptions struct {
	// Period is how often the share is synchronised. Default 1s.
	Period time.Duration
	// StaleAfter is how long a record may go without an update before
	// its instance no longer counts. Default 3 periods.
	StaleAfter time.Duration
	// DeleteAfter is how long a record may go without an update before
	// a peer deletes it. Default 60 periods.
	DeleteAfter time.Duration
	// MinShare is the fraction of the cap every live instance keeps,
	// however idle, so that a message arriving on an idle instance
	// leaves without waiting for a round. Default 0.05 (5%), never more
	// than an equal split.
	MinShare float64
}

// Share divides one server's configured rate among the instances of a
// cluster through a certmagic.Storage (the file system or Redis that
// Caddy is configured with).
//
// Each round (Sync, every Period from Run) costs one List of the
// server's directory, one Load per other instance and one Store of this
// instance's record: 2 + (N-1) storage calls per instance and period
// (and a Delete for a record older than DeleteAfter).
// The record, authmail/pace/<server>/<instance>, holds the instance's
// demand (queued plus sent in the last period), the share it holds, its
// last rate decrease and its quota pause.
//
// The shares are a max-min fair split of the cap by demand: every live
// instance keeps MinShare; the rest goes to the demands, smallest
// first, each taking at most an equal part of what is left; what no
// demand needs is spread equally. All instances busy: an equal split.
// An instance raises its share only into what the others do not hold as
// published (it lowers at once), so a newcomer or a newly busy instance
// takes budget within about two periods, after the others gave it up
// (a newcomer to a running cluster holds nothing for its first round),
// and the sum of the shares held stays at most 1 but for the time a
// record takes to be read.
//
// A decrease or a quota pause published by one instance is applied by
// the others on their next round: a throttle seen anywhere slows the
// whole cluster within about two periods.
//
// When the storage fails, the round returns the error and changes
// nothing: the instance keeps its last share while its own record is
// younger than StaleAfter (the peers still count it), then drops to
// MinShare (at most an equal split of the last number of instances it
// saw), because the peers have stopped counting it and split the cap
// without it; the pacer lapses to that share at that moment by itself,
// so a round that does not run at all (a storage call that hangs, a
// paused process) does the same. An instance that has never reached the storage holds
// nothing for StaleAfter, then MinShare. The first successful round
// restores the computed share.
type Share struct {
	st     certmagic.Storage
	dir    string
	id     string
	p      *Pacer
	opts   ShareOptions
	demand func() int

	mu       sync.Mutex
	lastSent uint64
	lastSync time.Time
	held     float64
	prevWant float64
	lastN    int
	peerDecr map[string]time.Time
	lastOK   time.Time
	firstTry time.Time
	lastErr  error
}

// shareRecord is one instance's record in the storage.
type shareRecord struct {
	Instance string  `json:"instance"`
	Demand   float64 `json:"demand"`
	Share    float64 `json:"share"`
	// Updated, Decreased and PausedUntil are Unix nanoseconds (0: never).
	Updated     int64 `json:"updated"`
	Decreased   int64 `json:"decreased,omitempty"`
	PausedUntil int64 `json:"paused_until,omitempty"`
}

// KeyPrefix is where the share records live in the storage.
const KeyPrefix = "authmail/pace"

// NewShare makes the share of pacer p for the server named serverKey
// (a stable name of the SMTP server, safe as a storage path segment)
// and this instance's id. demand returns the messages queued for the
// server on this instance now.
func NewShare(st certmagic.Storage, serverKey, instance string, p *Pacer, demand func() int, opts ShareOptions) (*Share, error) {
	if st == nil || p == nil || demand == nil || !safeSegment(serverKey) || !safeSegment(instance) {
		return nil, errors.New("pace: a share needs a storage, a pacer, a demand and path-safe server and instance names")
	}
	if opts.Period <= 0 {
		opts.Period = time.Second
	}
	if opts.StaleAfter <= 0 {
		opts.StaleAfter = 3 * opts.Period
	}
	if opts.DeleteAfter <= 0 {
		opts.DeleteAfter = 60 * opts.Period
	}
	if opts.MinShare <= 0 {
		opts.MinShare = 0.05
	}
	s := &Share{st: st, dir: path.Join(KeyPrefix, serverKey), id: instance, p: p, opts: opts, demand: demand,
		peerDecr: map[string]time.Time{}}
	// until the first round has seen the others, hold nothing: a new
	// instance does not take what the running ones hold
	if p.configured > 0 {
		p.SetShare(0)
	}
	return s, nil
}

func safeSegment(s string) bool {
	return s != "" && s != "." && s != ".." && !strings.ContainsAny(s, "/\\\x00")
}

// Run synchronises every Period until ctx is done, then deletes this
// instance's record so the others take its share at once. It uses one
// ticker, stopped before it returns.
func (s *Share) Run(ctx context.Context) {
	t := time.NewTicker(s.opts.Period)
	defer t.Stop()
	for {
		_ = s.Sync(ctx, time.Now())
		select {
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = s.st.Delete(dctx, s.key(s.id))
			cancel()
			return
		case <-t.C:
		}
	}
}

func (s *Share) key(instance string) string { return path.Join(s.dir, instance) }

// Err returns the error of the last round, nil when it succeeded.
func (s *Share) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// Sync runs one round at now: publish, read the others, set the share.
func (s *Share) Sync(ctx context.Context, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.sync(ctx, now)
	s.lastErr = err
	if s.firstTry.IsZero() {
		s.firstTry = now
	}
	if err != nil && s.p.configured > 0 && s.lastOK.IsZero() && now.Sub(s.firstTry) >= s.opts.StaleAfter {
		// never reached the storage: send at the least share rather
		// than not at all
		s.held = math.Min(s.opts.MinShare, 1)
		s.p.SetShare(s.held)
	} else if err != nil && s.p.configured > 0 && !s.lastOK.IsZero() && now.Sub(s.lastOK) >= s.opts.StaleAfter {
		// the peers no longer count this instance
		n := max(s.lastN, 1)
		s.held = math.Min(s.held, math.Min(s.opts.MinShare, 1/float64(n)))
		s.p.SetShare(s.held)
	}
	return err
}

func (s *Share) sync(ctx context.Context, now time.Time) error {
	snap := s.p.Snapshot(now)
	period := s.opts.Period.Seconds()
	if !s.lastSync.IsZero() {
		period = math.Max(now.Sub(s.lastSync).Seconds(), 1e-3)
	}
	sentRate := float64(snap.Sent-s.lastSent) / period
	// demand in messages per second: the queue drained within a period,
	// plus what the instance is sending
	own := float64(max(s.demand(), 0))/s.opts.Period.Seconds() + sentRate
	keys, err := s.st.List(ctx, s.dir, false)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	var peers []shareRecord
	for _, k := range keys {
		name := path.Base(k)
		if name == s.id {
			continue
		}
		v, err := s.st.Load(ctx, k)
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted since the List
		}
		if err != nil {
			return err
		}
		var r shareRecord
		if json.Unmarshal(v, &r) != nil || r.Instance != name {
			continue // not a record of ours
		}
		age := now.Sub(time.Unix(0, r.Updated))
		if age >= s.opts.DeleteAfter {
			_ = s.st.Delete(ctx, k)
			continue
		}
		if age >= s.opts.StaleAfter {
			continue
		}
		peers = append(peers, r)
	}
	held := s.held
	if s.p.configured > 0 {
		held = s.nextShare(peers, own)
	}
	mine := shareRecord{Instance: s.id, Demand: own, Share: held, Updated: now.UnixNano()}
	// only this instance's own throttles: republishing a decrease a
	// peer caused would echo it back and forth
	if !snap.ThrottledAt.IsZero() {
		mine.Decreased = snap.ThrottledAt.UnixNano()
	}
	if !snap.PausedUntil.IsZero() {
		mine.PausedUntil = snap.PausedUntil.UnixNano()
	}
	b, _ := json.Marshal(mine)
	if err := s.st.Store(ctx, s.key(s.id), b); err != nil {
		return err
	}
	// the share is applied once the record saying so is stored: the
	// others must be able to see what this instance holds
	s.held = held
	s.lastSent, s.lastSync, s.lastOK = snap.Sent, now, now
	s.lastN = len(peers) + 1
	if s.p.configured > 0 {
		// the others stop counting this instance when its record is
		// StaleAfter old: by then the share lapses to what Sync's
		// failure path would give it, whether or not a round ran
		s.p.SetShareUntil(held, now.Add(s.opts.StaleAfter), math.Min(held, math.Min(s.opts.MinShare, 1/float64(s.lastN))))
	}

	// throttles and pauses seen by the others
	for _, r := range peers {
		if r.Decreased != 0 {
			at := time.Unix(0, r.Decreased)
			if at.After(s.peerDecr[r.Instance]) {
				s.peerDecr[r.Instance] = at
				s.p.PeerThrottled(now, at)
			}
		}
		if r.PausedUntil != 0 {
			s.p.PauseUntil(time.Unix(0, r.PausedUntil))
		}
	}
	for id := range s.peerDecr {
		if !containsInstance(peers, id) {
			delete(s.peerDecr, id)
		}
	}
	return nil
}

// nextShare is the share to hold after a round that read peers: the
// fair share by demand, lowered at once; raised only to what both this
// round and the previous one computed (a raise computed from records
// the others wrote before they saw this instance's demand waits one
// round) and only into what the others do not hold.
func (s *Share) nextShare(peers []shareRecord, own float64) float64 {
	demands := make([]float64, 0, len(peers)+1)
	othersHeld := 0.0
	for _, r := range peers {
		demands = append(demands, r.Demand)
		othersHeld += r.Share
	}
	demands = append(demands, own)
	want := fairShares(demands, s.p.configured, s.opts.MinShare)[len(demands)-1]
	prev := s.prevWant
	s.prevWant = want
	if len(peers) == 0 {
		return want // alone: nobody to overlap with
	}
	next := math.Min(want, prev)
	if next > s.held {
		next = math.Max(s.held, math.Min(next, 1-othersHeld))
	}
	return next
}

func containsInstance(rs []shareRecord, id string) bool {
	for _, r := range rs {
		if r.Instance == id {
			return true
		}
	}
	return false
}

// fairShares splits a cap (messages per second) among demands
// (messages per second): each gets minShare (at most an equal split),
// then max-min fair water-filling of the rest, then what is left over
// equally. The result are fractions of the cap summing to 1.
func fairShares(demands []float64, capRate, minShare float64) []float64 {
	n := len(demands)
	out := make([]float64, n)
	if n == 0 {
		return out
	}
	floor := math.Min(minShare, 1/float64(n))
	left := 1 - floor*float64(n)
	need := make([]float64, n)
	idx := make([]int, n)
	for i, d := range demands {
		out[i] = floor
		need[i] = math.Max(0, d/capRate-floor)
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return need[idx[a]] < need[idx[b]] })
	for k, i := range idx {
		part := left / float64(n-k)
		give := math.Min(need[i], part)
		out[i] += give
		left -= give
	}
	if left > 0 {
		for i := range out {
			out[i] += left / float64(n)
		}
	}
	return out
}
