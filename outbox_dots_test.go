package authmail

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/google/uuid"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// claimedAhead writes what an instance that was killed leaves behind
// when a worker had claimed a group: four messages "sending". Only the
// first had its final dot marked (attempt 1); the second is at its second
// attempt with a mark left from the first; the last two were claimed
// ahead and never reached their dot.
func claimedAhead(t *testing.T, storageDir, instance string) (ids []string) {
	t.Helper()
	st := store{s: openStorage(t, storageDir)}
	ctx := context.Background()
	now := time.Now()
	bid := newID(now.Add(-time.Minute))
	seg := &segment{Batch: bid, Owner: instance, Created: now.Add(-time.Minute)}
	bs := BatchState{Batch: bid, Owner: instance, Updated: now}
	for i := range 4 {
		id := MessageID(bid, i)
		ids = append(ids, id)
		to := fmt.Sprintf("ahead%d@example.org", i)
		seg.Messages = append(seg.Messages, storedMessage{ID: id, From: "no-reply@example.com", To: []string{to},
			Data: []byte("Subject: claimed ahead\r\n\r\nmessage " + id + "\r\n")})
		m := State{ID: id, KeyID: "app", Flow: "otp", Profile: "no-reply@example.com", MessageID: "<" + id + "@example.com>",
			Recipients: 1, Status: Sending, Attempts: 1, Created: now.Add(-time.Minute), Updated: now}
		if i == 1 {
			m.Attempts = 2
		}
		init := m
		init.Status, init.Attempts = Queued, 0
		seg.States = append(seg.States, init)
		bs.Messages = append(bs.Messages, m)
	}
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(st.putJSON(ctx, keySeg+bid, seg))
	must(st.putJSON(ctx, KeySt+bid, bs))
	must(st.s.Store(ctx, ownKey(instance, bid), nil))
	must(st.putJSON(ctx, keyInst+instance, heartbeat{Instance: instance, Updated: now.Add(-time.Hour)}))
	// the killed process's record, and an empty one of a process before it
	must(st.putJSON(ctx, dotKey(instance, "killed"), dotRecord{Instance: instance, Updated: now, Marks: map[string]int{ids[0]: 1, ids[1]: 1}}))
	must(st.putJSON(ctx, dotKey(instance, "earlier"), dotRecord{Instance: instance, Updated: now.Add(-time.Hour), Marks: map[string]int{}}))
	return ids
}

// checkClaimedAheadOutcome: only the message whose final dot may have
// reached the server is unknown; the others are delivered once.
func checkClaimedAheadOutcome(t *testing.T, h *Handler, srv *smtptest.Server, ids []string, instance string) {
	t.Helper()
	st := waitState(t, h, ids[0], status(Unknown))
	if st.LastCode != mailer.CodeUncertain || st.LastError != mailer.InterruptedError {
		t.Errorf("in-doubt message %+v", st)
	}
	for _, id := range ids[1:] {
		waitState(t, h, id, status(Sent))
	}
	time.Sleep(200 * time.Millisecond)
	got := map[string]int{}
	for _, m := range srv.Messages() {
		got[m.To[0]]++
	}
	if len(got) != 3 || got["ahead1@example.org"] != 1 || got["ahead2@example.org"] != 1 || got["ahead3@example.org"] != 1 {
		t.Fatalf("delivered %v; want ahead1..3 exactly once and nothing for ahead0", got)
	}
	// the killed process's records are gone once its batches are recovered
	keys, err := h.engine.st.s.List(context.Background(), dotDir(instance), false)
	if err != nil && !IsNotExist(err) {
		t.Fatal(err)
	}
	for _, k := range keys {
		if strings.HasSuffix(k, "/killed") || strings.HasSuffix(k, "/earlier") {
			t.Errorf("dot record %s outlived the recovery", k)
		}
	}
}

func TestRestartRetriesClaimsWhoseDotWasNotSent(t *testing.T) {
	forEachStorage(t, testRestartRetriesClaimsWhoseDotWasNotSent)
}

func testRestartRetriesClaimsWhoseDotWasNotSent(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	iid := instanceID(t, in)
	ids := claimedAhead(t, in.storageDir, iid)
	h := in.handler(withSMTP(t, srv))
	h.engine.Start()
	checkClaimedAheadOutcome(t, h, srv, ids, iid)
}

func TestAdoptionRetriesClaimsWhoseDotWasNotSent(t *testing.T) {
	forEachStorage(t, testAdoptionRetriesClaimsWhoseDotWasNotSent)
}

