package outbox

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
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

// leaseValid is how long after a renewal was sent the instance's
// ownership stays valid: the lease less the margin (lease.go).
func (e *Engine) leaseValid() time.Duration {
	l := e.leaseDuration()
	return l - leaseMargin(l)
}

// renew writes the heartbeat and, once the storage acknowledged it,
// extends the instance's ownership from the moment the write was sent.
// A lapsed ownership is not extended: it is re-established (reestablish).
func (e *Engine) renew(ctx context.Context) error {
	sent := e.clk.Now()
	if err := e.writeHeartbeat(ctx); err != nil {
		return err
	}
	if e.gate.renew(sent, e.leaseValid()) {
		return nil
	}
	return e.reestablish(ctx)
}

// reestablish makes this instance the owner of its work again, after a
// lapse or at start, under the adoption lock of its own instance id (an
// adopter holds it for its whole takeover):
//
//  1. it raises its fencing epoch, so that every write it made before,
//     still in flight somewhere, is refused from now on (fence.go);
//  2. it writes its heartbeat; an adopter's raise of the epoch requires
//     the heartbeat it watched to be unchanged (bump), so from the moment
//     this heartbeat landed no adopter can start;
//  3. it reads its epoch back: if an adopter raised it in between, it
//     starts over;
//  4. it lists its ownership markers and forgets, without writing
//     anything, every batch in memory whose marker is gone (adopted): a
//     write or an attempt of such a batch still in flight is ignored when
//     it ends;
//  5. its ownership is valid again from the moment step 2's write was
//     sent.
//
// recover, at start, then loads its batches from storage (takeOver).
func (e *Engine) reestablish(ctx context.Context) error {
	lock := "authmail_adopt_" + e.iid
	lctx, cancel := context.WithTimeout(ctx, e.leaseDuration())
	err := e.st.s.Lock(lctx, lock)
	cancel()
	if err != nil {
		return fmt.Errorf("taking this instance's adoption lock: %w", err)
	}
	defer func() { _ = e.st.s.Unlock(context.Background(), lock) }()
	f := fencerFor(e.st.s)
	for range 3 {
		ep, err := f.bump(ctx, e.iid, nil)
		if err != nil {
			return err
		}
		sent := e.clk.Now()
		if err := e.writeHeartbeat(ctx); err != nil {
			return err
		}
		now, err := f.epoch(ctx, e.iid)
		if err != nil {
			return err
		}
		if now != ep {
			continue // an adopter raised it meanwhile
		}
		owned, err := e.st.ownedBatches(ctx, e.iid)
		if err != nil {
			return err
		}
		lost := e.dropAdopted(owned, ep)
		if len(lost) > 0 {
			e.log().Error("another instance adopted this instance's unfinished messages while its lease lapsed; dropped them here without writing (raise delivery lease if this instance or its storage stalls for long)",
				zap.Int("batches", len(lost)), zap.Strings("sample", lost[:min(3, len(lost))]))
		}
		e.gate.establish(sent, e.leaseValid())
		return nil
	}
	return errors.New("another instance kept adopting this instance's work while it re-established its ownership")
}

// dropAdopted forgets, without writing, every batch in memory whose
// ownership marker is not among owned, and makes ep the epoch of this
// instance's writes; it returns the batches dropped. Batches with an
// attempt or a write in flight are dropped too: the attempt finds its
// batch lost when it ends and records nothing, and the write was made
// under the old epoch, so the storage refuses it (or applied it before
// the epoch was raised, while it was still this instance's).
func (e *Engine) dropAdopted(owned []string, ep uint64) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	lost := e.dropUnownedLocked(owned,
		func(b *batch) bool { return b.retired }, // its marker went with its retirement
		func(*parkedBatch) bool { return false },
		func(b *batch) {
			b.lost = true
			e.forgetLocked(b)
			delete(e.dirty, b)
			delete(e.urgent, b)
		})
	e.epoch = ep
	return lost
}

// heartbeatLoop renews the instance's ownership of its work every
// lease/4 (renew), re-establishing it after a lapse. It also notices
// when another instance adopted our work while our ownership stayed
// valid (it cannot, unless clocks broke the assumptions): the batch's
// marker then is no longer ours, and we drop the batch.
func (e *Engine) heartbeatLoop() {
	defer e.loops.Done()
	for {
		every := e.heartbeatEvery()
		if !e.wait(every) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), max(every, e.leaseDuration()/2))
		if err := e.renew(ctx); err != nil {
			e.log().Warn("renewing the outbox lease failed", zap.Error(err), zap.Bool("owning", e.gate.valid()))
			cancel()
			continue
		}
		e.mu.Lock()
		recovered := e.recovered
		e.mu.Unlock()
		if !recovered {
			// the start's recovery failed (the storage was down): retry it
			if n, err := e.recoverOwn(ctx); err != nil {
				e.log().Warn("recovering the outbox failed; retrying", zap.Error(err))
			} else if n > 0 {
				e.log().Info("recovered queued messages from storage", zap.Int("messages", n), zap.String("instance", e.iid))
			}
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
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dropUnownedLocked(owned,
		func(b *batch) bool {
			return b.open == 0 || b.retired || !b.registered.Before(listed) || e.busyLocked(b)
		},
		func(pb *parkedBatch) bool { return !pb.registered.Before(listed) },
		e.forgetLocked)
}

