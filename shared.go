package authmail

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

// sharedPool holds what the handlers of one storage and instance share:
// the outbox engine, its storage and the rate limiter. Handlers in every
// config that use the same storage share it, so a reload never starts a
// second consumer, in-flight deliveries finish on the same engine, and
// rate limits carry over.
var sharedPool = caddy.NewUsagePool()

// Tunable that is not part of the public config. Tests shorten it.
var limitSyncInterval = 5 * time.Second

// maxPublishedAuthFailures bounds the failed-authentication subjects an
// instance publishes for the cluster.
const maxPublishedAuthFailures = 2000

// The limiter's keys: "k:<tenant>" (a key's rate), "r:<flow>:<hash>"
// (recipient_rate), "a:<hash>" and "a:v:<hash>" (auth_failures, per
// client). Failed authentication comes from anyone on the internet: the
// cluster sees the clients with the most failures only.
const keyAuthFailure = "a:"

// shared is one sharedPool value.
type shared struct {
	engine *outbox.Engine
	live   *outbox.LiveStorage // the engine's storage: this config's value
	// st is live for the handler: each call returns by its context's
	// deadline, even when the storage ignores it (boundedStorage)
	st     store
	limits *ratelimit.Limiter
	key    string // its sharedPool key, which also names its issued-record locks
	every  time.Duration

	// saltTemporary is set while the salt is this process's own, until
	// storage answers
	saltTemporary atomic.Bool
	startOnce     sync.Once
	stopOnce      sync.Once
	stop          chan struct{}
	done          chan struct{} // closed when the limit sync loop ended
}

func newShared(key string, s certmagic.Storage, iid string) *shared {
	live := outbox.NewLiveStorage(s)
	sh := &shared{
		engine: outbox.New(key, live, iid, metricsObserver{}),
		live:   live, st: store{s: boundedStorage{live}}, limits: ratelimit.New(), key: key, every: limitSyncInterval,
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	sh.engine.OnJanitor(sh.sweepIssued)
	return sh
}

// Start loads the cluster's hashing salt, starts the engine (which
// recovers this instance's work) and the limit sync loop. It runs once;
// the authmail app calls it when a config starts, and every request
// makes sure of it (a no-op once running).
func (sh *shared) Start() {
	sh.startOnce.Do(func() {
		select {
		case <-sh.stop:
			close(sh.done)
			return // destroyed before it ever ran: start nothing
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		if err := sh.loadSalt(ctx); err != nil {
			sh.log().Error("reading the hashing salt failed; rate limits and recipient hashes are per process until it can be read", zap.Error(err))
			sh.saltTemporary.Store(true)
			sh.limits.SetSalt(ratelimit.NewRandomSalt())
		}
		cancel()
		sh.engine.Start()
		go sh.limitSyncLoop()
	})
}

// Destruct stops the limit sync loop, then the engine (deliveries in
// flight get drain_timeout; see outbox.Engine.Destruct).
func (sh *shared) Destruct() error {
	sh.stopOnce.Do(func() { close(sh.stop) })
	sh.startOnce.Do(func() { close(sh.done) }) // never started: nothing runs
	<-sh.done
	return sh.engine.Destruct()
}

func (sh *shared) log() *zap.Logger { return sh.engine.Logger() }

// loadSalt reads the cluster's hashing salt into the limiter.
func (sh *shared) loadSalt(ctx context.Context) error {
	salt, err := ratelimit.LoadSalt(ctx, sh.st.s, outbox.KeyRoot)
	if err != nil {
		return err
	}
	sh.limits.SetSalt(salt)
	return nil
}

// limitSyncLoop publishes this instance's limiter events and reads the
// other instances'. While the cluster's salt could not be read at start
// (the instance hashes with a salt of its own, so its limits match no
// peer's), it tries again every round.
func (sh *shared) limitSyncLoop() {
	defer close(sh.done)
	t := time.NewTicker(sh.every)
	defer t.Stop()
	for {
		select {
		case <-sh.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if sh.saltTemporary.Load() {
			if err := sh.loadSalt(ctx); err == nil {
				sh.saltTemporary.Store(false)
				sh.log().Info("read the cluster's hashing salt; rate limits are shared and recipient hashes match again")
			}
		}
		sh.syncLimits(ctx)
		cancel()
	}
}

// syncLimits publishes this instance's limiter events and reads the
// other instances', once.
func (sh *shared) syncLimits(ctx context.Context) {
	opts := ratelimit.SyncOptions{CapPrefix: keyAuthFailure, Cap: maxPublishedAuthFailures}
	if err := sh.limits.Sync(ctx, sh.st.s, outbox.KeyRoot, sh.engine.Instance(), opts); err != nil {
		sh.log().Warn("sharing rate limit state failed", zap.Error(err))
	}
}

// store is the engine's storage with the outbox's JSON encoding, for the
// records the handler keeps beside the outbox (idempotency, issued codes).
type store struct{ s certmagic.Storage }

func (st store) putJSON(ctx context.Context, key string, v any) error {
	return outbox.PutJSON(ctx, st.s, key, v)
}

func (st store) getJSON(ctx context.Context, key string, v any) error {
	return outbox.GetJSON(ctx, st.s, key, v)
}
