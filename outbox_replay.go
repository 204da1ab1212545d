package authmail

import (
	"context"
	"errors"
	"path"
	"time"

	"go.uber.org/zap"
)

// Replaying a message: POST /messages/{id}/retry puts a failed or unknown
// message back in the queue.
//
// Bodies are kept for the replay window (delivery replay_window) after a
// batch reached its final state: retire leaves authmail/seg/<batch> in
// place, and the janitor deletes it once the batch's state record is
// older than the window. With the default window of 0 bodies go as they
// always did, at once, and every retry of a finished message answers 410.
//
// Cluster: a finished batch is owned by nobody (its own marker is gone),
// so whichever instance gets the request takes it over, under the storage
// lock authmail_retry_<batch> (two instances retrying at once: the second
// finds the message queued and answers 409). A batch that still has
// unfinished messages belongs to the instance working on it: only that
// instance retries in memory; another one answers 409 retry_elsewhere.
//
// Failure semantics: a message whose outcome was unknown may have reached
// the recipient; a retry may deliver it twice. The retried message keeps
// its id, Message-ID and attempt count, gets the normal retry policy for
// temporary failures, and is failed again at its next temporary failure
// when it is older than max_age. Its webhook, if it had one and that was
// delivered, is not sent again.

var (
	errNotRetryable   = errors.New("only a failed or unknown message can be retried")
	errBodyGone       = errors.New("the message body is gone")
	errRetryElsewhere = errors.New("the message's batch is being worked on")
)

// requeue puts the failed or unknown message id back in the queue. may
// reports whether the caller may see the message; a message it may not
// see is "not found" (ok false).
func (e *engine) requeue(ctx context.Context, id string, may func(msgState) bool) (st msgState, ok bool, err error) {
	bid := batchOf(id)
	if bid == "" {
		return msgState{}, false, nil
	}
	lock := "authmail_retry_" + bid
	if err := e.st.s.Lock(ctx, lock); err != nil {
		return msgState{}, false, err
	}
	defer func() { _ = e.st.s.Unlock(context.Background(), lock) }()

	// a batch this instance still works on: requeue in memory
	e.mu.Lock()
	if en := e.entries[id]; en != nil {
		st, ok, err := e.requeueLocked(en, may)
		e.mu.Unlock()
		if err == nil && ok {
			e.notify()
		}
		return st, ok, err
	}
	_, parked := e.parked[bid]
	e.mu.Unlock()

	bs, err := e.st.loadState(ctx, bid)
	if isNotExist(err) {
		return msgState{}, false, nil
	}
	if err != nil {
		return msgState{}, false, err
	}
	m, found := bs.message(id)
	if !found || !may(m) {
		return msgState{}, false, nil
	}
	if m.Status != stFailed && m.Status != stUnknown {
		return m, true, errNotRetryable
	}
	if !bs.Done || parked {
		return m, true, errRetryElsewhere
	}
	cfg := e.config()
	if cfg == nil || cfg.replayWindow <= 0 || time.Since(bs.Updated) > cfg.replayWindow {
		return m, true, errBodyGone
	}
	seg, err := e.st.loadSegment(ctx, bid)
	if isNotExist(err) {
		return m, true, errBodyGone
	}
	if err != nil {
		return m, true, err
	}
	idx := -1
	for i, sm := range seg.Messages {
		if sm.ID == id && sm.Data != nil {
			idx = i
		}
	}
	if idx < 0 {
		return m, true, errBodyGone
	}
	now := time.Now()
	// ownership first, then the state: a crash in between leaves a
	// finished batch that this instance recovers and retires again (the
	// message stays failed); never a queued message nobody owns
	if err := e.st.s.Store(ctx, ownKey(e.iid, bid), []byte(now.UTC().Format(time.RFC3339Nano))); err != nil {
		return m, true, err
	}
	for i := range bs.Messages {
		if bs.Messages[i].ID == id {
			bs.Messages[i].Status, bs.Messages[i].NextAt, bs.Messages[i].Updated = stQueued, now, now
			m = bs.Messages[i]
		}
	}
	bs.Done, bs.Owner, bs.Updated = false, e.iid, now
	if err := e.st.putJSON(ctx, keySt+bid, bs); err != nil {
		_ = e.st.s.Delete(context.Background(), ownKey(e.iid, bid))
		return m, true, err
	}
	b, _, _ := rebuildBatch(bid, bs, recoveryRule{}, now)
	e.mu.Lock()
	b.registered = now
	e.registerLocked(b, false)
	e.mu.Unlock()
	e.notify()
	e.log().Info("message requeued", zap.String("id", id), zap.String("flow", m.Flow), zap.String("key_id", m.KeyID))
	return m, true, nil
}

// requeueLocked requeues a message of a batch in memory.
func (e *engine) requeueLocked(en *entry, may func(msgState) bool) (msgState, bool, error) {
	if !may(en.st) {
		return msgState{}, false, nil
	}
	if en.st.Status != stFailed && en.st.Status != stUnknown {
		return en.st, true, errNotRetryable
	}
	if en.b.retired || e.batches[en.b.id] != en.b || en.st.Webhook.Status == hookPending {
		// being retired, or its webhook is still due: a moment later the
		// batch is in storage, final, and retried from there
		return en.st, true, errRetryElsewhere
	}
	now := time.Now()
	en.st.Status, en.st.NextAt, en.st.Updated = stQueued, now, now
	e.ready.push(en)
	e.nonFinal++
	en.b.open++
	e.markDirtyLocked(en.b, nil, true)
	return en.st, true, nil
}

// keepsBodies reports whether retire leaves a finished batch's segment
// for the janitor (a replay window is configured).
func (e *engine) keepsBodies() bool {
	cfg := e.config()
	return cfg != nil && cfg.replayWindow > 0
}

// sweepReplayable deletes the segments of finished batches whose replay
// window has passed. A segment is only looked at when nobody owns it and
// it has a state record; the record (no bodies) says when it finished.
func (e *engine) sweepReplayable(ctx context.Context, owned map[string]bool, segKeys []string) {
	cfg := e.config()
	if cfg == nil {
		return
	}
	for _, k := range segKeys {
		bid := path.Base(k)
		if owned[bid] || storageTempName(bid) {
			continue
		}
		var bs batchState
		if err := e.st.getJSON(ctx, keySt+bid, &bs); err != nil || !bs.Done {
			continue
		}
		if time.Since(bs.Updated) > cfg.replayWindow {
			_ = e.st.s.Delete(ctx, k)
		}
	}
}
