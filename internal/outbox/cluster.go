package outbox

import (
	"context"
	"path"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

// Tunables that are not part of the public config. Tests shorten them.
var (
	janitorInterval = 10 * time.Minute
	orphanAge       = time.Hour // unacknowledged batches older than this are garbage
	// instanceForgetAge is how long the records of an instance that
	// stopped (its heartbeat, its published rate-limit events, its empty
	// ownership folder) outlive its last heartbeat. Instance ids live in
	// Caddy's data directory, so a new one appears whenever Caddy starts
	// without it (a fresh container, say); without this every cluster
	// scan would read every instance that ever ran.
	instanceForgetAge = 7 * 24 * time.Hour
)

func (e *Engine) leaseDuration() time.Duration {
	if c := e.Config(); c != nil && c.Lease > 0 {
		return c.Lease
	}
	return 30 * time.Second
}

func (e *Engine) writeHeartbeat(ctx context.Context) error {
	return e.st.putJSON(ctx, KeyInst+e.iid, Heartbeat{Instance: e.iid, Updated: time.Now(), Process: e.nonce, Proc: e.proc})
}

// heartbeatLoop tells the cluster this instance is alive. It also
// notices when another instance adopted our work because our heartbeat
// lapsed (a pause longer than the lease): the batch's marker then is no
// longer ours, and we drop the batch.
func (e *Engine) heartbeatLoop() {
	defer e.loops.Done()
	for {
		every := e.heartbeatEvery()
		if !e.wait(every) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), every*2)
		if err := e.writeHeartbeat(ctx); err != nil {
			e.log().Warn("writing the outbox heartbeat failed", zap.Error(err))
		}
		listed := time.Now()
		if owned, err := e.st.ownedBatches(ctx, e.iid); err == nil {
			if lost := e.dropLost(owned, listed); len(lost) > 0 {
				e.log().Error("another instance adopted this instance's unfinished messages after its heartbeat lapsed; dropped them here (raise delivery lease if this instance pauses for long)",
					zap.Int("batches", len(lost)), zap.Int("markers_listed", len(owned)), zap.Strings("sample", lost[:min(3, len(lost))]))
			}
		}
		cancel()
	}
}

// dropLost forgets batches with work left whose ownership marker is gone,
// except batches taken on after the markers were listed and batches with
// an attempt in flight. It returns the number dropped.
func (e *Engine) dropLost(owned []string, listed time.Time) []string {
	mine := make(map[string]bool, len(owned))
	for _, b := range owned {
		mine[b] = true
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var lost []string
	for id, b := range e.batches {
		if mine[id] || b.open == 0 || b.retired || !b.registered.Before(listed) || e.busyLocked(b) {
			continue
		}
		e.forgetLocked(b)
		lost = append(lost, id)
	}
	for id, pb := range e.parked {
		if mine[id] || pb.loading || pb.erasing || !pb.registered.Before(listed) {
			continue
		}
		e.forgetParkedLocked(pb)
		lost = append(lost, id)
	}
	return lost
}

// busyLocked reports whether a batch has an attempt in flight or a state
// write pending: it must not be dropped or reloaded now, or a finished
// attempt's outcome would be lost.
func (e *Engine) busyLocked(b *batch) bool {
	if _, dirty := e.dirty[b]; dirty || b.writing > 0 {
		return true
	}
	for _, en := range b.entries {
		if en.claimed {
			return true
		}
	}
	return false
}

// forgetLocked removes a batch from memory.
func (e *Engine) forgetLocked(b *batch) {
	for _, en := range b.entries {
		if en.heapIdx >= 0 {
			e.ready.remove(en)
		}
		if en.hookIdx >= 0 {
			e.hooks.Remove(en)
		}
		if !IsFinal(en.st.Status) {
			e.unfinishedLocked(&en.st, -1)
		}
		delete(e.entries, en.st.ID)
	}
	delete(e.batches, b.id)
}

// recoverOwn loads this instance's unfinished work from storage after a
// start (a restart after a crash, or the first config of the process).
func (e *Engine) recoverOwn(ctx context.Context) (int, error) {
	lock := "authmail_adopt_" + e.iid
	if err := e.st.s.Lock(ctx, lock); err != nil {
		return 0, err
	}
	defer func() { _ = e.st.s.Unlock(context.Background(), lock) }()
	return e.takeOver(ctx, e.iid)
}

// adoptionLoop takes over the work of instances whose heartbeat is older
// than the lease, one at a time, under a storage lock.
func (e *Engine) adoptionLoop() {
	defer e.loops.Done()
	for e.wait(max(e.leaseDuration()/3, 300*time.Millisecond)) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		e.adoptStale(ctx)
		cancel()
	}
}

