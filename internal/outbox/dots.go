package outbox

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
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
// the dot go. A write holds every mark the engine holds at that moment,
// so marks of connections that reached their dots together share one
// write (group commit); up to dotWriters writes run at once, each to a
// record of its own (authmail/dot/<instance>/<process>[.<writer>]), so a
// mark never queues behind a write it is not part of. A mark leaves the
// records once the message's outcome is durable (later writes drop it).
//
// The reply to a dot is recorded the same way, with no write of its own:
// once the server answered, the mark turns into an answer (accepted, or
// a definite refusal) that the next mark's write carries until the
// outcome is durable in the batch's state. So a connection that goes on
// to its next message records the reply to the one before along with
// the next mark, and after a crash at most its last marked message, the
// one whose reply no later write carried, is in doubt.
//
// After a crash or a takeover, a message is in doubt, and becomes
// "unknown", only if a record marks its current attempt or a later one
// (the current one is the one a "sending" state counts, or for a "queued"
// one the next: claims are not written before their attempt; a later one
// began before the outcome before it was written) and no record holds the
// answer to that mark. One whose marked attempt a record says the server
// accepted is sent; every other message is queued again and delivered
// once. A mark or answer of an attempt whose outcome is stored is stale.
// An instance without any record (a version without marks) leaves every
// "sending" message unknown, as that version did.
//
// Failure semantics: if the mark cannot be written, the dot is never
// sent (the connection is closed inside DATA, which the server
// discards), and the message is retried like any transient failure.
//
// The record is a log of snapshots, one JSON line each; the last complete
// line is the record. On certmagic's file storage (Caddy's default) a
// write appends a line to the record's file and syncs it, instead of
// Store's new temporary file and rename per write: creating a file is
// most of a durable write's cost there, and a mark is written for every
// message. A torn last line (a crash inside the append) was never
// acknowledged, so no dot depends on it and the line before it holds. The
// file is rewritten with Store, as one line, once it grows past
// dotLogMax. On every other storage a write Stores the one line.

// DotRecord is the content of authmail/dot/<instance>/<process>. Each
// start of an engine writes a record of its own (process is a nonce),
// so a recovery that fails half way never loses the marks of an earlier
// process to a newer write: the records of earlier processes are deleted
// only once every batch they speak for has been recovered.
type DotRecord struct {
	Instance string    `json:"instance"`
	Updated  time.Time `json:"updated"`
	// Marks maps a message id to the attempt whose dot may be in flight.
	Marks map[string]int `json:"marks"`
	// Accepted maps a message id to an attempt whose dot the server
	// accepted, and Refused to one it answered with a refusal, while that
	// outcome is not yet durable in the batch's state.
	Accepted map[string]int `json:"accepted,omitempty"`
	Refused  map[string]int `json:"refused,omitempty"`
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

// dotWriters is how many record writes may be in flight at once. Each
// writer has a record of its own (a process's record is the union of
// its writers'), so a mark never waits for a write it is not part of:
// it goes into the next free writer's write, with every mark held then.
const dotWriters = 4

// dotMarks is the engine's in-memory side of its record.
type dotMarks struct {
	mu    sync.Mutex
	marks map[string]int // written, or in a write in progress
	// accepted and refused hold the replies to marked dots whose outcome
	// is not yet durable; the next write carries them
	accepted, refused map[string]int
	pending           []*dotReq
	busy              [dotWriters]bool    // a writeDots runs for the writer
	logs              [dotWriters]*dotLog // open record files on file storage; their writeDots only
	closed            bool                // the engine stopped: writers close their files when idle
}

// dotLog is the record's file on certmagic's file storage, open for
// appending.
type dotLog struct {
	path string
	f    *os.File
	size int64
}

// dotLogMax is the size past which the record's file is rewritten.
const dotLogMax = 256 << 10

// DotDir is the folder of an instance's dot records; DotKey one
// process's record.
func DotDir(instance string) string          { return KeyDot + instance }
func DotKey(instance, process string) string { return KeyDot + instance + "/" + process }

// dotWriterKey is the record of one of this engine's writers.
func (e *Engine) dotWriterKey(w int) string {
	if w == 0 {
		return DotKey(e.iid, e.nonce)
	}
	return DotKey(e.iid, fmt.Sprintf("%s.%d", e.nonce, w))
}

// ownDotRecord reports whether a record key belongs to this engine.
func (e *Engine) ownDotRecord(key string) bool {
	base := path.Base(key)
	return base == e.nonce || strings.HasPrefix(base, e.nonce+".")
}

// markDot makes the mark for one attempt durable; the caller sends the
// final dot only when it returns nil.
func (e *Engine) markDot(ctx context.Context, id string, attempt int) error {
	req := &dotReq{dotMark: dotMark{id, attempt}, done: make(chan error, 1)}
	d := &e.dots
	d.mu.Lock()
	d.pending = append(d.pending, req)
	for w := range d.busy {
		if !d.busy[w] {
			d.busy[w] = true
			go e.writeDots(w)
			break
		}
	}
	// with every writer busy, the first to finish takes it
	d.mu.Unlock()
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		// the write may still land: the mark stays until the outcome is
		// recorded, so at worst an undelivered message is called unknown
		return fmt.Errorf("recording the delivery attempt: %w", ctx.Err())
	}
}

