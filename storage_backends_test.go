package authmail

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/storagex"
)

// The engine's contract tests run on every storage a cluster runs on:
// certmagic's FileStorage (Caddy's default) and the Redis storage module
// (caddy.storage.redis) on a real redis-server. A test opts in with
//
//	func TestX(t *testing.T) { forEachStorage(t, testX) }
//	func testX(t *testing.T) { … newInstance(t, dir) … openStorage(t, dir) … }
//
// and runs as the subtests file and redis. Inside, a storage is named by
// a directory as before (newInstance(t, "") makes a fresh one; two
// instances given the same directory share their storage): on file
// storage it is that directory, on Redis a key prefix derived from it on
// the subtest's redis-server, and each instance opens its own client on
// it, as separate processes do. Tests that look at files on disk stay on
// file storage alone and say why.

// storageRun is the backend one forEachStorage subtest runs on.
type storageRun struct {
	backend string // "file" or "redis"
	redis   *redistest.Server
}

// storageRuns maps the name of each running forEachStorage subtest to
// its backend; a test's helpers find theirs by the test's name, so that
// the tests' bodies and helpers keep their signatures.
var storageRuns sync.Map

// forEachStorage runs f as a subtest on each storage backend.
func forEachStorage(t *testing.T, f func(t *testing.T)) {
	for _, backend := range []string{"file", "redis"} {
		t.Run(backend, func(t *testing.T) {
			run := &storageRun{backend: backend}
			if backend == "redis" {
				run.redis = redistest.Start(t)
			}
			storageRuns.Store(t.Name(), run)
			t.Cleanup(func() { storageRuns.Delete(t.Name()) })
			f(t)
		})
	}
}

// storageRunOf returns the backend t (or a test it is a subtest of)
// runs on, nil outside forEachStorage.
func storageRunOf(t testing.TB) *storageRun {
	name := t.Name()
	for {
		if r, ok := storageRuns.Load(name); ok {
			return r.(*storageRun)
		}
		i := strings.LastIndexByte(name, '/')
		if i < 0 {
			return nil
		}
		name = name[:i]
	}
}

// openStorage opens a client on the storage named dir for t's backend:
// file storage in dir, or (under forEachStorage's redis subtest) Redis
// under a key prefix of dir's own. Every call opens a new client on the
// same keys; the client is closed when t ends.
func openStorage(t testing.TB, dir string) certmagic.Storage {
	t.Helper()
	run := storageRunOf(t)
	if run == nil || run.backend == "file" {
		return &certmagic.FileStorage{Path: dir}
	}
	sum := sha256.Sum256([]byte(dir))
	return run.redis.Storage(t, "authmail-test-"+hex.EncodeToString(sum[:8]))
}

func init() {
	// a correct Lock waits for its poll (a second or so) and gives up at
	// the deadline; a broken one succeeds at once, so a short wait tells
	storageCheckLockWait = 30 * time.Millisecond
}

// What the tests read of the outbox's storage records, through its
// exported functions.
func (st store) ownedBatches(ctx context.Context, instance string) ([]string, error) {
	return outbox.OwnedBatches(ctx, st.s, instance)
}

func (st store) loadState(ctx context.Context, batch string) (*outbox.BatchState, error) {
	return outbox.LoadState(ctx, st.s, batch)
}

func (st store) loadSegment(ctx context.Context, batch string) (*outbox.Segment, error) {
	return outbox.LoadSegment(ctx, st.s, batch)
}

func (st store) instances(ctx context.Context) ([]string, error) { return outbox.Instances(ctx, st.s) }

func (st store) list(ctx context.Context, dir string) ([]string, error) {
	return storagex.List(ctx, st.s, dir)
}