func (e *Engine) stale(ctx context.Context, instance string) bool {
	var hb Heartbeat
	err := e.st.getJSON(ctx, KeyInst+instance, &hb)
	if err != nil {
		return IsNotExist(err)
	}
	return hb.AdoptedBy != "" || time.Since(hb.Updated) > e.leaseDuration()
}

// staleTwice reports whether an instance looked stale in the previous
// scan too, so that one slow storage write does not trigger an adoption.
func (e *Engine) staleTwice(ctx context.Context, instance string) bool {
	isStale := e.stale(ctx, instance)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.suspects == nil {
		e.suspects = map[string]bool{}
	}
	was := e.suspects[instance]
	e.suspects[instance] = isStale
	return isStale && was
}

func (e *Engine) adoptStale(ctx context.Context) {
	ids, err := e.st.instances(ctx)
	if err != nil {
		e.log().Warn("listing outbox instances failed", zap.Error(err))
		return
	}
	for _, id := range ids {
		if id == e.iid || !e.staleTwice(ctx, id) {
			continue
		}
		owned, err := e.st.ownedBatches(ctx, id)
		if err != nil || len(owned) == 0 {
			continue
		}
		lock := "authmail_adopt_" + id
		if err := e.st.s.Lock(ctx, lock); err != nil {
			continue
		}
		// check again under the lock: the instance may be back, or another
		// instance may have adopted its work meanwhile
		if e.stale(ctx, id) {
			n, err := e.takeOver(ctx, id)
			if err != nil {
				e.log().Error("adopting the messages of a stale instance failed", zap.String("instance", id), zap.Error(err))
			} else {
				e.log().Warn("adopted the unfinished messages of an instance whose heartbeat lapsed",
					zap.String("instance", id), zap.Int("batches", len(owned)), zap.Int("queued_messages", n))
				_ = e.st.putJSON(ctx, KeyInst+id, Heartbeat{Instance: id, Updated: time.Now().Add(-e.leaseDuration() * 2), AdoptedBy: e.iid})
			}
		}
		_ = e.st.s.Unlock(context.Background(), lock)
	}
}

