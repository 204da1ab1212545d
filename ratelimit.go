package authmail

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// rateSpec allows n events per window; n == 0 disables the limit.
type rateSpec struct {
	n      int
	window time.Duration
}

func (r rateSpec) String() string {
	if r.n == 0 {
		return "off"
	}
	return fmt.Sprintf("%d/%s", r.n, shortDuration(r.window))
}

func shortDuration(d time.Duration) string {
	s := d.String()
	s = strings.TrimSuffix(s, "0s")
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// parseRate parses "<n>/<duration>" (e.g. "600/1m") or "off".
func parseRate(s string) (rateSpec, error) {
	if s == "off" {
		return rateSpec{}, nil
	}
	num, win, ok := strings.Cut(s, "/")
	if !ok {
		return rateSpec{}, fmt.Errorf("rate '%s' must look like <n>/<duration>, e.g. 600/1m, or be off", s)
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 1 || n > 1_000_000 {
		return rateSpec{}, fmt.Errorf("rate '%s': the count must be a number from 1 to 1000000", s)
	}
	d, err := time.ParseDuration(win)
	if err != nil {
		// allow "1d" like Caddy durations
		if days, ok := strings.CutSuffix(win, "d"); ok {
			if k, kerr := strconv.Atoi(days); kerr == nil {
				d, err = time.Duration(k)*24*time.Hour, nil
			}
		}
	}
	if err != nil || d < time.Second || d > 7*24*time.Hour {
		return rateSpec{}, fmt.Errorf("rate '%s': the window must be a duration from 1s to 7d", s)
	}
	return rateSpec{n: n, window: d}, nil
}

// Tunable that is not part of the public config. Tests shorten it.
var limitSyncInterval = 5 * time.Second

// limiter keeps sliding-window logs of events per key: API keys,
// recipients of auth flows, and client IPs that failed to authenticate.
// Keys never hold an address or an IP in clear: they are salted hashes.
//
// In a cluster each instance publishes its own events at
// authmail/rl/<instance> and reads the others', so limits are shared
// approximately and without locks.
type limiter struct {
	mu    sync.Mutex
	local map[string]*eventLog
	peers map[string]map[string][]int64 // instance -> key -> unix ms
	salt  []byte
}

type eventLog struct {
	window time.Duration
	times  []int64 // unix ms, ascending, at most the limit's n
}

func newLimiter() *limiter {
	return &limiter{local: map[string]*eventLog{}, peers: map[string]map[string][]int64{}}
}

// hash returns a salted hash of a value, for limiter keys and logs.
func (l *limiter) hash(v string) string {
	l.mu.Lock()
	salt := l.salt
	l.mu.Unlock()
	m := hmac.New(sha256.New, salt)
	m.Write([]byte(v))
	return hex.EncodeToString(m.Sum(nil)[:12])
}

// count returns the events of key within the window ending at now,
// local and published by peers, and the oldest of them.
func (l *limiter) countLocked(key string, spec rateSpec, now time.Time) (int, int64) {
	from := now.Add(-spec.window).UnixMilli()
	n := 0
	oldest := int64(0)
	add := func(times []int64) {
		for _, t := range times {
			if t > from {
				n++
				if oldest == 0 || t < oldest {
					oldest = t
				}
			}
		}
	}
	if lg := l.local[key]; lg != nil {
		add(lg.times)
	}
	for _, p := range l.peers {
		add(p[key])
	}
	return n, oldest
}

func retryAfter(oldest int64, spec rateSpec, now time.Time) time.Duration {
	d := time.UnixMilli(oldest).Add(spec.window).Sub(now)
	return max(d, time.Second)
}

// take records an event for key if the limit allows it; otherwise it
// returns how long to wait.
func (l *limiter) take(key string, spec rateSpec, now time.Time) (bool, time.Duration) {
	i, wait := l.takeAll([]string{key}, spec, now)
	return i < 0, wait
}

// takeAll is take for several keys at once: it records an event for
// every key if the limit allows it for all of them; otherwise it records
// nothing and returns the index of the first key over the limit and how
// long to wait.
func (l *limiter) takeAll(keys []string, spec rateSpec, now time.Time) (int, time.Duration) {
	if spec.n == 0 {
		return -1, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, key := range keys {
		if n, oldest := l.countLocked(key, spec, now); n >= spec.n {
			return i, retryAfter(oldest, spec, now)
		}
	}
	for _, key := range keys {
		l.recordLocked(key, spec, now)
	}
	return -1, 0
}

// blocked reports whether key already had n events within the window.
func (l *limiter) blocked(key string, spec rateSpec, now time.Time) (bool, time.Duration) {
	if spec.n == 0 {
		return false, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if n, oldest := l.countLocked(key, spec, now); n >= spec.n {
		return true, retryAfter(oldest, spec, now)
	}
	return false, 0
}

// record counts an event for key.
func (l *limiter) record(key string, spec rateSpec, now time.Time) {
	if spec.n == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recordLocked(key, spec, now)
}

func (l *limiter) recordLocked(key string, spec rateSpec, now time.Time) {
	lg := l.local[key]
	if lg == nil {
		lg = &eventLog{}
		l.local[key] = lg
	}
	lg.window = spec.window
	lg.times = append(lg.times, now.UnixMilli())
	if len(lg.times) > spec.n {
		// only the n most recent events can matter
		lg.times = append(lg.times[:0], lg.times[len(lg.times)-spec.n:]...)
	}
}

// sweep forgets events older than their window.
func (l *limiter) sweep(now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, lg := range l.local {
		from := now.Add(-lg.window).UnixMilli()
		i := 0
		for i < len(lg.times) && lg.times[i] <= from {
			i++
		}
		lg.times = lg.times[i:]
		if len(lg.times) == 0 {
			delete(l.local, k)
		}
	}
}

// limiterState is what an instance publishes.
type limiterState struct {
	Instance string             `json:"instance"`
	Updated  time.Time          `json:"updated"`
	Events   map[string][]int64 `json:"events"`
}

const keyRL = "authmail/rl/"

// loadSalt reads the cluster's hashing salt from storage, creating it
// once under a lock.
func (e *engine) loadSalt(ctx context.Context) error {
	get := func() ([]byte, error) {
		b, err := e.st.s.Load(ctx, "authmail/salt")
		if err == nil && len(b) < 16 {
			return nil, errors.New("authmail/salt is too short")
		}
		return b, err
	}
	salt, err := get()
	if isNotExist(err) {
		if err := e.st.s.Lock(ctx, "authmail_salt"); err != nil {
			return err
		}
		defer func() { _ = e.st.s.Unlock(context.Background(), "authmail_salt") }()
		if salt, err = get(); isNotExist(err) {
			salt = make([]byte, 32)
			_, _ = rand.Read(salt)
			err = e.st.s.Store(ctx, "authmail/salt", salt)
		}
	}
	if err != nil {
		return err
	}
	e.limits.mu.Lock()
	e.limits.salt = salt
	e.limits.mu.Unlock()
	return nil
}

// maxPublishedAuthFailures bounds the failed-authentication subjects an
// instance publishes for the cluster.
const maxPublishedAuthFailures = 2000

// limitSyncLoop publishes this instance's limiter events and reads the
// other instances'. While the cluster's salt could not be read at start
// (the instance hashes with a salt of its own, so its limits match no
// peer's), it tries again every round.
func (e *engine) limitSyncLoop() {
	defer e.loops.Done()
	for e.wait(e.tun.limitSync) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if e.saltTemporary.Load() {
			if err := e.loadSalt(ctx); err == nil {
				e.saltTemporary.Store(false)
				e.log().Info("read the cluster's hashing salt; rate limits are shared and recipient hashes match again")
			}
		}
		e.syncLimits(ctx)
		cancel()
	}
}

func (e *engine) syncLimits(ctx context.Context) {
	now := time.Now()
	l := e.limits
	l.sweep(now)
	l.mu.Lock()
	state := limiterState{Instance: e.iid, Updated: now, Events: make(map[string][]int64, len(l.local))}
	var authFailures []string
	for k, lg := range l.local {
		if strings.HasPrefix(k, "a:") {
			authFailures = append(authFailures, k)
			continue
		}
		state.Events[k] = append([]int64(nil), lg.times...)
	}
	// failed authentication comes from anyone on the internet: publish
	// the clients with the most failures only, so that a flood from many
	// addresses cannot grow the state every instance writes and reads
	if len(authFailures) > maxPublishedAuthFailures {
		slices.SortFunc(authFailures, func(a, b string) int { return len(l.local[b].times) - len(l.local[a].times) })
		authFailures = authFailures[:maxPublishedAuthFailures]
	}
	for _, k := range authFailures {
		state.Events[k] = append([]int64(nil), l.local[k].times...)
	}
	l.mu.Unlock()
	if len(state.Events) > 0 || e.publishedLimits {
		if err := e.st.putJSON(ctx, keyRL+e.iid, state); err != nil {
			e.log().Warn("publishing rate limit state failed", zap.Error(err))
		}
		e.publishedLimits = len(state.Events) > 0
	}
	keys, err := e.st.list(ctx, strings.TrimSuffix(keyRL, "/"))
	if err != nil {
		e.log().Warn("reading rate limit state failed", zap.Error(err))
		return
	}
	peers := map[string]map[string][]int64{}
	for _, k := range keys {
		id := path.Base(k)
		if id == e.iid || storageTempName(id) {
			continue
		}
		// a state must name the instance it is stored under: anything
		// else (a copy caught mid-write under another name) would count
		// that instance's events twice
		var ps limiterState
		if err := e.st.getJSON(ctx, k, &ps); err != nil || ps.Instance != id || now.Sub(ps.Updated) > 7*24*time.Hour {
			continue
		}
		peers[id] = ps.Events
	}
	l.mu.Lock()
	l.peers = peers
	l.mu.Unlock()
}