func testAdoptionRetriesClaimsWhoseDotWasNotSent(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	dead := uuid.NewString()
	ids := claimedAhead(t, shared, dead)
	b := newInstance(t, shared).handler(withSMTP(t, srv), withDelivery(func(d *Delivery) { d.Lease = caddy.Duration(300 * time.Millisecond) }))
	b.engine.Start()
	checkClaimedAheadOutcome(t, b, srv, ids, dead)
	if owned, _ := b.engine.st.ownedBatches(context.Background(), dead); len(owned) != 0 {
		t.Fatalf("the dead instance still owns %v", owned)
	}
}

// TestDotMarkIsDurableBeforeTheDot: when the server has the whole
// message (its final dot included), the attempt's mark is already in
// storage, under this process's record.
func TestDotMarkIsDurableBeforeTheDot(t *testing.T) {
	forEachStorage(t, testDotMarkIsDurableBeforeTheDot)
}

func testDotMarkIsDurableBeforeTheDot(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	h := in.handler(withSMTP(t, srv))
	var mu sync.Mutex
	var seen []map[string]int
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error {
		rec, err := ownDotRecord(h.engine)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			seen = append(seen, nil)
			return nil
		}
		seen = append(seen, rec.Marks)
		return nil
	}})
	ids := []string{sendAsync(t, h, "a@example.org"), sendAsync(t, h, "b@example.org")}
	for _, id := range ids {
		waitState(t, h, id, status(Sent))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 {
		t.Fatalf("%d messages reached the server", len(seen))
	}
	for _, marks := range seen {
		found := 0
		for _, id := range ids {
			if marks[id] == 1 {
				found++
			}
		}
		if found == 0 {
			t.Fatalf("the server had a message whose dot was not marked first: marks %v, ids %v", marks, ids)
		}
	}
}

// TestNoDotWithoutItsMark: when the mark cannot be written the message's
// final dot is never sent (the server sees DATA end without it and
// discards the message); the message is retried and, once storage works,
// delivered exactly once.
func TestNoDotWithoutItsMark(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv, withDelivery(func(d *Delivery) {
		d.RetryBackoff = caddy.Duration(100 * time.Millisecond)
		d.MaxBackoff = caddy.Duration(200 * time.Millisecond)
	}))
	fs.set(func(f *faultyStorage) { f.store = keyDot })
	id := sendAsync(t, h, "marked@example.org")
	st := waitState(t, h, id, func(m State) bool { return m.LastCode == mailer.CodeOutboxUnavailable })
	if st.Status != Queued || !strings.Contains(st.LastError, "nothing was sent") {
		t.Fatalf("after a failed mark: %+v", st)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(srv.Aborted()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := len(srv.Aborted()); n == 0 {
		t.Fatal("the server never saw the aborted DATA")
	}
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("%d messages were completed without their mark", n)
	}
	fs.set(func(f *faultyStorage) { f.store = "" })
	waitState(t, h, id, status(Sent))
	time.Sleep(100 * time.Millisecond)
	if msgs := srv.Messages(); len(msgs) != 1 || msgs[0].To[0] != "marked@example.org" {
		t.Fatalf("delivered %d messages", len(msgs))
	}
}

