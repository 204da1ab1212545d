package authmail

import (
	"context"
	"fmt"
	"path"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Dot marks: what a crash leaves in doubt.
//
// A claimed message is "sending" in storage from the claim write until
// its outcome is written. A crash in between leaves it "sending", and
// that alone does not say whether the server can have the message: the
// claim may have been one of a group claimed ahead, the attempt may have
// been dialling, in MAIL or RCPT, or answered with a 4xx whose outcome
// was not yet written. Only a message whose final dot may have reached
// the server can have been delivered.
//
// So right before a transport writes a message's final dot (the SMTP
// end of data, the rename of a captured file) the engine makes a durable
// mark that names the message and its attempt number, and only then lets
// the dot go. The marks of all connections of an instance live in one
// record, authmail/dot/<instance>, rewritten with every change: a mark
// waits for the record write in progress and goes into the next, so one
// write serves every connection that reached its dot meanwhile (group
// commit). A mark leaves the record once the message's outcome is
// durable (the next write drops it).
//
// After a crash or a takeover, a message found "sending" is in doubt,
// and becomes "unknown", only if the record marks it for the same
// attempt; every other "sending" message is queued again and delivered
// once. A record that does not exist at all (an instance of a version
// without marks, which always wrote one at start) leaves every "sending"
// message unknown, as that version did.
//
// Failure semantics: if the mark cannot be written, the dot is never
// sent (the connection is closed inside DATA, which the server
// discards), and the message is retried like any transient failure.

// dotRecord is the content of authmail/dot/<instance>/<process>. Each
// start of an engine writes a record of its own (process is a nonce),
// so a recovery that fails half way never loses the marks of an earlier
// process to a newer write: the records of earlier processes are deleted
// only once every batch they speak for has been recovered.
type dotRecord struct {
	Instance string    `json:"instance"`
	Updated  time.Time `json:"updated"`
	// Marks maps a message id to the attempt whose dot may be in flight.
	Marks map[string]int `json:"marks"`
}

// dotMark names one attempt of one message.
type dotMark struct {
	id      string
	attempt int
}

type dotReq struct {
	dotMark
	done chan error
}

// dotMarks is the engine's in-memory side of its record.
type dotMarks struct {
	mu      sync.Mutex
	marks   map[string]int // written, or in the write in progress
	pending []*dotReq
	writing bool
}

func dotDir(instance string) string          { return keyDot + instance }
func dotKey(instance, process string) string { return keyDot + instance + "/" + process }

// markDot makes the mark for one attempt durable; the caller sends the
// final dot only when it returns nil.
func (e *engine) markDot(ctx context.Context, id string, attempt int) error {
	req := &dotReq{dotMark: dotMark{id, attempt}, done: make(chan error, 1)}
	d := &e.dots
	d.mu.Lock()
	d.pending = append(d.pending, req)
	lead := !d.writing
	d.writing = true
	d.mu.Unlock()
	if lead {
		go e.writeDots()
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		// the write may still land: the mark stays until the outcome is
		// recorded, so at worst an undelivered message is called unknown
		return fmt.Errorf("recording the delivery attempt: %w", ctx.Err())
	}
}

// writeDots writes the record until no mark waits. One goroutine at a
// time runs it (dotMarks.writing).
func (e *engine) writeDots() {
	d := &e.dots
	for {
		d.mu.Lock()
		reqs := d.pending
		d.pending = nil
		if len(reqs) == 0 {
			d.writing = false
			d.mu.Unlock()
			return
		}
		for _, r := range reqs {
			d.marks[r.id] = r.attempt
		}
		rec := dotRecord{Instance: e.iid, Updated: time.Now(), Marks: make(map[string]int, len(d.marks))}
		for id, a := range d.marks {
			rec.Marks[id] = a
		}
		d.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := e.st.putJSON(ctx, dotKey(e.iid, e.nonce), rec)
		cancel()
		if err != nil {
			d.mu.Lock()
			for _, r := range reqs {
				// no dot goes out for these; an earlier write cannot hold
				// a mark for the same attempt (one attempt, one mark)
				if d.marks[r.id] == r.attempt {
					delete(d.marks, r.id)
				}
			}
			d.mu.Unlock()
			e.log().Error("recording delivery attempts failed; the messages are retried", zap.Int("messages", len(reqs)), zap.Error(err))
		}
		for _, r := range reqs {
			r.done <- err
		}
	}
}

// dropDot forgets a message's mark once its outcome is durable. The
// record loses it with the next mark's write, never by a write of its
// own: a mark left in storage names an attempt whose outcome is
// recorded, so a recovery never reads it as in doubt (the message is not
// "sending" any more, or is "sending" for a later attempt).
func (e *engine) dropDot(id string, attempt int) {
	d := &e.dots
	d.mu.Lock()
	if a, ok := d.marks[id]; ok && a == attempt {
		delete(d.marks, id)
	}
	d.mu.Unlock()
}

// startDots writes this process's empty record at start, before any
// claim: from then on an instance without any record is one that never
// marked its dots (a version before marks).
func (e *engine) startDots(ctx context.Context) error {
	return e.st.putJSON(ctx, dotKey(e.iid, e.nonce), dotRecord{Instance: e.iid, Updated: time.Now(), Marks: map[string]int{}})
}

// dotSet is what a recovery knows about an instance's dots.
type dotSet struct {
	marks map[dotMark]bool
	// kept is false when the instance never wrote a record
	kept bool
	// keys are the records read, other than this process's own
	keys []string
}

// loadDots reads every record of an instance, except this process's.
func (e *engine) loadDots(ctx context.Context, instance string) (dotSet, error) {
	set := dotSet{marks: map[dotMark]bool{}}
	keys, err := e.st.s.List(ctx, dotDir(instance), false)
	if err != nil && !isNotExist(err) {
		return set, err
	}
	own := dotKey(e.iid, e.nonce)
	for _, k := range keys {
		if storageTempName(path.Base(k)) {
			continue
		}
		if k == own {
			continue
		}
		set.kept = true
		var rec dotRecord
		if err := e.st.getJSON(ctx, k, &rec); err != nil {
			if isNotExist(err) {
				continue
			}
			return set, err
		}
		for id, a := range rec.Marks {
			set.marks[dotMark{id, a}] = true
		}
		set.keys = append(set.keys, k)
	}
	return set, nil
}

// forgetDots deletes records that a completed recovery no longer needs.
func (e *engine) forgetDots(ctx context.Context, keys []string) {
	for _, k := range keys {
		if err := e.st.s.Delete(ctx, k); err != nil && !isNotExist(err) {
			e.log().Warn("deleting old dot marks failed; the janitor retries", zap.String("key", k), zap.Error(err))
		}
	}
}
