package outbox

import (
	"context"
	"slices"
	"sync"

	"github.com/caddyserver/certmagic"
)

// LiveStorage is the engine's storage: the storage value of the most
// recently provisioned handler that still holds the engine.
//
// Why: an engine outlives reloads (one per storage, held across reloads by the handler), but
// the storage value it was created with belongs to the config that was
// loaded first. Caddy cleans up an old config's modules after a reload,
// and a storage module's Cleanup may close its connection (the Redis
// module closes its client: every later write fails with "client is
// closed"). So every handler attaches the storage value of its own
// config, and the engine uses the newest; when a handler goes (its config
// was unloaded, or a reload was rejected), the newest remaining one
// applies again, like the delivery settings.
//
// A lock is released through the storage value that took it (the Redis
// module only releases locks it holds itself). An operation that started
// on the old value while its config is being cleaned up can still fail;
// the engine treats that like any storage error (retry, or 503 on a
// request), and a lock taken through it expires by the storage's own
// staleness rules.
type LiveStorage struct {
	mu    sync.Mutex
	cur   certmagic.Storage
	uses  []liveUse
	held  map[string]certmagic.Storage // lock name → value that took it; nil: TryLock took none
	first certmagic.Storage
}

type liveUse struct {
	r *Registration
	s certmagic.Storage
}

var (
	_ certmagic.Storage   = (*LiveStorage)(nil)
	_ certmagic.TryLocker = (*LiveStorage)(nil)
)

func NewLiveStorage(s certmagic.Storage) *LiveStorage {
	return &LiveStorage{cur: s, first: s, held: map[string]certmagic.Storage{}}
}

// Attach makes s, the storage value of r's config, the one in use.
func (l *LiveStorage) Attach(r *Registration, s certmagic.Storage) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.uses = append(l.uses, liveUse{r: r, s: s})
	l.cur = s
}

// Detach drops r's storage value; the newest remaining one applies. With
// none left (the engine is being destroyed) the last one stays.
func (l *LiveStorage) Detach(r *Registration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.uses = slices.DeleteFunc(l.uses, func(u liveUse) bool { return u.r == r })
	if n := len(l.uses); n > 0 {
		l.cur = l.uses[n-1].s
	}
}

func (l *LiveStorage) get() certmagic.Storage {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cur
}

func (l *LiveStorage) Store(ctx context.Context, key string, value []byte) error {
	return l.get().Store(ctx, key, value)
}

func (l *LiveStorage) Load(ctx context.Context, key string) ([]byte, error) {
	return l.get().Load(ctx, key)
}

func (l *LiveStorage) Delete(ctx context.Context, key string) error {
	return l.get().Delete(ctx, key)
}

func (l *LiveStorage) Exists(ctx context.Context, key string) bool {
	return l.get().Exists(ctx, key)
}

func (l *LiveStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	return l.get().List(ctx, path, recursive)
}

func (l *LiveStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	return l.get().Stat(ctx, key)
}

func (l *LiveStorage) Lock(ctx context.Context, name string) error {
	s := l.get()
	if err := s.Lock(ctx, name); err != nil {
		return err
	}
	l.mu.Lock()
	l.held[name] = s
	l.mu.Unlock()
	return nil
}

// TryLock tries the lock on a storage that can; on one that cannot, it
// reports the lock taken without taking one (the janitor, its only user,
// then runs on every instance, which is safe, only wasteful).
func (l *LiveStorage) TryLock(ctx context.Context, name string) (bool, error) {
	s := l.get()
	tl, ok := s.(certmagic.TryLocker)
	if !ok {
		l.mu.Lock()
		l.held[name] = nil
		l.mu.Unlock()
		return true, nil
	}
	got, err := tl.TryLock(ctx, name)
	if err != nil || !got {
		return got, err
	}
	l.mu.Lock()
	l.held[name] = s
	l.mu.Unlock()
	return true, nil
}

func (l *LiveStorage) Unlock(ctx context.Context, name string) error {
	l.mu.Lock()
	s, ok := l.held[name]
	delete(l.held, name)
	if !ok {
		s = l.cur
	}
	l.mu.Unlock()
	if s == nil {
		return nil
	}
	return s.Unlock(ctx, name)
}

// String names the storage the engine was created for, so that a
// liveStorage prints like what it wraps.
func (l *LiveStorage) String() string { return StorageIdentity(l.first) }