// dropUnownedLocked forgets the batches, in memory and parked, whose
// ownership marker is not among owned, except those keep (keepParked)
// spares and parked batches being loaded or erased; drop forgets a
// batch in memory. It returns the ids dropped.
func (e *Engine) dropUnownedLocked(owned []string, keep func(*batch) bool, keepParked func(*parkedBatch) bool, drop func(*batch)) []string {
	mine := make(map[string]bool, len(owned))
	for _, b := range owned {
		mine[b] = true
	}
	var lost []string
	for id, b := range e.batches {
		if mine[id] || keep(b) {
			continue
		}
		drop(b)
		lost = append(lost, id)
	}
	for id, pb := range e.parked {
		if mine[id] || pb.loading || pb.erasing || keepParked(pb) {
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

// recoverOwn re-establishes this instance's ownership (reestablish) and
// loads its unfinished work from storage, after a start (a restart after
// a crash, or the first config of the process), or after a start whose
// recovery failed (the storage was down).
func (e *Engine) recoverOwn(ctx context.Context) (int, error) {
	if err := e.reestablish(ctx); err != nil {
		return 0, err
	}
	lock := "authmail_adopt_" + e.iid
	if err := e.st.s.Lock(ctx, lock); err != nil {
		return 0, err
	}
	defer func() { _ = e.st.s.Unlock(context.Background(), lock) }()
	n, err := e.takeOver(ctx, e.iid, 0)
	if err == nil {
		e.mu.Lock()
		e.recovered = true
		e.mu.Unlock()
	}
	return n, err
}

// adoptionLoop takes over the work of instances whose heartbeat stayed
// unchanged for longer than the lease plus the margin, one at a time,
// under a storage lock.
func (e *Engine) adoptionLoop() {
	defer e.loops.Done()
	for e.wait(max(e.leaseDuration()/3, 300*time.Millisecond)) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		e.adoptStale(ctx)
		cancel()
	}
}

// suspect is an instance's heartbeat as this engine last read it, and
// when (by this engine's monotonic clock) it first read that value.
type suspect struct {
	seen  []byte
	since time.Time
}

// watch reads an instance's heartbeat and reports whether this engine
// has seen it unchanged for at least lease + margin, by its own monotonic
// clock since it first read that value: the adoption rule. The instance's
// last renewal that this engine can have missed was sent before that
// first read, so the instance's own ownership ended (lease − margin after
// it sent it) at least 2 × margin before this returns true. A heartbeat
// that cannot be read teaches nothing: the watch goes on.
func (e *Engine) watch(ctx context.Context, instance string) ([]byte, bool) {
	hb, err := e.st.s.Load(ctx, KeyInst+instance)
	if err != nil && !IsNotExist(err) {
		return nil, false
	}
	now := e.clk.Now()
	l := e.leaseDuration()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.suspects == nil {
		e.suspects = map[string]*suspect{}
	}
	s := e.suspects[instance]
	if s == nil || !bytes.Equal(s.seen, hb) {
		e.suspects[instance] = &suspect{seen: hb, since: now}
		return hb, false
	}
	return hb, now.Sub(s.since) >= l+leaseMargin(l)
}

func (e *Engine) adoptStale(ctx context.Context) {
	ids, err := e.st.instances(ctx)
	if err != nil {
		e.log().Warn("listing outbox instances failed", zap.Error(err))
		return
	}
	for _, id := range ids {
		if id == e.iid {
			continue
		}
		hb, stale := e.watch(ctx, id)
		if !stale {
			continue
		}
		owned, err := e.st.ownedBatches(ctx, id)
		if err != nil || len(owned) == 0 {
			continue
		}
		if !e.gate.valid() {
			return // this instance is cut off itself: it adopts nothing
		}
		lock := "authmail_adopt_" + id
		lctx, lcancel := context.WithTimeout(ctx, e.leaseDuration())
		err = e.st.s.Lock(lctx, lock)
		lcancel()
		if err != nil {
			continue
		}
		e.adoptLocked(ctx, id, hb, len(owned))
		_ = e.st.s.Unlock(context.Background(), lock)
	}
}

// adoptLocked takes over an instance's work under its adoption lock,
// if its heartbeat is still the one watched: the instance's epoch is
// raised, on the condition that its heartbeat is unchanged, before any
// of its work is read.
func (e *Engine) adoptLocked(ctx context.Context, id string, hb []byte, batches int) {
	// check again under the lock: the instance may be back, or another
	// instance may have adopted its work meanwhile
	hb2, stale := e.watch(ctx, id)
	if !stale || !bytes.Equal(hb, hb2) {
		return
	}
	ep, err := fencerFor(e.st.s).bump(ctx, id, hb2)
	if err != nil {
		return // the heartbeat changed under us, or no answer
	}
	n, err := e.takeOver(ctx, id, ep)
	if err != nil {
		e.log().Error("adopting the messages of a stale instance failed", zap.String("instance", id), zap.Error(err))
		return
	}
	e.log().Warn("adopted the unfinished messages of an instance whose heartbeat lapsed",
		zap.String("instance", id), zap.Int("batches", batches), zap.Int("queued_messages", n))
	if b, err := json.Marshal(Heartbeat{Instance: id, Updated: time.Now().Add(-e.leaseDuration() * 2), AdoptedBy: e.iid}); err == nil {
		_ = e.fencedApply(ctx, []fenceCond{{id, ep}}, []fenceOp{{key: KeyInst + id, value: b}})
	}
	e.mu.Lock()
	delete(e.suspects, id)
	e.mu.Unlock()
}

// fencedWriteTimeout bounds a fenced write of a record that is written
// again and again (a batch's state, a dot record): the storage refuses
// it once this passed.
const fencedWriteTimeout = 5 * time.Second

// outcomeUnknown reports whether a failed write may still have been, or
// still be, applied: a timeout, a cancelled wait, a broken connection. A
// refusal, an answer of the storage and any other error mean it was not.
// (A storage module that wraps its errors as text hides a timeout; on
// such storages a write can still land late, see fence.go.)
func outcomeUnknown(err error) bool {
	var rerr redis.Error
	if errors.Is(err, errFenced) || errors.As(err, &rerr) {
		return false
	}
	var nerr net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.As(err, &nerr)
}

// fencedApply makes a group of fenced writes (fence.go) with this
// instance's ownership as their deadline, at most fencedWriteTimeout
// away: none is made when it is not valid now.
//
// Writes of one record never land out of order: a write whose outcome is
// unknown (outcomeUnknown) returns only once its deadline
// and the margin passed, when the storage refuses it if it still
// arrives, so the retry that follows is the last word. A batch's state
// never moves backwards that way (a final state is not overwritten by an
// older snapshot), nor does a dot record lose a mark.
func (e *Engine) fencedApply(ctx context.Context, conds []fenceCond, ops []fenceOp) error {
	dl, err := e.fenceDeadline(time.Now().Round(0).Add(fencedWriteTimeout))
	if err != nil {
		return err
	}
	wctx, cancel := context.WithDeadline(ctx, dl)
	defer cancel()
	err = fencerFor(e.st.s).apply(wctx, conds, dl, ops)
	if err != nil && outcomeUnknown(err) {
		t := time.NewTimer(time.Until(dl) + leaseMargin(e.leaseDuration()))
		select {
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	return err
}

// fenceDeadline is the deadline of a fenced write made now: the end of
// this instance's ownership (by the wall clock), or limit if that comes
// first. It fails when the ownership has lapsed.
func (e *Engine) fenceDeadline(limit time.Time) (time.Time, error) {
	_, until, err := e.gate.check()
	if err != nil {
		return time.Time{}, err
	}
	dl := wallDeadline(e.clk, until)
	if limit.Before(dl) {
		dl = limit
	}
	return dl, nil
}

// ownEpoch is the epoch this instance's writes are made under now.
func (e *Engine) ownEpoch() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.epoch
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
//
// ep is the instance's epoch this engine raised for the takeover (0 for
// its own work): every write of the takeover requires it, and this
// engine's own, so that an instance that re-established its ownership
// meanwhile, or an adopter that stalled past its lease, writes nothing.
func (e *Engine) takeOver(ctx context.Context, instance string, ep uint64) (int, error) {
	conds := []fenceCond{{e.iid, e.ownEpoch()}}
	if instance != e.iid {
		conds = append(conds, fenceCond{instance, ep})
	}
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
			_ = e.fencedApply(ctx, conds, []fenceOp{{key: OwnKey(instance, bid), del: true}})
			continue
		}
		if err != nil {
			return total, err
		}
		now := time.Now()
		b, interrupted, changed := rebuildBatch(bid, bs, recoveryRule{dots: dots, retryUncertain: retryUncertain}, now)
		if changed || instance != e.iid {
			// the recovered states are durable before anything else
			// happens to the batch (see above); for another instance's
			// batch, in one fenced step with the move of its marker: our
			// marker is written before the old one goes, so that a crash
			// in between (on a storage without atomic groups) leaves the
			// batch owned by someone
			bs.Owner, bs.Updated = e.iid, now
			for i := range bs.Messages {
				bs.Messages[i] = b.entries[i].st
			}
			val, err := json.Marshal(bs)
			if err != nil {
				return total, err
			}
			ops := []fenceOp{{key: KeySt + bid, value: val}}
			if instance != e.iid {
				ops = append(ops, fenceOp{key: OwnKey(e.iid, bid), value: []byte(now.UTC().Format(time.RFC3339Nano))},
					fenceOp{key: OwnKey(instance, bid), del: true})
			}
			if err := e.fencedApply(ctx, conds, ops); err != nil {
				return total, err
			}
			changed = false
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
		if err := fencerFor(e.st.s).forget(ctx, id); err != nil {
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