// writeDots writes writer w's record until no mark waits; one goroutine
// at a time runs it for each writer (dotMarks.busy).
func (e *Engine) writeDots(w int) {
	d := &e.dots
	for {
		d.mu.Lock()
		reqs := d.pending
		d.pending = nil
		if len(reqs) == 0 {
			d.busy[w] = false
			if d.closed {
				d.closeLog(w)
			}
			d.mu.Unlock()
			return
		}
		for _, r := range reqs {
			d.marks[r.id] = r.attempt
		}
		rec := DotRecord{Instance: e.iid, Updated: time.Now(), Marks: make(map[string]int, len(d.marks))}
		for id, a := range d.marks {
			rec.Marks[id] = a
		}
		if len(d.accepted) > 0 {
			rec.Accepted = maps.Clone(d.accepted)
		}
		if len(d.refused) > 0 {
			rec.Refused = maps.Clone(d.refused)
		}
		d.mu.Unlock()
		err := e.writeDotRecord(w, rec)
		if err != nil {
			d.mu.Lock()
			for _, r := range reqs {
				// no dot goes out for these. Another writer's write may
				// hold the mark all the same: then a crash before the
				// attempt's outcome is stored calls it unknown, the
				// cautious side
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

// writeDotRecord makes rec writer w's record: appended to the record's
// file on file storage, else Stored.
func (e *Engine) writeDotRecord(w int, rec DotRecord) error {
	line, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	key := e.dotWriterKey(w)
	d := &e.dots
	if fs := fileStorageOf(e.st.s); fs != nil {
		path := fs.Filename(key)
		if l := d.logs[w]; l != nil && (l.path != path || l.size+int64(len(line)) > dotLogMax) {
			d.closeLog(w) // another storage after a reload, or time to rewrite
		}
		if d.logs[w] == nil {
			// the one-line rewrite doubles as the file's creation
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := fs.Store(ctx, key, line)
			cancel()
			if err != nil {
				return err
			}
			f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				return nil // written; the next write tries to open it again
			}
			d.logs[w] = &dotLog{path: path, f: f, size: int64(len(line))}
			return nil
		}
		l := d.logs[w]
		if _, err := l.f.Write(line); err != nil {
			d.closeLog(w)
			return err
		}
		if err := l.f.Sync(); err != nil {
			d.closeLog(w)
			return err
		}
		l.size += int64(len(line))
		return nil
	}
	// fenced, like a state write: a mark that lands after an adopter read
	// this instance's records, or past this instance's ownership, is
	// refused (and its dot not sent)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return e.fencedApply(ctx, []fenceCond{{e.iid, e.ownEpoch()}}, []fenceOp{{key: key, value: line}})
}

// stop closes the records' files once no write is in progress.
func (d *dotMarks) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	for w := range d.busy {
		if !d.busy[w] {
			d.closeLog(w)
		}
	}
}

func (d *dotMarks) closeLog(w int) {
	if d.logs[w] != nil {
		_ = d.logs[w].f.Close()
		d.logs[w] = nil
	}
}

// fileStorageOf returns the certmagic file storage under s, if that is
// what it is.
func fileStorageOf(s certmagic.Storage) *certmagic.FileStorage {
	if l, ok := s.(*LiveStorage); ok {
		s = l.get()
	}
	fs, _ := s.(*certmagic.FileStorage)
	return fs
}

// ParseDotRecord reads a record: its last complete line.
func ParseDotRecord(b []byte) (DotRecord, error) {
	var rec DotRecord
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	var err error
	for i := len(lines) - 1; i >= 0; i-- {
		if err = json.Unmarshal(lines[i], &rec); err == nil {
			return rec, nil
		}
	}
	return rec, fmt.Errorf("no complete dot record: %w", err)
}

// dropDot forgets a message's mark once its outcome is durable. The
// record loses it with the next mark's write, never by a write of its
// own: a mark left in storage names an attempt whose outcome is
// recorded, so a recovery never reads it as in doubt (the message is not
// "sending" any more, or is "sending" for a later attempt).
func (e *Engine) dropDot(id string, attempt int) {
	d := &e.dots
	d.mu.Lock()
	for _, m := range []map[string]int{d.marks, d.accepted, d.refused} {
		if a, ok := m[id]; ok && a == attempt {
			delete(m, id)
		}
	}
	d.mu.Unlock()
}

// answerDot turns the mark of an attempt into the server's answer to its
// dot (accepted or refused), for the next write to carry until the
// outcome is durable. An attempt without a mark (it failed before its
// dot) has nothing to answer.
func (e *Engine) answerDot(id string, attempt int, accepted bool) {
	d := &e.dots
	d.mu.Lock()
	defer d.mu.Unlock()
	if a, ok := d.marks[id]; !ok || a != attempt {
		return
	}
	delete(d.marks, id)
	if accepted {
		d.accepted[id] = attempt
	} else {
		d.refused[id] = attempt
	}
}

// startDots writes this process's empty record at start, before any
// claim: from then on an instance without any record is one that never
// marked its dots (a version before marks).
func (e *Engine) startDots(ctx context.Context) error {
	line, err := json.Marshal(DotRecord{Instance: e.iid, Updated: time.Now(), Marks: map[string]int{}})
	if err != nil {
		return err
	}
	return e.st.s.Store(ctx, DotKey(e.iid, e.nonce), append(line, '\n'))
}

// dotSet is what a recovery knows about an instance's dots.
type dotSet struct {
	// marks maps a message id to the latest attempt a record marks
	marks map[string]int
	// accepted maps a message id to the latest attempt the server
	// accepted, with when the record that says so was written; refused
	// to the latest it refused
	accepted map[string]dotAnswer
	refused  map[string]int
	// kept is false when the instance never wrote a record; broken, when
	// one of them cannot be read
	kept, broken bool
	// keys are the records read, other than this process's own
	keys []string
}

// dotAnswer is an accepted attempt and when a record said so first.
type dotAnswer struct {
	attempt int
	at      time.Time
}

// loadDots reads every record of an instance, except this process's.
func (e *Engine) loadDots(ctx context.Context, instance string) (dotSet, error) {
	set := dotSet{marks: map[string]int{}, accepted: map[string]dotAnswer{}, refused: map[string]int{}}
	keys, err := e.st.s.List(ctx, DotDir(instance), false)
	if err != nil && !IsNotExist(err) {
		return set, err
	}
	for _, k := range keys {
		if StorageTempName(path.Base(k)) {
			continue
		}
		if e.ownDotRecord(k) {
			continue
		}
		set.kept = true
		b, err := e.st.s.Load(ctx, k)
		if err != nil {
			if IsNotExist(err) {
				continue
			}
			return set, err
		}
		rec, err := ParseDotRecord(b)
		if err != nil {
			// a record's first line is written whole (Store) before any
			// dot depends on it, so this is damage from outside: decide
			// as for an instance that kept no marks
			e.log().Error("an unreadable dot record; every message the instance was sending is taken to be in doubt", zap.String("key", k), zap.Error(err))
			set.broken = true
			continue
		}
		for id, a := range rec.Marks {
			set.marks[id] = max(set.marks[id], a)
		}
		for id, a := range rec.Accepted {
			if prev, ok := set.accepted[id]; !ok || a > prev.attempt || a == prev.attempt && rec.Updated.Before(prev.at) {
				set.accepted[id] = dotAnswer{attempt: a, at: rec.Updated}
			}
		}
		for id, a := range rec.Refused {
			set.refused[id] = max(set.refused[id], a)
		}
		set.keys = append(set.keys, k)
	}
	return set, nil
}

// forgetDots deletes records that a completed recovery no longer needs.
func (e *Engine) forgetDots(ctx context.Context, keys []string) {
	for _, k := range keys {
		if err := e.st.s.Delete(ctx, k); err != nil && !IsNotExist(err) {
			e.log().Warn("deleting old dot marks failed; the janitor retries", zap.String("key", k), zap.Error(err))
		}
	}
}
