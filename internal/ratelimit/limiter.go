package ratelimit

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"
)

// Limiter keeps sliding-window logs of events per key. It is safe for
// concurrent use.
type Limiter struct {
	mu    sync.Mutex
	local map[string]*eventLog
	peers map[string]map[string][]int64 // instance -> key -> unix ms
	salt  []byte

	syncMu    sync.Mutex // one Sync at a time
	published bool       // the last published state had events
}

type eventLog struct {
	window time.Duration
	times  []int64 // unix ms, ascending, at most the limit's n
}

// New returns an empty limiter without a salt; SetSalt gives it one.
func New() *Limiter {
	return &Limiter{local: map[string]*eventLog{}, peers: map[string]map[string][]int64{}}
}

// NewRandomSalt returns 32 random bytes, a salt of this process's own.
func NewRandomSalt() []byte {
	salt := make([]byte, 32)
	_, _ = rand.Read(salt)
	return salt
}

// SetSalt sets the salt Hash uses.
func (l *Limiter) SetSalt(salt []byte) {
	salt = append([]byte(nil), salt...)
	l.mu.Lock()
	l.salt = salt
	l.mu.Unlock()
}

// Hash returns a salted hash of a value, for keys and logs: 24 hex
// digits, the first 12 bytes of HMAC-SHA256 keyed with the salt.
func (l *Limiter) Hash(v string) string {
	l.mu.Lock()
	salt := l.salt
	l.mu.Unlock()
	m := hmac.New(sha256.New, salt)
	m.Write([]byte(v))
	return hex.EncodeToString(m.Sum(nil)[:12])
}

// countLocked returns the events of key within the window ending at
// now, local and published by peers, and the oldest of them.
func (l *Limiter) countLocked(key string, spec Spec, now time.Time) (int, int64) {
	from := now.Add(-spec.Window).UnixMilli()
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

func retryAfter(oldest int64, spec Spec, now time.Time) time.Duration {
	d := time.UnixMilli(oldest).Add(spec.Window).Sub(now)
	return max(d, time.Second)
}

// Take records an event for key if the limit allows it; otherwise it
// returns false and how long to wait.
func (l *Limiter) Take(key string, spec Spec, now time.Time) (bool, time.Duration) {
	i, wait := l.TakeAll([]string{key}, spec, now)
	return i < 0, wait
}

// TakeAll is Take for several keys at once: it records an event for
// every key if the limit allows it for all of them and returns -1;
// otherwise it records nothing and returns the index of the first key
// over the limit and how long to wait.
func (l *Limiter) TakeAll(keys []string, spec Spec, now time.Time) (int, time.Duration) {
	if spec.N == 0 {
		return -1, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, key := range keys {
		if n, oldest := l.countLocked(key, spec, now); n >= spec.N {
			return i, retryAfter(oldest, spec, now)
		}
	}
	for _, key := range keys {
		l.recordLocked(key, spec, now)
	}
	return -1, 0
}

// Blocked reports whether key already had N events within the window,
// and if so how long to wait.
func (l *Limiter) Blocked(key string, spec Spec, now time.Time) (bool, time.Duration) {
	if spec.N == 0 {
		return false, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if n, oldest := l.countLocked(key, spec, now); n >= spec.N {
		return true, retryAfter(oldest, spec, now)
	}
	return false, 0
}

// Record counts an event for key, whatever the limit.
func (l *Limiter) Record(key string, spec Spec, now time.Time) {
	if spec.N == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recordLocked(key, spec, now)
}

func (l *Limiter) recordLocked(key string, spec Spec, now time.Time) {
	lg := l.local[key]
	if lg == nil {
		lg = &eventLog{}
		l.local[key] = lg
	}
	lg.window = spec.Window
	lg.times = append(lg.times, now.UnixMilli())
	if len(lg.times) > spec.N {
		// only the n most recent events can matter
		lg.times = append(lg.times[:0], lg.times[len(lg.times)-spec.N:]...)
	}
}

// Sweep forgets the events older than their window.
func (l *Limiter) Sweep(now time.Time) {
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
