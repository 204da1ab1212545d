package authmail

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// residentIDs returns which of ids have an entry in memory, and the
// number of parked batches.
func residentIDs(h *Handler, ids []string) (int, int) {
	h.engine.mu.Lock()
	defer h.engine.mu.Unlock()
	n := 0
	for _, id := range ids {
		if h.engine.entries[id] != nil {
			n++
		}
	}
	return n, len(h.engine.parked)
}

// fastParking shortens parking for tests: a batch whose next attempt is
// about a second away parks within 300ms and comes back 100ms early.
func fastParking(e *Engine) {
	e.tun.parkEvery = 10 * time.Millisecond
	e.tun.parkAfter = 300 * time.Millisecond
	e.tun.unparkLead = 100 * time.Millisecond
}

// mailGate is what refuseMail installs: the switch, and how many MAIL
// commands (SMTP transactions begun) the server saw.
type mailGate struct {
	refuse atomic.Bool
	mails  atomic.Int32
}

// refuseMail makes srv defer every message (451 to MAIL FROM) while the
// gate's refuse flag is set; it starts set.
func refuseMail(srv *smtptest.Server) *mailGate {
	g := &mailGate{}
	g.refuse.Store(true)
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		g.mails.Add(1)
		if g.refuse.Load() {
			return smtpRefusal(451)
		}
		return nil
	}})
	return g
}

// fixedBackoff sets retry_backoff and max_backoff to d: every retry
// comes d after the previous attempt (give or take the jitter).
func fixedBackoff(d time.Duration) func(*Handler) {
	return withDelivery(func(dl *Delivery) {
		dl.RetryBackoff, dl.MaxBackoff = caddy.Duration(d), caddy.Duration(d)
	})
}

// waitParked waits until none of ids is held in memory and at least one
// batch is parked, and returns the number of parked batches.
func waitParked(t *testing.T, h *Handler, ids []string) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resident, parked := residentIDs(h, ids)
		if resident == 0 && parked > 0 {
			return parked
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d messages still in memory, %d batches parked", resident, len(ids), parked)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestOutboxParksDeferredBatchesAndDeliversThemLater(t *testing.T) {
	forEachStorage(t, testOutboxParksDeferredBatchesAndDeliversThemLater)
}

func testOutboxParksDeferredBatchesAndDeliversThemLater(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), fixedBackoff(900*time.Millisecond))
	fastParking(h.engine)
	gate := refuseMail(srv)
	var ids []string
	for i := range 20 {
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("p%d@example.org", i)), "Prefer: respond-async")
		if rec.Code != 202 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		ids = append(ids, out["id"].(string))
	}
	// every message had its deferred first attempt; with the next one
	// 900ms away, its batch leaves memory
	waitParked(t, h, ids)
	// parked messages still count, and their status is read from storage
	if depth, age := h.engine.QueueStats(); depth != len(ids) || age <= 0 {
		t.Errorf("queue stats with parked batches: depth %d, oldest age %v", depth, age)
	}
	if inMemory, parked := h.engine.Residency(); inMemory != 0 || parked == 0 {
		t.Errorf("residency with every batch parked: %d messages in memory, %d batches parked", inMemory, parked)
	}
	rec, out := call(t, h, "GET", "/authmail/messages/"+ids[0], "")
	if rec.Code != 200 || out["status"] != "queued" || out["attempts"] != 1.0 || out["last_error_code"] != "smtp_transient" {
		t.Fatalf("status of a parked message: %d %s", rec.Code, rec.Body)
	}
	// the server recovers: the batches come back before they are due and
	// every message goes out exactly once, on its second attempt
	gate.refuse.Store(false)
	msgs := srv.WaitMessages(len(ids), 10*time.Second)
	time.Sleep(300 * time.Millisecond)
	seen := map[string]int{}
	for _, m := range srv.Messages() {
		seen[m.To[0]]++
	}
	if len(msgs) != len(ids) || len(seen) != len(ids) {
		t.Fatalf("delivered %d messages to %d recipients, want %d each once", len(srv.Messages()), len(seen), len(ids))
	}
	for _, id := range ids {
		if st := waitState(t, h, id, status(Sent)); st.Attempts != 2 {
			t.Errorf("%s: %d attempts, want 2", id, st.Attempts)
		}
	}
	h.engine.mu.Lock()
	parked, nonFinal := len(h.engine.parked), h.engine.nonFinal
	h.engine.mu.Unlock()
	if parked != 0 || nonFinal != 0 {
		t.Errorf("after delivery: %d batches parked, %d messages not final", parked, nonFinal)
	}
}

