package authmail

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/emersion/go-smtp"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

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
	st := waitState(t, h, out["id"].(string), status(outbox.Sent))
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

// An OTP with expires_in_minutes 1, queued behind an SMTP outage of two
// minutes, is never sent: when its code expires it is made expired, its
// webhook says so, and after the outage only the mail that is still
// worth sending arrives.
func TestCodeExpiredInTheQueueIsNotSent(t *testing.T) {
	fastWebhooks(t)
	srv := authServer(t, smtptest.StartTLS)
	var down atomic.Bool
	down.Store(true)
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		if down.Load() {
			return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Service not available, try again later"}
		}
		return nil
	}})
	recv := newHookReceiver(t, func(int) int { return 204 })
	t.Setenv("AUTHMAIL_UNIT_HOOK_SECRET", "configured-secret")
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "{env.AUTHMAIL_UNIT_HOOK_SECRET}"
		h.Delivery = &Delivery{RetryBackoff: caddy.Duration(2 * time.Second), MaxBackoff: caddy.Duration(10 * time.Second)}
	})
	hook := fmt.Sprintf(`,"webhook_url":%q`, recv.srv.URL+"/hook")
	outageEnds := time.Now().Add(2 * time.Minute)
	send := func(path, body string) string {
		t.Helper()
		rec, out := call(t, h, "POST", path, body, "Prefer: respond-async")
		if rec.Code != 202 {
			t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
		}
		return out["id"].(string)
	}
	short := send("/authmail/send/otp", `{"to":"jane@example.org","code":"482915","expires_in_minutes":1`+hook+`}`)
	long := send("/authmail/send/otp", `{"to":"joe@example.org","code":"517302","expires_in_minutes":10}`)
	plain := send("/authmail/send", `{"to":"ann@example.org","subject":"Receipt","text_body":"Paid."}`)

	st := waitStateWithin(t, h, short, 75*time.Second, status(outbox.Expired))
	if st.LastCode != mailer.CodeExpired || st.Attempts < 1 || !strings.Contains(st.SMTPResponse, "421 4.3.0") ||
		st.ExpiresAt.Sub(st.Created) != time.Minute || time.Since(st.ExpiresAt) > 5*time.Second || !st.SentAt.IsZero() {
		t.Fatalf("expired state %+v", st)
	}
	calls := recv.wait(t, 1)
	if len(calls) != 1 {
		t.Fatalf("%d webhook calls, want the expired one", len(calls))
	}
	var p map[string]any
	if err := json.Unmarshal(calls[0].body, &p); err != nil {
		t.Fatal(err)
	}
	if p["id"] != short || p["status"] != "expired" || p["error_code"] != "expired_in_queue" || p["sent_at"] != nil {
		t.Fatalf("webhook payload %s", calls[0].body)
	}
	rec, out := call(t, h, "GET", "/authmail/messages/"+short, "")
	if rec.Code != 200 || out["status"] != "expired" || out["last_error_code"] != "expired_in_queue" || out["expires_at"] == nil || out["next_attempt_at"] != nil {
		t.Fatalf("status: %d %s", rec.Code, rec.Body)
	}
	if strings.Contains(rec.Body.String(), "482915") {
		t.Fatal("the status holds the code")
	}

	time.Sleep(time.Until(outageEnds))
	down.Store(false)
	waitStateWithin(t, h, long, 30*time.Second, status(outbox.Sent))
	waitStateWithin(t, h, plain, 30*time.Second, status(outbox.Sent))
	for _, m := range srv.Messages() {
		if m.To[0] == "jane@example.org" {
			t.Fatal("the expired code was sent")
		}
	}
	if n := len(srv.Messages()); n != 2 {
		t.Fatalf("the server got %d messages, want the two still worth sending", n)
	}
	// an expired message is final: a retry is refused
	rec, _ = call(t, h, "POST", "/authmail/messages/"+short+"/retry", "")
	if rec.Code < 400 {
		t.Fatalf("retry of an expired code: %d %s", rec.Code, rec.Body)
	}
}

// waitStateWithin is waitState with its own deadline.
func waitStateWithin(t testing.TB, h *Handler, id string, d time.Duration, cond func(outbox.State) bool) outbox.State {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, ok, err := h.engine.Lookup(context.Background(), id)
		if err == nil && ok && cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s: state %+v (found %v, %v) never matched", id, st, ok, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// "priority" takes "normal" or "bulk"; anything else is refused with
// the field named and nothing queued. bulk_share outside 1–50% refuses
// the config.
func TestPriorityAndBulkShareAreChecked(t *testing.T) {
	h := newInstance(t, "").handler()
	for _, p := range []string{`"urgent"`, `"BULK"`, `1`, `""`} {
		body := `{"to":"jane@example.org","subject":"Hi","text_body":"x","priority":` + p + `}`
		rec, out := call(t, h, "POST", "/authmail/send", body)
		if p == `""` {
			if rec.Code != 200 {
				t.Fatalf("priority %s: %d %s", p, rec.Code, rec.Body)
			}
			continue
		}
		if rec.Code != 422 && rec.Code != 400 || out["field"] != "priority" {
			t.Fatalf("priority %s: %d %s", p, rec.Code, rec.Body)
		}
	}
	for _, p := range []string{"normal", "bulk"} {
		rec, out := call(t, h, "POST", "/authmail/send", `{"to":"jane@example.org","subject":"Hi","text_body":"x","priority":"`+p+`"}`)
		if rec.Code != 200 {
			t.Fatalf("priority %s: %d %s", p, rec.Code, rec.Body)
		}
		st := waitState(t, h, out["id"].(string), status(outbox.Sent))
		if want := map[string]string{"normal": "", "bulk": "bulk"}[p]; st.Priority != want {
			t.Fatalf("priority %s stored as %q", p, st.Priority)
		}
	}
	for _, share := range []int{-1, 51} {
		hh := &Handler{Capture: t.TempDir(), From: "no-reply@example.com", Keys: []Key{{ID: "app", Secret: unitKey}},
			Delivery: &Delivery{BulkShare: share}}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		err := hh.Provision(ctx)
		if err == nil {
			err = hh.Validate()
		}
		cancel()
		if err == nil || !strings.Contains(err.Error(), "bulk_share must be between 1 and 50") {
			t.Fatalf("bulk_share %d: %v", share, err)
		}
	}
}
