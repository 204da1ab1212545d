package outbox

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// Parking keeps the engine's memory bounded by the work that is due soon,
// not by the backlog. A batch whose messages all wait for a retry (or a
// webhook retry) more than parkAfter away leaves memory; a summary of
// a few words stays. Its state in storage is current, because a batch
// with an attempt in flight or a state write pending is never parked, so
// status lookups read it from there. The batch is loaded back unparkLead
// before its first message or webhook is due.
//
// During an SMTP outage this is what keeps a backlog of 100,000 messages
// from costing 100,000 in-memory records: after a failed attempt they
// wait retry_backoff (30s by default, doubling) for the next one. What
// stays in memory is the work due within parkAfter, plus messages that
// have not had their first attempt yet (at most max_queued).

const (
	parkInterval = time.Second
	parkAfter    = 10 * time.Second
	unparkLead   = 3 * time.Second
	// unparkRetry is the wait after a failed attempt to load a batch back.
	unparkRetry = 5 * time.Second
	// readyHigh bounds the due messages in memory that parked batches are
	// loaded back for: when retries fall due faster than the connections
	// can attempt them (the first retry wave after an outage), the rest
	// stay parked, in order, until the workers catch up. It is enough to
	// keep every worker busy between two park rounds.
	readyHigh = 10000
)

// parkedBatch summarizes a batch that is not in memory.
type parkedBatch struct {
	id         string
	wake       time.Time // earliest next attempt of a message or webhook
	queued     int       // messages not final (they stay in nonFinal)
	oldest     time.Time // creation time of the oldest queued message
	registered time.Time // when this engine took the batch on
	loading    bool      // being read back from storage
	erasing    bool      // its final messages' bodies are being erased
	heapIdx    int       // index in engine.parkHeap, -1 when not in it

	// tenants counts the queued messages by tenantKey (they stay in
	// unfinished, for max_queued_per_key)
	tenants map[string]int
}

// parkableLocked reports whether b can leave memory: nothing in flight,
// nothing to write, nobody waiting, and nothing due before horizon.
func (e *Engine) parkableLocked(b *batch, horizon time.Time) (*parkedBatch, bool) {
	if b.retired || b.open == 0 || e.busyLocked(b) {
		return nil, false
	}
	pb := parkedBatch{id: b.id, registered: b.registered, heapIdx: -1}
	for _, en := range b.entries {
		if !en.firstDone {
			return nil, false
		}
		var due time.Time
		switch {
		case en.st.Status == Queued:
			if en.heapIdx < 0 {
				return nil, false
			}
			due = en.st.NextAt
			pb.queued++
			if pb.tenants == nil {
				pb.tenants = map[string]int{}
			}
			pb.tenants[tenantKey(en.st.Tenant, en.st.KeyID)]++
			if pb.oldest.IsZero() || en.st.Created.Before(pb.oldest) {
				pb.oldest = en.st.Created
			}
		case !IsFinal(en.st.Status):
			return nil, false
		case en.st.Webhook.Status == HookPending:
			if en.hookIdx < 0 { // a webhook is being posted
				return nil, false
			}
			due = en.st.Webhook.NextAt
		default:
			continue
		}
		if !due.After(horizon) {
			return nil, false
		}
		if pb.wake.IsZero() || due.Before(pb.wake) {
			pb.wake = due
		}
	}
	if pb.wake.IsZero() {
		return nil, false
	}
	return &pb, true
}

// parkLocked takes b out of memory and keeps its summary.
func (e *Engine) parkLocked(b *batch, pb *parkedBatch) {
	for _, en := range b.entries {
		if en.heapIdx >= 0 {
			e.ready.remove(en)
		}
		if en.hookIdx >= 0 {
			e.hooks.Remove(en)
		}
		if en.data != nil {
			e.bodyBytes.Add(-int64(len(en.data)))
			en.data, en.from, en.to = nil, "", nil
		}
		delete(e.entries, en.st.ID)
	}
	delete(e.batches, b.id)
	e.segCache.drop(b.id)
	e.parked[b.id] = pb
	e.parkHeap.Push(pb)
}

// forgetParkedLocked drops a parked batch (another instance owns it now).
func (e *Engine) forgetParkedLocked(pb *parkedBatch) {
	if pb.heapIdx >= 0 {
		e.parkHeap.Remove(pb)
	}
	delete(e.parked, pb.id)
	e.parkedCountLocked(pb)
}

// parkLoop parks idle batches and loads parked ones back before they are
// due.
func (e *Engine) parkLoop() {
	defer e.loops.Done()
	for e.wait(e.tun.ParkEvery) {
		e.parkIdle(time.Now())
		e.unparkDue(time.Now())
	}
}

// parkIdle parks every batch with nothing due within parkAfter. A batch
// that parks with final messages among those that wait has their bodies
// and recipients erased from its segment: nobody needs them any more, and
// the segment may stay for as long as the others retry (max_age).
func (e *Engine) parkIdle(now time.Time) int {
	horizon := now.Add(e.tun.ParkAfter)
	type erasure struct {
		pb    *parkedBatch
		final map[string]bool
	}
	var erase []erasure
	e.mu.Lock()
	n := 0
	for _, b := range e.batches {
		if pb, ok := e.parkableLocked(b, horizon); ok {
			final := map[string]bool{}
			for _, en := range b.entries {
				if IsFinal(en.st.Status) {
					final[en.st.ID] = true
				}
			}
			e.parkLocked(b, pb)
			if len(final) > 0 {
				pb.erasing = true
				erase = append(erase, erasure{pb, final})
			}
			n++
		}
	}
	e.mu.Unlock()
	if len(erase) > 0 {
		// in the background, so that slow storage does not hold up the
		// batches due to be loaded back; an erasing batch waits for it
		e.loops.Add(1)
		go func() {
			defer e.loops.Done()
			for _, x := range erase {
				e.eraseFinalBodies(x.pb, x.final)
			}
		}()
	}
	return n
}

