package outbox

import (
	"context"
	"maps"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// What the handler's tests and diagnostics read of a running engine,
// beside the API the handler serves from. None of it changes what the
// engine promises; each takes the engine's lock where it reads state.

// Storage returns the storage the engine writes to (a *LiveStorage when
// the handler made it).
func (e *Engine) Storage() certmagic.Storage { return e.st.s }

// Tunables returns the engine's timing settings for a test to shorten.
// Change them before Start: the loops read them without a lock.
func (e *Engine) Tunables() *Tunables { return &e.tun }

// Janitor runs one janitor round now: what janitorLoop does every
// JanitorEvery.
func (e *Engine) Janitor(ctx context.Context) { e.janitor(ctx) }

// WriteHeartbeat writes the instance's heartbeat now.
func (e *Engine) WriteHeartbeat(ctx context.Context) error { return e.writeHeartbeat(ctx) }

// Started reports whether Start ran (and did not find the engine
// destroyed first).
func (e *Engine) Started() bool { return e.started.Load() }

// Done is closed when the engine's background loops have ended, after
// Destruct or Shutdown.
func (e *Engine) Done() <-chan struct{} { return e.doneCh }

// SetLogger replaces the logger, as a new registration would.
func (e *Engine) SetLogger(l *zap.Logger) { e.logger.Store(l) }

// SetConfig replaces the delivery settings, as a new registration would.
func (e *Engine) SetConfig(c *Config) { e.cfg.Store(c) }

// Inventory is a snapshot of what the engine holds in memory.
type Inventory struct {
	// Resident holds the ids of the messages held in memory, with
	// whether each is claimed by a worker.
	Resident map[string]bool
	// Batches holds the ids of the batches in memory.
	Batches map[string]bool
	// Parked holds the ids of the parked batches.
	Parked map[string]bool
	// NonFinal counts the messages not in a final state; Reserved those
	// being written by Accept.
	NonFinal, Reserved int
	// Unfinished counts both by tenant (a key's tenant, or "key <id>"
	// for records from before tenants), for max_queued_per_key.
	Unfinished map[string]int
}

// Inventory returns a snapshot of what the engine holds in memory.
func (e *Engine) Inventory() Inventory {
	e.mu.Lock()
	defer e.mu.Unlock()
	inv := Inventory{Resident: make(map[string]bool, len(e.entries)), Batches: make(map[string]bool, len(e.batches)),
		Parked: make(map[string]bool, len(e.parked)), NonFinal: e.nonFinal, Reserved: e.reserved,
		Unfinished: maps.Clone(e.unfinished)}
	for id, en := range e.entries {
		inv.Resident[id] = en.claimed
	}
	for id := range e.batches {
		inv.Batches[id] = true
	}
	for id := range e.parked {
		inv.Parked[id] = true
	}
	return inv
}

// LoadState reads a batch's state record from s.
func LoadState(ctx context.Context, s certmagic.Storage, batch string) (*BatchState, error) {
	return store{s: s}.loadState(ctx, batch)
}

// OwnedBatches lists the batches whose ownership marker names instance.
func OwnedBatches(ctx context.Context, s certmagic.Storage, instance string) ([]string, error) {
	return store{s: s}.ownedBatches(ctx, instance)
}

// Instances lists the instances that wrote a heartbeat or own work.
func Instances(ctx context.Context, s certmagic.Storage) ([]string, error) {
	return store{s: s}.instances(ctx)
}

// LoadSegment reads a batch's segment (its bodies and first states).
func LoadSegment(ctx context.Context, s certmagic.Storage, batch string) (*Segment, error) {
	return store{s: s}.loadSegment(ctx, batch)
}

// SetWebhookBackoff sets the first webhook retry delay of the engines
// made from now on and returns the previous one, for the handler's tests.
func SetWebhookBackoff(d time.Duration) time.Duration {
	old := webhookBackoff
	webhookBackoff = d
	return old
}

// OwnDots reads the engine's own dot records from storage, every
// writer's, and merges their marks.
func (e *Engine) OwnDots() (DotRecord, error) {
	out := DotRecord{Marks: map[string]int{}}
	for w := range dotWriters {
		b, err := e.st.s.Load(context.Background(), e.dotWriterKey(w))
		if IsNotExist(err) && w > 0 {
			continue
		}
		if err != nil {
			return out, err
		}
		rec, err := ParseDotRecord(b)
		if err != nil {
			return out, err
		}
		for id, a := range rec.Marks {
			out.Marks[id] = max(out.Marks[id], a)
		}
	}
	return out, nil
}

// RaiseEpoch raises an instance's fencing epoch, as an adopter does
// before it touches that instance's work (fence.go), for a test that
// stands in for an adopter: the instance's writes made under the old
// epoch are refused from then on.
func (e *Engine) RaiseEpoch(ctx context.Context, instance string) (uint64, error) {
	return fencerFor(e.st.s).bump(ctx, instance, nil)
}
