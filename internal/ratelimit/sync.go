package ratelimit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/storagex"
)

// peerMaxAge is how old a peer's state may be and still count.
const peerMaxAge = 7 * 24 * time.Hour

// state is what an instance publishes at <prefix>/rl/<instance>.
type state struct {
	Instance string             `json:"instance"`
	Updated  time.Time          `json:"updated"`
	Events   map[string][]int64 `json:"events"`
}

func stateDir(prefix string) string           { return prefix + "/rl" }
func stateKey(prefix, instance string) string { return stateDir(prefix) + "/" + instance }
func saltKey(prefix string) string            { return prefix + "/salt" }
func saltLock(prefix string) string           { return prefix + "_salt" }

// checkPrefix refuses a prefix that is not a clean relative key path.
func checkPrefix(prefix string) error {
	if prefix == "" || prefix == "." || path.Clean(prefix) != prefix || path.IsAbs(prefix) || prefix == ".." || strings.HasPrefix(prefix, "../") {
		return fmt.Errorf("ratelimit: storage prefix %q is not a clean relative path", prefix)
	}
	return nil
}

// checkNames refuses a bad prefix, and an instance name that is not one
// path segment.
func checkNames(prefix, instance string) error {
	if err := checkPrefix(prefix); err != nil {
		return err
	}
	if instance == "" || instance == "." || instance == ".." || strings.ContainsAny(instance, "/\\\x00") {
		return fmt.Errorf("ratelimit: instance %q is not a path-safe name", instance)
	}
	return nil
}

// SyncOptions tune a Sync round.
type SyncOptions struct {
	// Now is the time of the round; zero means time.Now().
	Now time.Time
	// CapPrefix and Cap bound what is published of the keys that start
	// with CapPrefix to the Cap keys with the most events, so that keys
	// anyone can create (failed authentication from any client) cannot
	// grow the state every instance writes and reads. Every other key is
	// published in full. Cap <= 0 publishes them all.
	CapPrefix string
	Cap       int
}

// Sync publishes this instance's events under prefix and reads the
// events every other instance published, which then count in Take,
// TakeAll and Blocked until the next Sync. It sweeps first. A limiter
// publishes as one instance: call Sync with the same storage, prefix
// and instance every time. When publishing fails Sync still reads the
// others; it returns what failed (see the package comment for what
// that means for the limits).
func (l *Limiter) Sync(ctx context.Context, st certmagic.Storage, prefix, instance string, opts SyncOptions) error {
	if err := checkNames(prefix, instance); err != nil {
		return err
	}
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	l.Sweep(now)
	own := l.snapshot(instance, now, opts)
	var errs []error
	if len(own.Events) > 0 || l.published {
		b, err := json.Marshal(own)
		if err == nil {
			err = st.Store(ctx, stateKey(prefix, instance), b)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("publishing rate limit state: %w", err))
		} else {
			l.published = len(own.Events) > 0
		}
	}
	keys, err := storagex.List(ctx, st, stateDir(prefix))
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("reading rate limit state: %w", err))...)
	}
	peers := map[string]map[string][]int64{}
	for _, k := range keys {
		id := path.Base(k)
		if id == instance || storagex.TempName(id) {
			continue
		}
		// a state must name the instance it is stored under: anything
		// else (a copy caught mid-write under another name) would count
		// that instance's events twice
		b, err := st.Load(ctx, k)
		if err != nil {
			continue
		}
		var ps state
		if err := json.Unmarshal(b, &ps); err != nil || ps.Instance != id || now.Sub(ps.Updated) > peerMaxAge {
			continue
		}
		peers[id] = ps.Events
	}
	l.mu.Lock()
	l.peers = peers
	l.mu.Unlock()
	return errors.Join(errs...)
}

// snapshot returns the state this instance publishes now.
func (l *Limiter) snapshot(instance string, now time.Time, opts SyncOptions) state {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := state{Instance: instance, Updated: now, Events: make(map[string][]int64, len(l.local))}
	var capped []string
	for k, lg := range l.local {
		if opts.Cap > 0 && strings.HasPrefix(k, opts.CapPrefix) {
			capped = append(capped, k)
			continue
		}
		s.Events[k] = slices.Clone(lg.times)
	}
	if len(capped) > opts.Cap {
		slices.SortFunc(capped, func(a, b string) int { return len(l.local[b].times) - len(l.local[a].times) })
		capped = capped[:opts.Cap]
	}
	for _, k := range capped {
		s.Events[k] = slices.Clone(l.local[k].times)
	}
	return s
}

// LoadSalt reads the cluster's hashing salt at <prefix>/salt, creating
// it once (32 random bytes, under the storage lock "<prefix>_salt")
// when no instance has yet. A stored salt shorter than 16 bytes is an
// error.
func LoadSalt(ctx context.Context, st certmagic.Storage, prefix string) ([]byte, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, err
	}
	get := func() ([]byte, error) {
		b, err := st.Load(ctx, saltKey(prefix))
		if err == nil && len(b) < 16 {
			return nil, fmt.Errorf("%s is too short", saltKey(prefix))
		}
		return b, err
	}
	salt, err := get()
	if storagex.NotExist(err) {
		if err := st.Lock(ctx, saltLock(prefix)); err != nil {
			return nil, err
		}
		defer func() { _ = st.Unlock(context.Background(), saltLock(prefix)) }()
		if salt, err = get(); storagex.NotExist(err) {
			salt = NewRandomSalt()
			err = st.Store(ctx, saltKey(prefix), salt)
		}
	}
	if err != nil {
		return nil, err
	}
	return salt, nil
}

// Forget deletes the state instance published under prefix, for an
// instance that stopped for good. A state that is not there is no
// error.
func Forget(ctx context.Context, st certmagic.Storage, prefix, instance string) error {
	if err := checkNames(prefix, instance); err != nil {
		return err
	}
	if err := st.Delete(ctx, stateKey(prefix, instance)); err != nil && !storagex.NotExist(err) {
		return err
	}
	return nil
}