// eraseFinalBodies rewrites a parked batch's segment without the bodies
// and envelopes of its final messages. It runs while the batch is parked
// and marked erasing, so it is not loaded back, attempted or retired
// meanwhile; a batch that is no longer ours (adopted by another instance)
// is left alone.
func (e *Engine) eraseFinalBodies(pb *parkedBatch, final map[string]bool) {
	defer func() {
		e.mu.Lock()
		pb.erasing = false
		e.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	seg, err := e.st.loadSegment(ctx, pb.id)
	if err != nil {
		if !IsNotExist(err) {
			e.log().Warn("reading a segment to erase delivered bodies failed; trying again when the batch parks next", zap.String("batch", pb.id), zap.Error(err))
		}
		return
	}
	changed := false
	for i := range seg.Messages {
		m := &seg.Messages[i]
		if final[m.ID] && (m.Data != nil || m.To != nil) {
			m.Data, m.To, m.From = nil, nil, ""
			changed = true
		}
	}
	if !changed {
		return
	}
	if !e.st.s.Exists(ctx, OwnKey(e.iid, pb.id)) || !e.st.s.Exists(ctx, KeySeg+pb.id) {
		return // adopted or retired elsewhere meanwhile: never write it back
	}
	if err := e.st.putJSON(ctx, KeySeg+pb.id, seg); err != nil {
		e.log().Warn("erasing delivered bodies from a segment failed; trying again when the batch parks next", zap.String("batch", pb.id), zap.Error(err))
	}
}

// unparkDue loads back the parked batches due within unparkLead, as long
// as fewer than readyHigh messages are due in memory.
func (e *Engine) unparkDue(now time.Time) int {
	lead := now.Add(e.tun.UnparkLead)
	e.mu.Lock()
	var due []*parkedBatch
	room := e.tun.ReadyHigh - e.ready.Len()
	var erasing []*parkedBatch
	for e.parkHeap.Len() > 0 && !e.parkHeap.Peek().wake.After(lead) && room > 0 {
		pb := e.parkHeap.Pop()
		if pb.erasing {
			erasing = append(erasing, pb) // loaded back next round
			continue
		}
		pb.loading = true
		room -= pb.queued
		due = append(due, pb)
	}
	for _, pb := range erasing {
		e.parkHeap.Push(pb)
	}
	e.mu.Unlock()
	n := 0
	for _, pb := range due {
		if e.stopping() {
			// loaded again by the next start; leave it parked
			e.mu.Lock()
			pb.loading = false
			if e.parked[pb.id] == pb {
				e.parkHeap.Push(pb)
			}
			e.mu.Unlock()
			continue
		}
		if e.unpark(pb) {
			n++
		}
	}
	if n > 0 {
		e.notify()
	}
	return n
}

// unpark reads a parked batch's state back into memory. It reports
// whether the batch is in memory again.
func (e *Engine) unpark(pb *parkedBatch) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bs, err := e.st.loadState(ctx, pb.id)
	e.mu.Lock()
	defer e.mu.Unlock()
	pb.loading = false
	if e.parked[pb.id] != pb {
		return false // dropped while it was read: another instance owns it
	}
	if err != nil && !IsNotExist(err) {
		e.log().Error("loading a parked batch failed; retrying", zap.String("batch", pb.id), zap.Error(err))
		// read again unparkRetry from now: unparkDue reads a batch
		// unparkLead before its wake time
		pb.wake = time.Now().Add(e.tun.UnparkLead + e.tun.UnparkRetry)
		e.parkHeap.Push(pb)
		return false
	}
	if err != nil || bs.Owner != e.iid {
		// gone, or adopted by another instance that thought we were dead
		e.log().Warn("a parked batch is gone from storage or belongs to another instance now; forgetting it", zap.String("batch", pb.id))
		e.forgetParkedLocked(pb)
		return false
	}
	delete(e.parked, pb.id)
	e.parkedCountLocked(pb) // registerLocked counts them again
	cfg := e.Config()
	b, interrupted, changed := rebuildBatch(pb.id, bs, recoveryRule{retryUncertain: cfg != nil && cfg.RetryUncertain}, time.Now())
	if len(interrupted) > 0 {
		// cannot happen: a batch with an attempt in flight is never parked
		e.log().Error("a parked batch had messages in the sending state", zap.String("batch", pb.id), zap.Int("messages", len(interrupted)))
	}
	b.registered = pb.registered
	e.registerLocked(b, changed)
	return true
}

// Residency reports the unfinished messages held in memory and the
// number of parked batches.
func (e *Engine) Residency() (inMemory, parkedBatches int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	parkedMsgs := 0
	for _, pb := range e.parked {
		parkedMsgs += pb.queued
	}
	return e.nonFinal - parkedMsgs, len(e.parked)
}

// oldestParkedLocked returns the older of oldest and the creation time
// of the oldest parked message.
func (e *Engine) oldestParkedLocked(oldest time.Time) time.Time {
	for _, pb := range e.parked {
		if pb.queued > 0 && (oldest.IsZero() || pb.oldest.Before(oldest)) {
			oldest = pb.oldest
		}
	}
	return oldest
}

// byWake orders parked batches by wake time.
type byWake struct{}

func (byWake) Less(a, b *parkedBatch) bool { return a.wake.Before(b.wake) }
func (byWake) Index(pb *parkedBatch) *int  { return &pb.heapIdx }
