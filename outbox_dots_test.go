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
	"github.com/google/uuid"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
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
	bid := outbox.NewID(now.Add(-time.Minute))
	seg := &outbox.Segment{Batch: bid, Owner: instance, Created: now.Add(-time.Minute)}
	bs := outbox.BatchState{Batch: bid, Owner: instance, Updated: now}
	for i := range 4 {
		id := outbox.MessageID(bid, i)
		ids = append(ids, id)
		to := fmt.Sprintf("ahead%d@example.org", i)
		seg.Messages = append(seg.Messages, outbox.StoredMessage{ID: id, From: "no-reply@example.com", To: []string{to},
			Data: []byte("Subject: claimed ahead\r\n\r\nmessage " + id + "\r\n")})
		m := outbox.State{ID: id, KeyID: "app", Flow: "otp", Profile: "no-reply@example.com", MessageID: "<" + id + "@example.com>",
			Recipients: 1, Status: outbox.Sending, Attempts: 1, Created: now.Add(-time.Minute), Updated: now}
		if i == 1 {
			m.Attempts = 2
		}
		init := m
		init.Status, init.Attempts = outbox.Queued, 0
		seg.States = append(seg.States, init)
		bs.Messages = append(bs.Messages, m)
	}
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(st.putJSON(ctx, outbox.KeySeg+bid, seg))
	must(st.putJSON(ctx, outbox.KeySt+bid, bs))
	must(st.s.Store(ctx, outbox.OwnKey(instance, bid), nil))
	must(st.putJSON(ctx, outbox.KeyInst+instance, outbox.Heartbeat{Instance: instance, Updated: now.Add(-time.Hour)}))
	// the killed process's record, and an empty one of a process before it
	must(st.putJSON(ctx, outbox.DotKey(instance, "killed"), outbox.DotRecord{Instance: instance, Updated: now, Marks: map[string]int{ids[0]: 1, ids[1]: 1}}))
	must(st.putJSON(ctx, outbox.DotKey(instance, "earlier"), outbox.DotRecord{Instance: instance, Updated: now.Add(-time.Hour), Marks: map[string]int{}}))
	return ids
}

// checkClaimedAheadOutcome: only the message whose final dot may have
// reached the server is unknown; the others are delivered once.
func checkClaimedAheadOutcome(t *testing.T, h *Handler, srv *smtptest.Server, ids []string, instance string) {
	t.Helper()
	st := waitState(t, h, ids[0], status(outbox.Unknown))
	if st.LastCode != mailer.CodeUncertain || st.LastError != mailer.InterruptedError {
		t.Errorf("in-doubt message %+v", st)
	}
	for _, id := range ids[1:] {
		waitState(t, h, id, status(outbox.Sent))
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
	keys, err := h.engine.Storage().List(context.Background(), outbox.DotDir(instance), false)
	if err != nil && !outbox.IsNotExist(err) {
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
	h.shared.Start()
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
	b.shared.Start()
	checkClaimedAheadOutcome(t, b, srv, ids, dead)
	if owned, _ := b.shared.st.ownedBatches(context.Background(), dead); len(owned) != 0 {
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
		rec, err := h.engine.OwnDots()
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
		waitState(t, h, id, status(outbox.Sent))
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
	fs.set(func(f *faultyStorage) { f.store = outbox.KeyDot })
	id := sendAsync(t, h, "marked@example.org")
	st := waitState(t, h, id, func(m outbox.State) bool { return m.LastCode == mailer.CodeOutboxUnavailable })
	if st.Status != outbox.Queued || !strings.Contains(st.LastError, "nothing was sent") {
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
	waitState(t, h, id, status(outbox.Sent))
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