// takeOver loads an instance's unfinished batches into this engine. For
// another instance it moves their ownership to this one first. Messages
// that instance had claimed are queued again, except those whose final
// dot may have reached the server (its dot marks name them): they become
// "unknown" (or are queued again with retry_uncertain). It returns the
// number of messages that still need work.
//
// Every batch whose state changes is written before the next one is read
// and before this instance marks any dot of its own: the marks read here
// are the only record of what was in doubt, and the record is replaced
// once this instance starts delivering.
func (e *Engine) takeOver(ctx context.Context, instance string) (int, error) {
	bids, err := e.st.ownedBatches(ctx, instance)
	if err != nil {
		return 0, err
	}
	dots, err := e.loadDots(ctx, instance)
	if err != nil {
		return 0, err
	}
	cfg := e.Config()
	retryUncertain := cfg != nil && cfg.RetryUncertain
	total := 0
	for _, bid := range bids {
		e.mu.Lock()
		b, known := e.batches[bid]
		if pb := e.parked[bid]; pb != nil {
			// parked batches are ours and current in storage; one that
			// another instance adopted from us is read again
			known = instance == e.iid
			if !known && !pb.loading && !pb.erasing {
				e.forgetParkedLocked(pb)
			} else if !known {
				e.mu.Unlock()
				continue // being loaded back; next round
			}
		}
		if known && instance != e.iid {
			// we hold a batch that another instance adopted from us: its
			// state in storage is the truth now; reload it, unless an
			// attempt or a write is pending (then next round)
			if e.busyLocked(b) {
				e.mu.Unlock()
				continue
			}
			e.forgetLocked(b)
			known = false
		}
		e.mu.Unlock()
		if known {
			continue
		}
		bs, err := e.st.loadState(ctx, bid)
		if IsNotExist(err) {
			// neither state nor segment: a stale marker
			_ = e.st.s.Delete(ctx, OwnKey(instance, bid))
			continue
		}
		if err != nil {
			return total, err
		}
		now := time.Now()
		b, interrupted, changed := rebuildBatch(bid, bs, recoveryRule{dots: dots, retryUncertain: retryUncertain}, now)
		if changed || instance != e.iid {
			// the recovered states are durable before anything else
			// happens to the batch (see above)
			bs.Owner, bs.Updated = e.iid, now
			for i := range bs.Messages {
				bs.Messages[i] = b.entries[i].st
			}
			if err := e.st.putJSON(ctx, KeySt+bid, bs); err != nil {
				return total, err
			}
			changed = false
		}
		if instance != e.iid {
			// write our ownership before the old marker goes, so that a
			// crash in between leaves the batch owned by someone
			if err := e.st.s.Store(ctx, OwnKey(e.iid, bid), []byte(now.UTC().Format(time.RFC3339Nano))); err != nil {
				return total, err
			}
			if err := e.st.s.Delete(ctx, OwnKey(instance, bid)); err != nil && !IsNotExist(err) {
				return total, err
			}
		}
		e.mu.Lock()
		b.registered = time.Now()
		total += e.registerLocked(b, changed)
		// a batch with nothing due soon goes straight to its parked
		// summary: a restart during an SMTP outage must not hold the
		// whole backlog in memory until the next park round
		if pb, ok := e.parkableLocked(b, now.Add(e.tun.ParkAfter)); ok {
			e.parkLocked(b, pb)
		}
		e.mu.Unlock()
		for _, m := range interrupted {
			e.logOutcome(m, &mailer.Error{Code: mailer.CodeUncertain, Phase: mailer.PhaseStopped}, true, 0)
			e.obs.Final(m.Flow, m.Status)
		}
	}
	e.notify()
	// every batch those marks speak for is recovered and written
	e.forgetDots(ctx, dots.keys)
	return total, nil
}

// acceptedBeforeStop is the smtp_response of a message whose acceptance
// only the dot record kept: the reply's text was not recorded.
const acceptedBeforeStop = "accepted (recorded before the instance stopped)"

// recoveryRule decides what a message found "sending" after its instance
// stopped becomes.
type recoveryRule struct {
	dots           dotSet // the stopped instance's dot marks
	retryUncertain bool
}

// doubtful reports whether the message's final dot may have reached the
// server, and in which attempt: a record marks that attempt and holds no
// answer to it, or the instance kept no marks (then a "sending" message
// is in doubt).
//
// The stored state can lag behind the attempt that was in progress: the
// current attempt is at least the one a "sending" state counts, or for a
// "queued" one the next (claims are not written before their attempt),
// and can be later still when a retry began before the outcome of the
// attempt before it was durable (a throttled message is retried at once).
// So a mark or answer of any attempt from the current one on counts; one
// of an earlier attempt is stale (its outcome is stored).
func (r recoveryRule) doubtful(m State) (int, bool) {
	if !r.dots.kept || r.dots.broken {
		return m.Attempts, m.Status == Sending
	}
	if m.Status != Sending && m.Status != Queued {
		return 0, false
	}
	a, ok := r.dots.marks[m.ID]
	if !ok || a < currentAttempt(m) || r.dots.refused[m.ID] >= a {
		return 0, false
	}
	if acc, ok := r.dots.accepted[m.ID]; ok && acc.attempt >= a {
		return 0, false
	}
	return a, true
}