func TestOutboxUnparksNoMoreThanWorkersCanTake(t *testing.T) {
	forEachStorage(t, testOutboxUnparksNoMoreThanWorkersCanTake)
}

func testOutboxUnparksNoMoreThanWorkersCanTake(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), fixedBackoff(time.Hour))
	e := h.engine
	e.tun.parkEvery = time.Hour // parking is driven by the test
	e.tun.readyHigh = 2
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error { return smtpRefusal(451) }})
	var ids []string
	for i := range 3 {
		// one request at a time: three batches of one message
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("w%d@example.org", i)), "Prefer: wait=2")
		if rec.Code != 202 || out["error_code"] != "smtp_transient" {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		ids = append(ids, out["id"].(string))
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

func TestOutboxParksBatchesWaitingForAWebhookRetry(t *testing.T) {
	forEachStorage(t, testOutboxParksBatchesWaitingForAWebhookRetry)
}

func testOutboxParksBatchesWaitingForAWebhookRetry(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(n int) int {
		if n == 1 {
			return 503
		}
		return 200
	})
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "configured-webhook-secret"
	})
	e := h.engine
	fastParking(e)
	e.tun.hookBackoff = 900 * time.Millisecond
	body := fmt.Sprintf(`{"to":"hook@example.org","code":"1","webhook_url":%q}`, recv.srv.URL)
	rec, out := call(t, h, "POST", "/authmail/send/otp", body)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	// the message is sent; its webhook failed once and waits 900ms
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, parked := holds(e, BatchOf(id)); parked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a batch waiting only for a webhook retry was not parked")
		}
		time.Sleep(5 * time.Millisecond)
	}
	calls := recv.wait(t, 2)
	if len(calls) != 2 {
		t.Fatalf("%d webhook calls, want 2 (503, then 200 after the batch came back)", len(calls))
	}
	st := waitState(t, h, id, func(s State) bool { return s.Webhook.Status == hookDelivered })
	if st.Status != Sent || st.Webhook.Attempts != 2 {
		t.Errorf("state %+v", st)
	}
	// nothing is left to do: the batch retires instead of parking again
	deadline = time.Now().Add(5 * time.Second)
	for {
		resident, parked := holds(e, BatchOf(id))
		if !resident && !parked && !e.st.s.Exists(context.Background(), keySeg+BatchOf(id)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the batch did not retire (in memory %v, parked %v)", resident, parked)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOutboxParkedBatchesSurviveARestart(t *testing.T) {
	forEachStorage(t, testOutboxParkedBatchesSurviveARestart)
}

func testOutboxParkedBatchesSurviveARestart(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	defer1h := fixedBackoff(time.Hour)
	h := in.handler(withSMTP(t, srv), defer1h)
	e := h.engine
	e.tun.parkEvery = 10 * time.Millisecond
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error { return smtpRefusal(451) }})
	var ids []string
	for i := range 5 {
		_, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("r%d@example.org", i)), "Prefer: wait=2")
		ids = append(ids, out["id"].(string))
	}
	waitParked(t, h, ids)
	_ = h.Cleanup()
	select {
	case <-e.doneCh:
	case <-time.After(15 * time.Second):
		t.Fatal("the engine did not stop")
	}
	// the next start finds them in storage, still due in an hour, and
	// keeps them parked: they are not loaded into memory
	srv.SetHooks(smtptest.Hooks{})
	h2 := in.handler(withSMTP(t, srv))
	h2.engine.tun.parkEvery = time.Hour // only recovery parks here
	h2.engine.Start()
	if depth, _ := h2.engine.QueueStats(); depth != len(ids) {
		t.Fatalf("queue depth %d after the restart, want %d", depth, len(ids))
	}
	if resident, parked := residentIDs(h2, ids); resident != 0 || parked == 0 {
		t.Fatalf("after the restart: %d of %d messages in memory, %d batches parked; want all parked", resident, len(ids), parked)
	}
	for _, id := range ids {
		rec, out := call(t, h2, "GET", "/authmail/messages/"+id, "")
		if rec.Code != 200 || out["status"] != "queued" || out["attempts"] != 1.0 {
			t.Fatalf("%s after the restart: %d %s", id, rec.Code, rec.Body)
		}
	}
	// make them due now: load them back, then move the stored next
	// attempt, an hour away, to now
	h2.engine.tun.unparkLead = 2 * time.Hour
	if n := h2.engine.unparkDue(time.Now()); n == 0 {
		t.Fatal("no parked batch was loaded back")
	}
	if resident, _ := residentIDs(h2, ids); resident != len(ids) {
		t.Fatalf("%d of %d messages back in memory", resident, len(ids))
	}
	h2.engine.mu.Lock()
	h2.engine.ready.each(func(en *Entry) { en.st.NextAt = time.Now() })
	h2.engine.ready.reinit()
	h2.engine.mu.Unlock()
	h2.engine.notify()
	msgs := srv.WaitMessages(len(ids), 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	if len(msgs) != len(ids) || len(srv.Messages()) != len(ids) {
		t.Fatalf("%d messages delivered after the restart, want %d once each", len(srv.Messages()), len(ids))
	}
	for _, id := range ids {
		if st := waitState(t, h2, id, status(Sent)); st.Attempts != 2 {
			t.Errorf("%s: %d attempts, want 2", id, st.Attempts)
		}
	}
}

