package outbox

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// One identity per process.
//
// An instance id names who owns a batch, whose heartbeat says it is
// alive and whose dot marks are whose. Caddy keeps its instance id in its
// data directory, so two processes that share one (two replicas mounting
// one /data volume, two `caddy run` as the same user) read the same id;
// acting as one instance, both would recover and deliver the same
// batches. So before the outbox recovers anything, it checks, under a
// storage lock per id, whether the id's heartbeat was written by another
// process that is still alive, and if so runs as an identity of its own
// (the id with this process's nonce appended). Its unfinished work is
// adopted like any stopped instance's once it stops.
//
// "Alive" is decided in one of two ways:
//   - the heartbeat names a process on this host, in this PID namespace:
//     that process exists or it does not (kill -0);
//   - otherwise (another host or container, or an older version that
//     recorded no process) the heartbeat is watched for up to two
//     heartbeat intervals: one that is written meanwhile is alive.
//
// A process that is alive but frozen for longer than that (SIGSTOP, a VM
// pause) is taken for dead, as the lease-based adoption does.

// hostProcess identifies this process on its host, for heartbeats.
type hostProcess struct {
	Host  string `json:"host,omitempty"`
	PIDNS string `json:"pid_ns,omitempty"`
	PID   int    `json:"pid,omitempty"`
}

func thisProcess() hostProcess {
	host, _ := os.Hostname()
	ns, _ := os.Readlink("/proc/self/ns/pid")
	return hostProcess{Host: host, PIDNS: ns, PID: os.Getpid()}
}

// processState tells whether a heartbeat's process is alive, when this
// host can tell: known is false when the heartbeat names no process, or
// one on another host or in another PID namespace, or this very process
// (the same PID in two namespaces that look alike).
func processState(hb Heartbeat, me hostProcess) (alive, known bool) {
	p := hb.Proc
	if p.PID <= 0 || p.Host == "" || p.PIDNS == "" || p.Host != me.Host || p.PIDNS != me.PIDNS || p.PID == me.PID {
		return false, false
	}
	err := syscall.Kill(p.PID, 0)
	return err == nil || errors.Is(err, syscall.EPERM), true
}

func (e *Engine) heartbeatEvery() time.Duration {
	return max(e.leaseDuration()/4, 200*time.Millisecond)
}

// claimIdentity settles the instance id this engine runs as, and writes
// its first heartbeat. It runs at start, before any recovery.
func (e *Engine) claimIdentity(ctx context.Context) {
	base := e.iid
	lock := "authmail_identity_" + base
	if err := e.st.s.Lock(ctx, lock); err != nil {
		e.log().Warn("taking the outbox identity lock failed; checking without it", zap.Error(err))
	} else {
		defer func() { _ = e.st.s.Unlock(context.Background(), lock) }()
	}
	if live, how := e.liveElsewhere(ctx, base); live {
		id := base + "-" + e.nonce[:8]
		e.mu.Lock()
		e.iid = id
		e.mu.Unlock()
		e.log().Warn("another live process runs the outbox as this Caddy instance (they share a data directory); this process runs it under an identity of its own, and its unfinished work is adopted like a stopped instance's once it stops. Give each process its own data directory (XDG_DATA_HOME) to keep stable identities.",
			zap.String("instance", base), zap.String("identity", id), zap.String("detected_by", how))
	}
	if err := e.writeHeartbeat(ctx); err != nil {
		e.log().Error("writing the outbox heartbeat failed", zap.Error(err))
	}
}

// liveElsewhere reports whether another process that is still alive
// wrote the heartbeat of instance id.
func (e *Engine) liveElsewhere(ctx context.Context, id string) (bool, string) {
	var hb Heartbeat
	if err := e.st.getJSON(ctx, KeyInst+id, &hb); err != nil {
		if !IsNotExist(err) {
			e.log().Warn("reading the outbox heartbeat failed; assuming no other process uses this instance", zap.Error(err))
		}
		return false, ""
	}
	if hb.AdoptedBy != "" || hb.Process == e.nonce {
		return false, ""
	}
	if alive, known := processState(hb, thisProcess()); known {
		return alive, "process"
	}
	every := e.heartbeatEvery()
	if time.Since(hb.Updated) > 2*every {
		return false, ""
	}
	deadline := time.Now().Add(2 * every)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return false, ""
		case <-time.After(every / 4):
		}
		var again Heartbeat
		if err := e.st.getJSON(ctx, KeyInst+id, &again); err == nil && (!again.Updated.Equal(hb.Updated) || again.Process != hb.Process) {
			return again.AdoptedBy == "", "heartbeat"
		}
	}
	return false, ""
}

// Instance returns the id the engine runs as.
func (e *Engine) Instance() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.iid
}

// randomHex returns n random bytes in hex.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}