// accepted returns the attempt a record says the server accepted, and
// when that record was written, if it is the current attempt or later.
func (r recoveryRule) accepted(m State) (dotAnswer, bool) {
	if m.Status != Sending && m.Status != Queued {
		return dotAnswer{}, false
	}
	acc, ok := r.dots.accepted[m.ID]
	return acc, ok && acc.attempt >= currentAttempt(m)
}

// currentAttempt is the earliest attempt a recovered message can have
// been in.
func currentAttempt(m State) int {
	if m.Status == Queued {
		return m.Attempts + 1
	}
	return m.Attempts
}

// rebuildBatch turns a stored batch state into a batch in memory.
// Messages found "sending", or "queued" with a dot mark for their next
// attempt, were interrupted by a stop. Those whose dot may have been sent
// become unknown (or queued again with retry_uncertain) and are
// returned; the others never reached the server and are queued again,
// due at once. changed reports that the state must be written again.
func rebuildBatch(bid string, bs *BatchState, rule recoveryRule, now time.Time) (b *batch, interrupted []State, changed bool) {
	b = &batch{id: bid}
	b.entries = make([]*Entry, 0, len(bs.Messages))
	for i, m := range bs.Messages {
		if acc, ok := rule.accepted(m); ok {
			// the server accepted it; the outcome's write was lost
			changed = true
			m.Updated = now
			m.Attempts = acc.attempt
			m.Status, m.SentAt, m.NextAt = Sent, acc.at, time.Time{}
			m.LastCode, m.LastError, m.SMTPResponse = "", "", acceptedBeforeStop
			if m.Webhook.URL != "" {
				m.Webhook.Status, m.Webhook.NextAt = HookPending, now
			}
		} else if attempt, doubt := rule.doubtful(m); m.Status == Sending || m.Status == Queued && doubt {
			changed = true
			m.Updated = now
			if doubt {
				m.Attempts = attempt // the marked attempt, whose claim may not be written
			}
			if !doubt || rule.retryUncertain {
				m.Status, m.NextAt = Queued, now
			} else {
				m.Status, m.NextAt = Unknown, time.Time{}
				m.LastCode, m.LastError = mailer.CodeUncertain, mailer.InterruptedError
				if m.Webhook.URL != "" {
					m.Webhook.Status, m.Webhook.NextAt = HookPending, now
				}
				interrupted = append(interrupted, m)
			}
		}
		b.entries = append(b.entries, &Entry{st: m, b: b, idx: i, heapIdx: -1, hookIdx: -1, first: closedChan, firstDone: true})
	}
	return b, interrupted, changed
}

// registerLocked puts a batch read from storage to work and returns the
// number of its messages that still need delivering.
func (e *Engine) registerLocked(b *batch, changed bool) int {
	e.batches[b.id] = b
	queued := 0
	for _, en := range b.entries {
		e.entries[en.st.ID] = en
		switch {
		case en.st.Status == Queued:
			e.ready.push(en)
			e.unfinishedLocked(&en.st, 1)
			b.open++
			queued++
		case en.st.Webhook.Status == HookPending:
			e.hooks.Push(en)
			b.open++
		}
	}
	if b.open == 0 {
		b.retired = true
		changed = true
	}
	if changed {
		e.markDirtyLocked(b, nil, false)
	}
	return queued
}

// janitorLoop deletes expired status and idempotency records and
// batches that were never acknowledged.
func (e *Engine) janitorLoop() {
	defer e.loops.Done()
	for e.wait(e.tun.JanitorEvery) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		e.janitor(ctx)
		cancel()
	}
}

