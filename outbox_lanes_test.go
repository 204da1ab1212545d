package authmail

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// The ready queue hands out due messages by lane: the auth flows first,
// then /send, then bulk; a lower lane gets bulk_share of the claims
// while higher lanes are served, and everything once they are empty.
func TestReadyQueueLanesAndShare(t *testing.T) {
	now := time.Now()
	var q readyQueue
	n := 0
	add := func(flow, priority string, count int, at time.Time) {
		for range count {
			n++
			q.push(&entry{st: msgState{ID: fmt.Sprintf("m%05d", n), Flow: flow, Priority: priority, NextAt: at}, heapIdx: -1})
		}
	}
	add("send", priorityBulk, 100, now.Add(-time.Hour)) // waiting the longest
	add("send", "", 100, now.Add(-time.Minute))
	add("otp", "", 100, now)
	add("otp", "", 5, now.Add(time.Hour)) // not due
	var order strings.Builder
	for {
		en := q.popDue(now)
		if en == nil {
			break
		}
		order.WriteByte("asb"[en.lane])
	}
	got := order.String()
	if len(got) != 300 || q.Len() != 5 {
		t.Fatalf("%d popped, %d left; want 300 and the 5 not due", len(got), q.Len())
	}
	// 10%: each lower lane gets a tenth of the claims while the codes
	// wait; the bulk lane earns its share too (it waits behind both)
	first := got[:110]
	if a := strings.Count(first, "a"); a < 85 || a > 95 {
		t.Fatalf("%d codes in the first 110 claims, want about 90: %s", a, first)
	}
	if s, b := strings.Count(first, "s"), strings.Count(first, "b"); s < 9 || b < 9 {
		t.Fatalf("/send got %d and bulk %d of the first 110 claims, want their share (10%%): %s", s, b, first)
	}
	if strings.Index(got, "a") != 0 || strings.LastIndex(got, "a") > 125 {
		t.Fatalf("codes are not first: %s", got)
	}
	// once the codes are gone, /send goes ahead of bulk, which keeps 10%
	rest := got[strings.LastIndex(got, "a")+1:]
	if i := strings.LastIndex(rest, "s"); i < 0 || strings.Count(rest[:i], "b") > i/9+2 {
		t.Fatalf("after the codes: %s", rest)
	}

	// a bigger share, and nothing saved up while a lane had nothing due
	q = readyQueue{share: 0.5}
	add("otp", "", 20, now)
	add("send", priorityBulk, 20, now)
	order.Reset()
	for range 9 {
		order.WriteByte("asb"[q.popDue(now).lane])
	}
	if got := order.String(); got != "ababababa" {
		t.Fatalf("bulk_share 50%%: %s, want every other claim bulk", got)
	}
}

// An OTP accepted behind 10,000 queued bulk messages leaves within two
// slots of the server's rate: the workers holding bulk mail give their
// claims back for it, and the paced server gives it the next slot ahead
// of the bulk messages already waiting for one.
func TestOTPOvertakesQueuedBulkMail(t *testing.T) {
	const bulk = 10000
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), withoutLimits, func(h *Handler) {
		h.SMTP.Connections, h.SMTP.Rate = 4, "10/1s"
		h.Keys[0].Allow = []string{"send", "otp", "status"}
	})
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < bulk; i += 16 {
				body := fmt.Sprintf(`{"to":"reader%d@example.org","subject":"Digest","text_body":"Your weekly digest.","priority":"bulk"}`, i)
				if rec, _ := call(t, h, "POST", "/authmail/send", body, "Prefer: respond-async"); rec.Code != 202 {
					errs <- fmt.Sprintf("bulk %d: %d %s", i, rec.Code, rec.Body)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	before := len(srv.Messages())
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 202 {
		t.Fatalf("otp: %d %s", rec.Code, rec.Body)
	}
	st := waitState(t, h, out["id"].(string), status(stSent))
	msgs := srv.Messages()
	at := -1
	for i, m := range msgs {
		if m.To[0] == "jane@example.org" {
			at = i
		}
	}
	if at < 0 {
		t.Fatal("the OTP is sent but the server has no message for it")
	}
	// before: what the server had when the OTP was accepted; one bulk
	// message may already be past its slot then, and one takes the slot
	// in which a worker gives its claims back
	if ahead := at - before; ahead > 2 {
		t.Fatalf("%d bulk messages reached the server between the OTP's acceptance and the OTP, want at most 2 (two slots of the rate)", ahead)
	}
	if st.Attempts != 1 {
		t.Fatalf("OTP state %+v", st)
	}
	rec, out = call(t, h, "GET", "/authmail/status", "")
	if rec.Code != 200 {
		t.Fatalf("status: %d %s", rec.Code, rec.Body)
	}
	lanes, _ := out["queue"].(map[string]any)["queued_by_priority"].(map[string]any)
	if q, _ := lanes["bulk"].(float64); q < bulk-500 || lanes["auth"] != float64(0) {
		t.Fatalf("status queue.queued_by_priority %v, want the bulk mail still queued and no auth mail", lanes)
	}
	t.Logf("%d bulk messages queued; %d reached the server between the OTP's acceptance and the OTP (%d before it)", bulk, at-before, before)
}
