package outbox

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
	ErrNotRetryable   = errors.New("only a failed or unknown message can be retried")
	ErrBodyGone       = errors.New("the message body is gone")
	ErrRetryElsewhere = errors.New("the message's batch is being worked on")
)

// Requeue puts the failed or unknown message id back in the queue. may
// reports whether the caller may see the message; a message it may not
// see is "not found" (ok false).
func (e *Engine) Requeue(ctx context.Context, id string, may func(State) bool) (st State, ok bool, err error) {
	bid := BatchOf(id)
	if bid == "" {
		return State{}, false, nil
	}
	lock := "authmail_retry_" + bid
	if err := e.st.s.Lock(ctx, lock); err != nil {
		return State{}, false, err
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
	if IsNotExist(err) {
		return State{}, false, nil
	}
	if err != nil {
		return State{}, false, err
	}
	m, found := bs.Message(id)
	if !found || !may(m) {
		return State{}, false, nil
	}
	if m.Status != Failed && m.Status != Unknown {
		return m, true, ErrNotRetryable
	}
	if !bs.Done || parked {
		return m, true, ErrRetryElsewhere
	}
	cfg := e.Config()
	if cfg == nil || cfg.ReplayWindow <= 0 || time.Since(bs.Updated) > cfg.ReplayWindow {
		return m, true, ErrBodyGone
	}
	seg, err := e.st.loadSegment(ctx, bid)
	if IsNotExist(err) {
		return m, true, ErrBodyGone
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
		return m, true, ErrBodyGone
	}
	now := time.Now()
	// ownership first, then the state: a crash in between leaves a
	// finished batch that this instance recovers and retires again (the
	// message stays failed); never a queued message nobody owns
	if err := e.st.s.Store(ctx, OwnKey(e.iid, bid), []byte(now.UTC().Format(time.RFC3339Nano))); err != nil {
		return m, true, err
	}
	for i := range bs.Messages {
		if bs.Messages[i].ID == id {
			bs.Messages[i].Status, bs.Messages[i].NextAt, bs.Messages[i].Updated = Queued, now, now
			m = bs.Messages[i]
		}
	}
	bs.Done, bs.Owner, bs.Updated = false, e.iid, now
	if err := e.st.putJSON(ctx, KeySt+bid, bs); err != nil {
		_ = e.st.s.Delete(context.Background(), OwnKey(e.iid, bid))
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
func (e *Engine) requeueLocked(en *Entry, may func(State) bool) (State, bool, error) {
	if !may(en.st) {
		return State{}, false, nil
	}
	if en.st.Status != Failed && en.st.Status != Unknown {
		return en.st, true, ErrNotRetryable
	}
	if en.b.retired || e.batches[en.b.id] != en.b || en.st.Webhook.Status == HookPending {
		// being retired, or its webhook is still due: a moment later the
		// batch is in storage, final, and retried from there
		return en.st, true, ErrRetryElsewhere
	}
	now := time.Now()
	en.st.Status, en.st.NextAt, en.st.Updated = Queued, now, now
	e.ready.push(en)
	e.unfinishedLocked(&en.st, 1)
	en.b.open++
	e.markDirtyLocked(en.b, nil, true)
	return en.st, true, nil
}

// keepsBodies reports whether retire leaves a finished batch's segment
// for the janitor (a replay window is configured).
func (e *Engine) keepsBodies() bool {
	cfg := e.Config()
	return cfg != nil && cfg.ReplayWindow > 0
}

// sweepReplayable deletes the segments of finished batches whose replay
// window has passed. A segment is only looked at when nobody owns it and
// it has a state record; the record (no bodies) says when it finished.
func (e *Engine) sweepReplayable(ctx context.Context, owned map[string]bool, segKeys []string) {
	cfg := e.Config()
	if cfg == nil {
		return
	}
	for _, k := range segKeys {
		bid := path.Base(k)
		if owned[bid] || StorageTempName(bid) {
			continue
		}
		var bs BatchState
		if err := e.st.getJSON(ctx, KeySt+bid, &bs); err != nil || !bs.Done {
			continue
		}
		if time.Since(bs.Updated) > cfg.ReplayWindow {
			_ = e.st.s.Delete(ctx, k)
		}
	}
}