func (e *Engine) janitor(ctx context.Context) {
	// one instance at a time is enough; skip the round if another runs it
	if tl, ok := e.st.s.(certmagic.TryLocker); ok {
		got, err := tl.TryLock(ctx, "authmail_janitor")
		if err != nil || !got {
			return
		}
		defer func() { _ = e.st.s.Unlock(context.Background(), "authmail_janitor") }()
	}
	cfg := e.Config()
	if cfg == nil {
		return
	}
	now := time.Now()
	expired := func(key string, age time.Duration) bool {
		info, err := e.st.s.Stat(ctx, key)
		return err == nil && now.Sub(info.Modified) > age
	}
	// status records of finished batches
	if keys, err := e.st.s.List(ctx, strings.TrimSuffix(KeySt, "/"), false); err == nil {
		for _, k := range keys {
			if !expired(k, cfg.Retention) {
				continue
			}
			var bs BatchState
			if err := e.st.getJSON(ctx, k, &bs); err == nil && bs.Done {
				_ = e.st.s.Delete(ctx, k)
			}
		}
	}
	// idempotency records
	if keys, err := e.st.s.List(ctx, strings.TrimSuffix(KeyIdem, "/"), true); err == nil {
		for _, k := range keys {
			if expired(k, cfg.IdemTTL) {
				_ = e.st.s.Delete(ctx, k)
			}
		}
	}
	for _, task := range e.janitorTasks {
		task(ctx)
	}
	e.forgetStoppedInstances(ctx, now)
	// segments that no instance owns and that have no state were written
	// by a request that never got its answer (crash mid-accept). Any
	// listing error skips this pass: an incomplete view of the ownership
	// markers would make live batches look orphaned.
	owned := map[string]bool{}
	// the owners are the instances with a heartbeat or a marker directory,
	// not the listing of authmail/own alone: the Redis module's directory
	// index is not transactional and can lose an instance's directory
	// from it while its markers remain
	owners, err := e.st.instances(ctx)
	if err != nil {
		return
	}
	for _, o := range owners {
		bids, err := e.st.ownedBatches(ctx, path.Base(o))
		if err != nil {
			return
		}
		for _, bid := range bids {
			owned[bid] = true
		}
	}
	if keys, err := e.st.list(ctx, strings.TrimSuffix(KeySeg, "/")); err == nil {
		e.sweepReplayable(ctx, owned, keys)
		for _, k := range keys {
			bid := path.Base(k)
			if owned[bid] || !expired(k, e.tun.OrphanAge) || e.st.s.Exists(ctx, KeySt+bid) {
				continue
			}
			_ = e.st.s.Delete(ctx, k)
		}
	}
}

// forgetStoppedInstances deletes the records of instances whose last
// heartbeat is older than forgetAge and that own no batch (their work,
// if any, was adopted long ago). An instance without a heartbeat is left
// alone: it may be starting. The heartbeat goes last, so that a round
// cut short is finished by the next one.
func (e *Engine) forgetStoppedInstances(ctx context.Context, now time.Time) {
	ids, err := e.st.instances(ctx)
	if err != nil {
		return
	}
	for _, id := range ids {
		if id == e.iid {
			continue
		}
		var hb Heartbeat
		if err := e.st.getJSON(ctx, KeyInst+id, &hb); err != nil || now.Sub(hb.Updated) <= e.tun.ForgetAge {
			continue
		}
		if owned, err := e.st.ownedBatches(ctx, id); err != nil || len(owned) > 0 {
			continue
		}
		if err := e.st.s.Delete(ctx, KeyOwn+id); err != nil && !IsNotExist(err) {
			continue
		}
		if err := ratelimit.Forget(ctx, e.st.s, KeyRoot, id); err != nil {
			continue
		}
		// its dot marks speak for batches it no longer owns
		if keys, err := e.st.s.List(ctx, DotDir(id), false); err == nil || IsNotExist(err) {
			e.forgetDots(ctx, keys)
			_ = e.st.s.Delete(ctx, DotDir(id))
		} else {
			continue
		}
		if err := e.st.s.Delete(ctx, KeyInst+id); err != nil && !IsNotExist(err) {
			continue
		}
		e.mu.Lock()
		delete(e.suspects, id)
		e.mu.Unlock()
		e.log().Info("forgot an instance that stopped long ago", zap.String("instance", id), zap.Time("last_heartbeat", hb.Updated))
	}
}

// OnJanitor adds a task the janitor runs on every round, after its own
// sweeps, with the engine's storage reachable: the handler's sweep of
// issued codes. Call it before Start.
func (e *Engine) OnJanitor(task func(context.Context)) {
	e.mu.Lock()
	e.janitorTasks = append(e.janitorTasks, task)
	e.mu.Unlock()
}
