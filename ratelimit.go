package authmail

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

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

// loadSalt reads the cluster's hashing salt into the limiter.
func (e *Engine) loadSalt(ctx context.Context) error {
	salt, err := ratelimit.LoadSalt(ctx, e.st.s, KeyRoot)
	if err != nil {
		return err
	}
	e.limits.SetSalt(salt)
	return nil
}

// limitSyncLoop publishes this instance's limiter events and reads the
// other instances'. While the cluster's salt could not be read at start
// (the instance hashes with a salt of its own, so its limits match no
// peer's), it tries again every round.
func (e *Engine) limitSyncLoop() {
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

func (e *Engine) syncLimits(ctx context.Context) {
	opts := ratelimit.SyncOptions{CapPrefix: keyAuthFailure, Cap: maxPublishedAuthFailures}
	if err := e.limits.Sync(ctx, e.st.s, KeyRoot, e.iid, opts); err != nil {
		e.log().Warn("sharing rate limit state failed", zap.Error(err))
	}
}
