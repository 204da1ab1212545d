package authmail

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// The storage self-check. The outbox's safety rests on three things its
// storage promises: List lists exactly the keys under the prefix it is
// given (the janitor deletes what it lists, and adoption takes over what
// it lists), Lock is exclusive (adoption and idempotency run under it),
// and what Store acknowledged, Load returns. Storage modules exist that
// break each (an S3 module whose List ignores the prefix and lists the
// whole bucket, one whose Lock is a no-op), and with them mail would be
// deleted or sent twice, silently. So before a storage is used, a few
// probe keys under authmail/check/<random>/ are written, listed, read and
// deleted, and a lock is taken twice; a storage that fails makes the
// config fail to load with an error naming the storage and the problem.
//
// Cost: about eight storage operations plus storageCheckLockWait (the
// second Lock must still be waiting when it gives up), once per storage
// per process: a storage that passed is not checked again on reloads.
// `caddy validate` provisions, so it runs the check too (and so needs the
// storage to be reachable, as the Redis module's own provisioning does).

// keyCheck holds the self-check's probe keys, for the moment it runs.
const keyCheck = "authmail/check/"

// storageCheckLockWait is how long the check's second Lock of a held lock
// waits; it must fail within it. Tests shorten it.
var storageCheckLockWait = 250 * time.Millisecond

// storageCheckTimeout bounds the whole check.
const storageCheckTimeout = 10 * time.Second

// storageChecked holds the identities of storages that passed.
var storageChecked sync.Map

// checkStorageOnce checks s unless a storage of the same identity passed
// before in this process. A failure is not remembered: the next
// provisioning checks again (the storage may have been unreachable).
func checkStorageOnce(s certmagic.Storage) error {
	id := outbox.StorageIdentity(s)
	if _, ok := storageChecked.Load(id); ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), storageCheckTimeout)
	defer cancel()
	if err := checkStorage(ctx, s); err != nil {
		return fmt.Errorf("storage %s is not safe for the outbox: %v", storageName(s), err)
	}
	storageChecked.Store(id, struct{}{})
	return nil
}

// storageName names a storage for an error: its Caddy module id when it
// has one, and its String() (the Redis module's is its configuration with
// the password redacted; certmagic's file storage prints its path).
func storageName(s certmagic.Storage) string {
	name := fmt.Sprintf("%T", s)
	if m, ok := s.(caddy.Module); ok {
		name = string(m.CaddyModule().ID)
	} else if _, ok := s.(*certmagic.FileStorage); ok {
		name = "file_system"
	}
	if str, ok := s.(fmt.Stringer); ok {
		name += " (" + str.String() + ")"
	}
	return name
}

func checkStorage(ctx context.Context, s certmagic.Storage) (err error) {
	var r [8]byte
	_, _ = rand.Read(r[:])
	tag := hex.EncodeToString(r[:])
	dir := keyCheck + tag
	// beside dir, a key and a directory whose names extend dir's, so that
	// a List matching names by string prefix shows
	keys := map[string][]byte{
		dir + "/a":       []byte("probe a " + tag),
		dir + "/sub/b":   []byte("probe b " + tag),
		dir + "-outside": []byte("probe outside " + tag),
		dir + "x/c":      []byte("probe c " + tag),
	}
	order := []string{dir + "/a", dir + "/sub/b", dir + "-outside", dir + "x/c"}
	defer func() {
		// the probes go, leaves first, whatever the verdict
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, k := range order {
			_ = s.Delete(dctx, k)
		}
		_ = s.Delete(dctx, dir+"/sub")
		_ = s.Delete(dctx, dir)
		_ = s.Delete(dctx, dir+"x")
	}()
	for _, k := range order {
		if err := s.Store(ctx, k, keys[k]); err != nil {
			return fmt.Errorf("storing a probe key failed: %v", err)
		}
	}
	for _, k := range order {
		got, err := s.Load(ctx, k)
		if err != nil {
			return fmt.Errorf("loading the probe key %s it stored failed: %v", k, err)
		}
		if string(got) != string(keys[k]) {
			return fmt.Errorf("loading the probe key %s returned other bytes than were stored", k)
		}
	}

	// List must stay inside the prefix and honour recursive=false
	flat, err := s.List(ctx, dir, false)
	if err != nil {
		return fmt.Errorf("listing %s failed: %v", dir, err)
	}
	slices.Sort(flat)
	if want := []string{dir + "/a", dir + "/sub"}; !slices.Equal(flat, want) {
		return fmt.Errorf("%s; List(%q, recursive=false) returned %s, want exactly %s", listProblem(flat, dir, false), dir, listed(flat), listed(want))
	}
	deep, err := s.List(ctx, dir, true)
	if err != nil {
		return fmt.Errorf("listing %s recursively failed: %v", dir, err)
	}
	// a recursive listing may or may not name the directories on the way
	deep = slices.DeleteFunc(deep, func(k string) bool { return k == dir+"/sub" })
	slices.Sort(deep)
	if want := []string{dir + "/a", dir + "/sub/b"}; !slices.Equal(deep, want) {
		return fmt.Errorf("%s; List(%q, recursive=true) returned %s, want exactly %s", listProblem(deep, dir, true), dir, listed(deep), listed(want))
	}

	// Lock must be exclusive: a second Lock of a held lock waits
	lock := "authmail_check_" + tag
	if err := s.Lock(ctx, lock); err != nil {
		return fmt.Errorf("taking a lock failed: %v", err)
	}
	second := make(chan error, 1)
	go func() {
		lctx, cancel := context.WithTimeout(ctx, storageCheckLockWait)
		defer cancel()
		err := s.Lock(lctx, lock)
		if err == nil {
			_ = s.Unlock(context.Background(), lock)
		}
		second <- err
	}()
	var secondErr error
	select {
	case secondErr = <-second:
	case <-time.After(storageCheckLockWait + 2*time.Second):
		// still waiting, past its own deadline: it does wait, which is
		// what matters; it takes and drops the lock once we release it
		secondErr = context.DeadlineExceeded
	}
	if uerr := s.Unlock(context.Background(), lock); uerr != nil && secondErr != nil {
		return fmt.Errorf("releasing a lock failed: %v", uerr)
	}
	if secondErr == nil {
		return errors.New("Lock is not exclusive: a second Lock of a lock that was held succeeded at once (a no-op lock lets two instances adopt the same messages and send them twice)")
	}
	if !errors.Is(secondErr, context.DeadlineExceeded) && !errors.Is(secondErr, context.Canceled) {
		// an error other than giving up at the deadline: the storage does
		// not wait for a held lock (it would fail adoption and idempotent
		// requests whenever two instances meet)
		return fmt.Errorf("a second Lock of a held lock failed instead of waiting: %v", secondErr)
	}
	return nil
}

func listed(keys []string) string {
	if len(keys) == 0 {
		return "nothing"
	}
	if len(keys) > 6 {
		return fmt.Sprintf("%q… (%d keys)", keys[:6], len(keys))
	}
	return fmt.Sprintf("%q", keys)
}

// listProblem says what is wrong with a probe listing.
func listProblem(keys []string, dir string, recursive bool) string {
	for _, k := range keys {
		if !strings.HasPrefix(k, dir+"/") {
			return fmt.Sprintf("List is not prefix-exact: it lists %q, outside the prefix it was given (the janitor would delete keys that are not its own)", k)
		}
	}
	if !recursive {
		for _, k := range keys {
			if strings.Count(strings.TrimPrefix(k, dir+"/"), "/") > 0 {
				return fmt.Sprintf("List ignores recursive=false: it lists %q", k)
			}
		}
	}
	return "List misses keys that were stored"
}
