package authmail

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/emersion/go-smtp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// A provider that answers "454 Throttling failure" above 50 messages a
// second gets every message of a burst, each once, without any message
// waiting retry_backoff (an hour here): with `rate 50/1s` the sender stays
// under the limit and is hardly ever throttled; without a rate the
// throttling replies alone slow it down.
func TestThrottledProviderGetsEveryMessage(t *testing.T) {
	const n = 1000
	for _, c := range []struct {
		name, rate   string
		maxThrottled int
	}{
		{"rate 50/1s", "50/1s", 5},
		{"no rate", "", n / 5},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "user", Password: "s3cret-pass",
				Throttle: &smtptest.Throttle{Rate: 50, Burst: 10}})
			throttled := func() int { _, n := srv.ThrottleTotals(); return n }
			h := newInstance(t, "").handler(withSMTP(t, srv), withoutLimits, func(h *Handler) {
				h.SMTP.Connections, h.SMTP.Rate = 4, c.rate
				h.Keys[0].Allow = []string{"otp", "status"}
				h.Delivery = &Delivery{RetryBackoff: caddy.Duration(time.Hour), MaxBackoff: caddy.Duration(time.Hour)}
			})
			start := time.Now()
			ids := make([]string, n)
			for i := range n {
				rec, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("u%d@example.org", i)), "Prefer: respond-async")
				if rec.Code != 202 {
					t.Fatalf("send %d: %d %s", i, rec.Code, rec.Body)
				}
				ids[i] = out["id"].(string)
			}
			deadline := time.Now().Add(120 * time.Second)
			for len(srv.Messages()) < n && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			took := time.Since(start)
			msgs := srv.Messages()
			if len(msgs) != n {
				t.Fatalf("the provider got %d of %d messages in %v (throttled %d times): a throttled message waited retry_backoff", len(msgs), n, took, throttled())
			}
			seen := map[string]bool{}
			for _, m := range msgs {
				if len(m.To) != 1 || seen[m.To[0]] {
					t.Fatalf("message to %v twice or to several", m.To)
				}
				seen[m.To[0]] = true
			}
			for _, id := range ids {
				if st := waitState(t, h, id, status(outbox.Sent)); st.LastCode != "" {
					t.Fatalf("state %+v", st)
				}
			}
			if got := throttled(); got > c.maxThrottled {
				t.Fatalf("throttled %d times, want at most %d", got, c.maxThrottled)
			}
			t.Logf("%d messages in %v (the provider's limit allows them in about %v); throttled %d times", n, took.Round(time.Millisecond), time.Duration(float64(n-10)/50*float64(time.Second)), throttled())

			rec, out := call(t, h, "GET", "/authmail/status", "")
			if rec.Code != 200 {
				t.Fatalf("status: %d %s", rec.Code, rec.Body)
			}
			rate, _ := out["delivery"].(map[string]any)["rate"].(map[string]any)
			want := "off"
			if c.rate != "" {
				want = c.rate
			}
			if rate["configured"] != want || (c.rate == "" && (rate["throttles"].(float64) == 0 || rate["decreases"].(float64) == 0)) {
				t.Fatalf("status delivery.rate %v", rate)
			}
		})
	}
}

// A used-up daily quota, even when the provider says so with a 5xx,
// keeps the message queued until the pause ends: it is neither bounced
// nor retried after retry_backoff, and nothing else is sent to the
// server meanwhile.
func TestQuotaReplyPausesTheServer(t *testing.T) {
	for _, c := range []struct {
		name  string
		reply *smtp.SMTPError
	}{
		{"ses 454", &smtp.SMTPError{Code: 454, Message: "Throttling failure: Daily message quota exceeded."}},
		{"gmail 550", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 4, 5}, Message: "Daily user sending limit exceeded."}},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := authServer(t, smtptest.StartTLS)
			var mails atomic.Int32
			srv.SetHooks(smtptest.Hooks{Mail: func(string) error { mails.Add(1); return c.reply }})
			h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
				h.Delivery = &Delivery{RetryBackoff: caddy.Duration(40 * time.Millisecond), MaxBackoff: caddy.Duration(160 * time.Millisecond)}
			})
			core, logs := observer.New(zap.DebugLevel)
			h.engine.SetLogger(zap.New(core))
			before := time.Now()
			// a code valid for longer than the pause (one that expires
			// sooner is made expired at its expiry instead)
			rec, out := call(t, h, "POST", "/authmail/send/otp", `{"to":"jane@example.org","code":"123456","expires_in_minutes":30}`)
			if rec.Code != 202 || out["status"] != "queued" || out["error_code"] != "smtp_throttled" {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			st := waitState(t, h, out["id"].(string), func(st outbox.State) bool { return st.Status == outbox.Queued && st.Attempts == 1 })
			if st.NextAt.Sub(before) < 14*time.Minute || st.LastCode != "smtp_throttled" {
				t.Fatalf("next attempt %v after the send, state %+v; want the 15-minute quota pause", st.NextAt.Sub(before), st)
			}
			// a second message waits for the same pause without a session;
			// its code expires in 10 minutes, so it waits until then, to be
			// made expired
			rec, out = call(t, h, "POST", "/authmail/send/otp", otp("joe@example.org"))
			if rec.Code != 202 || out["error_code"] != "smtp_throttled" {
				t.Fatalf("second send: %d %s", rec.Code, rec.Body)
			}
			if st := waitState(t, h, out["id"].(string), func(st outbox.State) bool { return st.Status == outbox.Queued }); !st.NextAt.Equal(st.ExpiresAt) || st.Attempts != 0 {
				t.Fatalf("second message %+v, want it queued until its expiry, without an attempt", st)
			}
			// held back by the pause with nothing sent: a debug line, not
			// the warning of a failed attempt
			second := out["id"].(string)
			var held, warned int
			for _, e := range logs.All() {
				if e.ContextMap()["id"] != second {
					continue
				}
				switch e.Message {
				case "waiting for the SMTP server's sending rate":
					if e.Level == zap.DebugLevel {
						held++
					}
				case "delivery attempt failed; will retry":
					warned++
				}
			}
			if held == 0 || warned != 0 {
				t.Fatalf("the second message logged %d debug waits and %d failed attempts; want the wait at debug only", held, warned)
			}
			time.Sleep(300 * time.Millisecond)
			if n := mails.Load(); n != 1 {
				t.Fatalf("the server saw %d MAIL commands, want 1: nothing is sent during the pause", n)
			}
		})
	}
}
