package authmail

import (
	"context"
	"time"

	"github.com/caddyserver/certmagic"
)

// storageTimeout bounds the storage work of one request: every storage
// call the handler makes for a request (idempotency records, issued
// codes and tokens, status lookups, the console's list and retry) runs
// under one deadline this long, counted from when the request is
// authenticated, and a call still running then is answered as a storage
// failure (503 outbox_unavailable, or the endpoint's own storage-failure
// answer). The accept of new messages has its own bound of the same
// length (internal/outbox acceptTimeout). Tunable that is not part of
// the public config. Tests shorten it.
var storageTimeout = 10 * time.Second

// withStorageDeadline gives ctx the storage deadline of one request.
func withStorageDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, storageTimeout)
}

// bounded runs fn, a storage call, and returns its result, or ctx's error
// once ctx is done, whichever comes first. A deadline on the context is
// not enough: certmagic's FileStorage ignores it for most operations,
// and any storage can block in a system call, so the call runs in its
// own goroutine, which outlives the caller when the storage stalls (as
// the outbox's Accept does with acceptTimeout). The outcome of such a
// call is unknown to the caller: a write may still land. after, when
// set, is called with the call's result once it returns, whether or not
// the caller still waited; it is how a caller keeps a lock until a write
// it gave up on has finished (see idempotent).
func bounded[T any](ctx context.Context, fn func(context.Context) (T, error), after func(T, error)) (T, error) {
	if ctx.Done() == nil {
		// no deadline and no cancellation: nothing to bound
		v, err := fn(ctx)
		if after != nil {
			after(v, err)
		}
		return v, err
	}
	if err := ctx.Err(); err != nil {
		var zero T
		return zero, err
	}
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := fn(ctx)
		if after != nil {
			after(v, err)
		}
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		select {
		case r := <-ch: // finished at the same moment: use it
			return r.v, r.err
		default:
		}
		var zero T
		return zero, ctx.Err()
	}
}

// boundedStorage is the handler's view of the storage: every call
// returns by its context's deadline (see bounded), whether or not the
// storage honours the context. Calls without a deadline run as they are.
type boundedStorage struct{ certmagic.Storage }

func (b boundedStorage) Store(ctx context.Context, key string, value []byte) error {
	_, err := bounded(ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, b.Storage.Store(ctx, key, value) }, nil)
	return err
}

func (b boundedStorage) Load(ctx context.Context, key string) ([]byte, error) {
	return bounded(ctx, func(ctx context.Context) ([]byte, error) { return b.Storage.Load(ctx, key) }, nil)
}

func (b boundedStorage) Delete(ctx context.Context, key string) error {
	_, err := bounded(ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, b.Storage.Delete(ctx, key) }, nil)
	return err
}

func (b boundedStorage) Exists(ctx context.Context, key string) bool {
	ok, err := bounded(ctx, func(ctx context.Context) (bool, error) { return b.Storage.Exists(ctx, key), nil }, nil)
	return ok && err == nil
}

func (b boundedStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	return bounded(ctx, func(ctx context.Context) ([]string, error) { return b.Storage.List(ctx, path, recursive) }, nil)
}

func (b boundedStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	return bounded(ctx, func(ctx context.Context) (certmagic.KeyInfo, error) { return b.Storage.Stat(ctx, key) }, nil)
}

// Lock gives a lock that is taken after its caller stopped waiting back
// at once, so that it does not block every later request until it goes
// stale.
func (b boundedStorage) Lock(ctx context.Context, name string) error {
	if ctx.Done() == nil {
		return b.Storage.Lock(ctx, name)
	}
	ch := make(chan error, 1)
	go func() { ch <- b.Storage.Lock(ctx, name) }()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		go func() {
			if err := <-ch; err == nil {
				_ = b.Storage.Unlock(context.Background(), name)
			}
		}()
		return ctx.Err()
	}
}

func (b boundedStorage) Unlock(ctx context.Context, name string) error {
	_, err := bounded(ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, b.Storage.Unlock(ctx, name) }, nil)
	return err
}
