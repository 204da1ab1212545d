package outbox

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/redistest"
)

func TestOutboxUnparksNoMoreThanWorkersCanTake(t *testing.T) {
	redistest.ForEachStorage(t, testOutboxUnparksNoMoreThanWorkersCanTake)
}

func TestOutboxParkedBatchesSurviveARestart(t *testing.T) {
	redistest.ForEachStorage(t, testOutboxParkedBatchesSurviveARestart)
}

// TestParkedBatchLosesItsFinalBodies: a batch whose messages reached
// different ends (one refused for good, one deferred for an hour) keeps
// its Segment while the deferred one retries; the refused message's body
// and recipients are erased from it when the batch parks, and the
// deferred message's stay, so its retry still sends it.
func TestParkedBatchLosesItsFinalBodies(t *testing.T) {
	redistest.ForEachStorage(t, testParkedBatchLosesItsFinalBodies)
}

func testOutboxUnparksNoMoreThanWorkersCanTake(t *testing.T, newStorage func() certmagic.Storage) {
	tr := newFake()
	tr.outcome = func(*mailer.Envelope, int) error { return transient() }
	e := newEngine(t, newStorage(), "inst", tr, hourBackoff())
	e.Tunables().ParkEvery = time.Hour // parking is driven by the test
	e.Tunables().ReadyHigh = 2
	e.Start()
	var ids []string
	for i := range 3 {
		// three batches of one message, each with its failed attempt
		id := accept(t, e, fmt.Sprintf("w%d@example.org", i))[0]
		waitAttempted(t, e, id, 1)
		ids = append(ids, id)
	}
	parked := 0
	for deadline := time.Now().Add(5 * time.Second); parked < 3; {
		parked += e.parkIdle(time.Now())
		if time.Now().After(deadline) {
			t.Fatalf("%d of 3 batches parked", parked)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// all three are due (two hours from now); only two fit
	later := time.Now().Add(2 * time.Hour)
	if n := e.unparkDue(later); n != 2 {
		t.Fatalf("loaded %d batches back, want 2", n)
	}
	if n := e.unparkDue(later); n != 0 {
		t.Fatalf("loaded %d more batches with the ready queue full, want 0", n)
	}
	e.mu.Lock()
	ready, still := e.ready.Len(), len(e.parked)
	e.mu.Unlock()
	if ready != 2 || still != 1 {
		t.Fatalf("%d messages ready, %d batches parked; want 2 and 1", ready, still)
	}
	if depth, _ := e.QueueStats(); depth != 3 {
		t.Errorf("queue depth %d, want 3", depth)
	}
	// every message kept its state, loaded back or still parked
	for _, id := range ids {
		st, ok, err := e.Lookup(context.Background(), id)
		if err != nil || !ok || st.Status != Queued || st.Attempts != 1 || st.LastCode != "smtp_transient" {
			t.Errorf("%s: %+v %v %v", id, st, ok, err)
		}
	}
}

func testOutboxParkedBatchesSurviveARestart(t *testing.T, newStorage func() certmagic.Storage) {
	tr := newFake()
	tr.outcome = func(*mailer.Envelope, int) error { return transient() }
	e := newEngine(t, newStorage(), "inst", tr, hourBackoff())
	e.Tunables().ParkEvery = 10 * time.Millisecond
	e.Start()
	var ids []string
	for i := range 5 {
		id := accept(t, e, fmt.Sprintf("r%d@example.org", i))[0]
		waitAttempted(t, e, id, 1)
		ids = append(ids, id)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if resident, _ := residentIDs(e, ids); resident == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the deferred batches never parked")
		}
	}
	e.Shutdown()
	select {
	case <-e.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the engine did not stop")
	}
	// the next start finds them in storage, still due in an hour, and
	// keeps them parked: they are not loaded into memory
	tr2 := newFake()
	e2 := newEngine(t, newStorage(), "inst", tr2, hourBackoff())
	e2.Tunables().ParkEvery = time.Hour // only recovery parks here
	e2.Start()
	if depth, _ := e2.QueueStats(); depth != len(ids) {
		t.Fatalf("queue depth %d after the restart, want %d", depth, len(ids))
	}
	if resident, parked := residentIDs(e2, ids); resident != 0 || parked == 0 {
		t.Fatalf("after the restart: %d of %d messages in memory, %d batches parked; want all parked", resident, len(ids), parked)
	}
	for _, id := range ids {
		if st, ok, err := e2.Lookup(context.Background(), id); err != nil || !ok || st.Status != Queued || st.Attempts != 1 {
			t.Fatalf("%s after the restart: %+v %v %v", id, st, ok, err)
		}
	}
	// make them due now: load them back, then move the stored next
	// attempt, an hour away, to now
	e2.Tunables().UnparkLead = 2 * time.Hour
	if n := e2.unparkDue(time.Now()); n == 0 {
		t.Fatal("no parked batch was loaded back")
	}
	if resident, _ := residentIDs(e2, ids); resident != len(ids) {
		t.Fatalf("%d of %d messages back in memory", resident, len(ids))
	}
	e2.mu.Lock()
	e2.ready.each(func(en *Entry) { en.st.NextAt = time.Now() })
	e2.ready.reinit()
	e2.mu.Unlock()
	e2.notify()
	for _, id := range ids {
		if st := waitStatus(t, e2, id, Sent, 10*time.Second); st.Attempts != 2 {
			t.Errorf("%s: %d attempts, want 2", id, st.Attempts)
		}
	}
	time.Sleep(200 * time.Millisecond)
	for _, id := range ids {
		if n := tr2.deliveries(id); n != 1 {
			t.Errorf("%s delivered %d times after the restart, want once", id, n)
		}
	}
}

func testParkedBatchLosesItsFinalBodies(t *testing.T, newStorage func() certmagic.Storage) {
	var deferNotice atomic.Bool
	deferNotice.Store(true)
	tr := newFake()
	tr.outcome = func(env *mailer.Envelope, _ int) error {
		if env.To[0] == "new@example.org" {
			return &mailer.Error{Code: mailer.CodeRecipientRefused, Phase: mailer.PhaseRcpt, Refused: 1, Recipients: 1,
				Reply: &mailer.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}}
		}
		if deferNotice.Load() {
			return transient()
		}
		return nil
	}
	e := newEngine(t, newStorage(), "inst", tr, hourBackoff())
	e.Tunables().ParkEvery = time.Hour // parking is driven by the test
	e.Start()
	// one request, two messages, one batch: the confirmation to the new
	// address and the notice to the old one
	ids := accept(t, e, "new@example.org", "old@example.org")
	failedID := ids[0]
	waitStatus(t, e, failedID, Failed, 5*time.Second)
	waitAttempted(t, e, ids[1], 1)
	bid := BatchOf(failedID)
	for deadline := time.Now().Add(5 * time.Second); e.parkIdle(time.Now().Add(time.Minute)) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the batch never parked")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// the erasure runs in the background; the batch stays parked meanwhile
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		e.mu.Lock()
		erasing := e.parked[bid] != nil && e.parked[bid].erasing
		e.mu.Unlock()
		if !erasing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the erasure never finished")
		}
	}
	seg, err := store{s: e.Storage()}.loadSegment(context.Background(), bid)
	if err != nil {
		t.Fatal(err)
	}
	if len(seg.Messages) != 2 {
		t.Fatalf("%d messages in the Segment", len(seg.Messages))
	}
	for _, m := range seg.Messages {
		switch {
		case m.ID == failedID && (m.Data != nil || m.To != nil || m.From != ""):
			t.Errorf("the failed message's body or envelope is still stored: %d bytes, to %v", len(m.Data), m.To)
		case m.ID != failedID && (len(m.Data) == 0 || len(m.To) != 1):
			t.Errorf("the deferred message lost its body or envelope")
		}
	}
	// the deferred message still goes out from the erased Segment
	deferNotice.Store(false)
	if n := e.unparkDue(time.Now().Add(2 * time.Hour)); n != 1 {
		t.Fatalf("loaded %d batches back", n)
	}
	e.mu.Lock()
	for _, en := range e.batches[bid].entries {
		en.st.NextAt = time.Now()
		if en.heapIdx >= 0 {
			e.ready.fix(en)
		}
	}
	e.mu.Unlock()
	e.notify()
	waitStatus(t, e, ids[1], Sent, 5*time.Second)
	if tr.deliveries(ids[1]) != 1 || tr.deliveries(failedID) != 0 {
		t.Fatalf("after the erasure: the notice delivered %d times, the refused message %d", tr.deliveries(ids[1]), tr.deliveries(failedID))
	}
}
