package authmail

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// residentIDs returns which of ids have an entry in memory, and the
// number of parked batches.
func residentIDs(h *Handler, ids []string) (int, int) {
	inv := h.engine.Inventory()
	n := 0
	for _, id := range ids {
		if _, ok := inv.Resident[id]; ok {
			n++
		}
	}
	return n, len(inv.Parked)
}

// fastParking shortens parking for tests: a batch whose next attempt is
// about a second away parks within 300ms and comes back 100ms early.
func fastParking(e *outbox.Engine) {
	e.Tunables().ParkEvery = 10 * time.Millisecond
	e.Tunables().ParkAfter = 300 * time.Millisecond
	e.Tunables().UnparkLead = 100 * time.Millisecond
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
		if st := waitState(t, h, id, status(outbox.Sent)); st.Attempts != 2 {
			t.Errorf("%s: %d attempts, want 2", id, st.Attempts)
		}
	}
	inv := h.engine.Inventory()
	parked, nonFinal := len(inv.Parked), inv.NonFinal
	if parked != 0 || nonFinal != 0 {
		t.Errorf("after delivery: %d batches parked, %d messages not final", parked, nonFinal)
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
	e.Tunables().HookBackoff = 900 * time.Millisecond
	body := fmt.Sprintf(`{"to":"hook@example.org","code":"1","webhook_url":%q}`, recv.srv.URL)
	rec, out := call(t, h, "POST", "/authmail/send/otp", body)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	// the message is sent; its webhook failed once and waits 900ms
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, parked := holds(e, outbox.BatchOf(id)); parked {
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
	st := waitState(t, h, id, func(s outbox.State) bool { return s.Webhook.Status == outbox.HookDelivered })
	if st.Status != outbox.Sent || st.Webhook.Attempts != 2 {
		t.Errorf("state %+v", st)
	}
	// nothing is left to do: the batch retires instead of parking again
	deadline = time.Now().Add(5 * time.Second)
	for {
		resident, parked := holds(e, outbox.BatchOf(id))
		if !resident && !parked && !e.Storage().Exists(context.Background(), outbox.KeySeg+outbox.BatchOf(id)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the batch did not retire (in memory %v, parked %v)", resident, parked)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