// TestParkedBatchLosesItsFinalBodies: a batch whose messages reached
// different ends (one refused for good, one deferred for an hour) keeps
// its segment while the deferred one retries; the refused message's body
// and recipients are erased from it when the batch parks, and the
// deferred message's stay, so its retry still sends it.
func TestParkedBatchLosesItsFinalBodies(t *testing.T) {
	forEachStorage(t, testParkedBatchLosesItsFinalBodies)
}

func testParkedBatchLosesItsFinalBodies(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), fixedBackoff(time.Hour))
	e := h.engine
	e.tun.parkEvery = time.Hour // parking is driven by the test
	var deferNotice atomic.Bool
	deferNotice.Store(true)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(to string) error {
		if to == "new@example.org" {
			return smtpRefusal(550)
		}
		if deferNotice.Load() {
			return smtpRefusal(451)
		}
		return nil
	}})
	// one request, two messages, one batch: the confirmation to the new
	// address and the notice to the old one
	rec, out := call(t, h, "POST", "/authmail/send/email-change", `{"to":"new@example.org","old_email":"old@example.org","token":"SECRET-TOKEN-1"}`)
	if rec.Code != 502 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	failedID := out["id"].(string)
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
	seg, err := e.st.loadSegment(context.Background(), bid)
	if err != nil {
		t.Fatal(err)
	}
	if len(seg.Messages) != 2 {
		t.Fatalf("%d messages in the segment", len(seg.Messages))
	}
	for _, m := range seg.Messages {
		switch {
		case m.ID == failedID && (m.Data != nil || m.To != nil || m.From != ""):
			t.Errorf("the failed message's body or envelope is still stored: %d bytes, to %v", len(m.Data), m.To)
		case m.ID != failedID && (!bytes.Contains(m.Data, []byte("old@example.org")) || len(m.To) != 1):
			t.Errorf("the deferred message lost its body or envelope")
		}
	}
	// the deferred message still goes out from the erased segment
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
	if got := srv.WaitMessages(1, 5*time.Second); len(got) != 1 || got[0].To[0] != "old@example.org" {
		t.Fatalf("after the erasure the deferred notice was not sent: %d messages", len(got))
	}
}
