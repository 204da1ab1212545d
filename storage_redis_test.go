package authmail

import (
	"context"
	"testing"
	"time"

	storageredis "github.com/pberkel/caddy-storage-redis"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/redistest"
)

// TestJanitorKeepsSegmentsOfAnOwnerTheIndexLost: the Redis module keeps
// one sorted set per directory and updates them outside any transaction,
// so a Delete of an instance's last ownership marker racing a Store of
// its next one can drop "<instance>/" from the authmail/own index while
// authmail/own/<instance>/ still holds the new marker (Delete: ZREM the
// marker, see the set empty, ZREM the directory from its parent; the
// Store's ZADD lands in between). The janitor must not take the batches
// of an instance it cannot see in that index for orphans: a live
// instance still has its outbox.Heartbeat.
func TestJanitorKeepsSegmentsOfAnOwnerTheIndexLost(t *testing.T) {
	srv := redistest.Start(t)
	rs := srv.Storage(t, redistest.Prefix(t))
	in := newInstance(t, "")
	h := in.handler(func(h *Handler) { h.storageOverride = rs })
	e := h.engine
	e.Tunables().OrphanAge = time.Millisecond
	ctx := context.Background()
	if err := e.WriteHeartbeat(ctx); err != nil {
		t.Fatal(err)
	}
	// a batch accepted but not attempted yet: outbox.Segment and marker, no state
	live := outbox.NewID(time.Now())
	if err := outbox.PutJSON(ctx, e.Storage(), outbox.KeySeg+live, outbox.Segment{Batch: live, Owner: e.Instance()}); err != nil {
		t.Fatal(err)
	}
	if err := e.Storage().Store(ctx, outbox.OwnKey(e.Instance(), live), []byte("x")); err != nil {
		t.Fatal(err)
	}
	// the state the race leaves: the instance's directory is gone from
	// the index of authmail/own, its own index still lists the marker
	loseFromIndex(t, rs, "authmail/own", e.Instance()+"/")
	if owners, err := rs.List(ctx, "authmail/own", false); err != nil || len(owners) != 0 {
		t.Fatalf("the index still lists %q (%v)", owners, err)
	}
	if owned, err := outbox.OwnedBatches(ctx, e.Storage(), e.Instance()); err != nil || len(owned) != 1 {
		t.Fatalf("the instance's own index lost its marker: %q %v", owned, err)
	}
	time.Sleep(20 * time.Millisecond)
	e.Janitor(ctx)
	if !e.Storage().Exists(ctx, outbox.KeySeg+live) {
		t.Fatal("the janitor deleted the outbox.Segment of a live instance's unattempted batch")
	}
}

// loseFromIndex removes member from the Redis module's index of dir.
func loseFromIndex(t *testing.T, rs *storageredis.RedisStorage, dir, member string) {
	t.Helper()
	c := rs.GetClient().(redis.UniversalClient)
	if err := c.ZRem(context.Background(), rs.KeyPrefix+"/"+dir, member).Err(); err != nil {
		t.Fatal(err)
	}
}