// TestCaptureMarksBeforeRename: in capture mode the rename is the dot; a
// failed mark leaves no file.
func TestCaptureMarksBeforeRename(t *testing.T) {
	dir := t.TempDir()
	c := &mailer.Capture{Dir: dir}
	boom := errors.New("storage down")
	_, err := c.Send(context.Background(), &mailer.Envelope{ID: "x", Data: []byte("Subject: x\r\n\r\nx\r\n"), BeforeDot: func() error { return boom }})
	var de *mailer.Error
	if !errors.As(err, &de) || de.Code != mailer.CodeOutboxUnavailable || !errors.Is(err, boom) {
		t.Fatalf("error %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("files left: %v", entries)
	}
}

// TestRecoveryRule: which stored states a dot mark puts in doubt. A
// claim is not written before its attempt, so a message whose marked
// attempt was its next one may be stored "queued"; a mark of an attempt
// whose outcome is stored is stale.
func TestRecoveryRule(t *testing.T) {
	marked := dotSet{kept: true, marks: map[dotMark]bool{{"m", 3}: true}}
	cases := []struct {
		name     string
		rule     recoveryRule
		st       State
		want     string
		attempts int
	}{
		{"queued, its next attempt marked", recoveryRule{dots: marked}, State{ID: "m", Status: Queued, Attempts: 2}, Unknown, 3},
		{"sending, this attempt marked", recoveryRule{dots: marked}, State{ID: "m", Status: Sending, Attempts: 3}, Unknown, 3},
		{"queued, the mark is of the attempt it records", recoveryRule{dots: marked}, State{ID: "m", Status: Queued, Attempts: 3}, Queued, 3},
		{"sending, the mark is of an earlier attempt", recoveryRule{dots: marked}, State{ID: "m", Status: Sending, Attempts: 4}, Queued, 4},
		{"sending, no mark", recoveryRule{dots: dotSet{kept: true}}, State{ID: "m", Status: Sending, Attempts: 1}, Queued, 1},
		{"queued, marked, retry_uncertain", recoveryRule{dots: marked, retryUncertain: true}, State{ID: "m", Status: Queued, Attempts: 2}, Queued, 3},
		{"sending, no record at all (an older version)", recoveryRule{}, State{ID: "m", Status: Sending, Attempts: 1}, Unknown, 1},
		{"queued, no record at all", recoveryRule{}, State{ID: "m", Status: Queued, Attempts: 1}, Queued, 1},
		{"sent stays sent", recoveryRule{dots: marked}, State{ID: "m", Status: Sent, Attempts: 3}, Sent, 3},
	}
	for _, c := range cases {
		b, interrupted, _ := rebuildBatch("b", &BatchState{Messages: []State{c.st}}, c.rule, time.Now())
		got := b.entries[0].st
		if got.Status != c.want || got.Attempts != c.attempts {
			t.Errorf("%s: %s with %d attempts, want %s with %d", c.name, got.Status, got.Attempts, c.want, c.attempts)
		}
		if (c.want == Unknown) != (len(interrupted) == 1) {
			t.Errorf("%s: %d interrupted", c.name, len(interrupted))
		}
	}
}

// ownDotRecord reads the engine's own dot records from storage, every
// writer's, and merges their marks.
func ownDotRecord(e *Engine) (dotRecord, error) {
	out := dotRecord{Marks: map[string]int{}}
	for w := range dotWriters {
		b, err := e.st.s.Load(context.Background(), e.dotWriterKey(w))
		if IsNotExist(err) && w > 0 {
			continue
		}
		if err != nil {
			return out, err
		}
		rec, err := parseDotRecord(b)
		if err != nil {
			return out, err
		}
		for id, a := range rec.Marks {
			out.Marks[id] = max(out.Marks[id], a)
		}
	}
	return out, nil
}

// TestDotRecordIsALog: on file storage the record's file grows by one
// synced line per write and is rewritten as one line past dotLogMax; a
// torn last line leaves the line before it as the record, and a file
// nobody can read makes every message its instance was sending in doubt.
func TestDotRecordIsALog(t *testing.T) {
	dir := t.TempDir()
	fs := &certmagic.FileStorage{Path: dir}
	e := New("test", NewLiveStorage(fs), "inst", nil)
	for i := range 3 {
		if err := e.writeDotRecord(0, dotRecord{Instance: "inst", Marks: map[string]int{fmt.Sprint("m", i): 1}}); err != nil {
			t.Fatal(err)
		}
	}
	path := fs.Filename(dotKey("inst", e.nonce))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n != 3 {
		t.Fatalf("%d lines after 3 writes:\n%s", n, b)
	}
	rec, err := ownDotRecord(e)
	if err != nil || len(rec.Marks) != 1 || rec.Marks["m2"] != 1 {
		t.Fatalf("record %+v %v, want the last write's", rec, err)
	}
	// a torn append: the line before it is the record
	if err := os.WriteFile(path, append(b, []byte(`{"instance":"inst","marks":{"m9`)...), 0o600); err != nil {
		t.Fatal(err)
	}
	if rec, err := parseDotRecord(append(b, []byte(`{"instance":"inst","marks":{"m9`)...)); err != nil || rec.Marks["m2"] != 1 {
		t.Fatalf("after a torn line: %+v %v", rec, err)
	}
	// past dotLogMax the file is rewritten as one line
	e.dots.closeLog(0)
	big := map[string]int{}
	for i := range 2000 {
		big[fmt.Sprintf("%028d", i)] = 1
	}
	for range (dotLogMax / 60000) + 2 {
		if err := e.writeDotRecord(0, dotRecord{Instance: "inst", Marks: big}); err != nil {
			t.Fatal(err)
		}
	}
	if info, err := os.Stat(path); err != nil || info.Size() > dotLogMax {
		t.Fatalf("the record file is %d bytes (max %d): %v", info.Size(), dotLogMax, err)
	}
	// unreadable: in doubt like an instance that kept no marks
	if err := os.WriteFile(path, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	other := New("test", NewLiveStorage(fs), "other", nil)
	set, err := other.loadDots(context.Background(), "inst")
	if err != nil || !set.broken {
		t.Fatalf("%+v %v", set, err)
	}
	rule := recoveryRule{dots: set}
	if !rule.inDoubt(State{ID: "x", Status: Sending, Attempts: 1}) || rule.inDoubt(State{ID: "x", Status: Queued}) {
		t.Error("a broken record must leave sending messages in doubt and queued ones not")
	}
}
