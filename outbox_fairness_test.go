package authmail

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// unitKeyB is the secret of the second key of twoKeys.
const unitKeyB = "fedcba9876543210fedcba98"

// twoKeys gives a test handler a second key, "b", beside the unit key
// (renamed "a"), both without a rate limit; callB sends as b.
func twoKeys(t testing.TB) func(*Handler) {
	t.Setenv("AUTHMAIL_UNIT_KEY_B", unitKeyB)
	return func(h *Handler) {
		h.RecipientRate = map[string]string{"default": "off"}
		h.Keys = []Key{{ID: "a", Secret: "{env.AUTHMAIL_UNIT_KEY}", Rate: "off"}, {ID: "b", Secret: "{env.AUTHMAIL_UNIT_KEY_B}", Rate: "off"}}
	}
}

// asB is the header that makes call send as key b.
const asB = "Authorization: Bearer " + unitKeyB

// One key's flood does not hold back another key's code at a paced
// server. Key a queues 2,000 codes and 2,000 bulk messages; the server
// takes 50 a second, so a's backlog would take 80 s to leave. Key b
// then sends one code: it reaches the server after at most
//   - the attempts in progress or begun when it was accepted, one per
//     worker (two, with one connection; a worker's first claim of a group
//     is not given back),
//   - one of a's codes whose turn came as b's was being queued (a worker
//     that claimed just before b's code was in the queue),
//   - one of a's bulk messages: the bulk lane's bulk_share of the claims,
//
// so five, counted in the server's own order, however many a queued
// (without turns it was all of them). One connection, so that the
// server's order is the order in which the outbox began the attempts:
// over several, messages that wait for the pacer's next slot race for
// it, fair only on average.
func TestOneKeysCodesDoNotStarveAnothersAtAPacedServer(t *testing.T) {
	const flood = 2000
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), twoKeys(t), func(h *Handler) {
		h.SMTP.Connections, h.SMTP.Rate = 1, "50/1s"
	})
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < flood; i += 16 {
				if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("user%d@example.org", i)), "Prefer: respond-async"); rec.Code != 202 {
					errs <- fmt.Sprintf("code %d: %d %s", i, rec.Code, rec.Body)
					return
				}
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
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async", asB)
	if rec.Code != 202 {
		t.Fatalf("b's code: %d %s", rec.Code, rec.Body)
	}
	// counted from the answer: until the code is durable it is not queued
	before := len(srv.Messages())
	st := waitStateWithin(t, h, out["id"].(string), time.Minute, status(outbox.Sent))
	if st.KeyID != "b" || st.Attempts != 1 {
		t.Fatalf("b's code: %+v", st)
	}
	at := -1
	msgs := srv.Messages()
	for i, m := range msgs {
		if m.To[0] == "jane@example.org" {
			at = i
		}
	}
	if at < 0 {
		t.Fatal("b's code is sent but the server has no message for it")
	}
	ahead := max(at-before, 0)
	t.Logf("a queued %d codes and %d bulk messages; %d of a's reached the server between b's acceptance and b's code (%d before)", flood, flood, ahead, before)
	if backlog := 2*flood - before; backlog < flood {
		t.Fatalf("only %d of a's messages were queued when b's code came: the test built no backlog", backlog)
	}
	if ahead > 5 {
		t.Fatalf("%d of a's messages reached the server between b's acceptance and b's code, want at most 5", ahead)
	}
}

// With max_queued 20, key a's bulk mail fills 18 places: the rest is
// kept for codes and links, so key b's code is still accepted while a's
// further /send mail gets 503 queue_full; with max_queued_per_key, a's
// own codes stop at that many while b's go on. The server refuses every
// message meanwhile, so that nothing leaves the queue.
func TestQueueLimitKeepsRoomForAnotherKeysCode(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Service not available, try again later"}
	}})
	const (
		plain = `{"to":"more@example.org","subject":"More","text_body":"More."}`
		bulk  = `{"to":"more@example.org","subject":"More","text_body":"More.","priority":"bulk"}`
	)
	for _, c := range []struct {
		name      string
		delivery  func(*Delivery)
		fill      func(i int) (path, body string)
		filled    int
		moreOfA   [][2]string // path and body of a's requests that are refused then
		refusal   string      // what the refusal's message names
		bAccepted int         // codes of b still accepted
	}{
		{"auth reserve", func(d *Delivery) { d.MaxQueued = 20 },
			func(i int) (string, string) {
				return "/authmail/send", fmt.Sprintf(`{"to":"reader%d@example.org","subject":"Digest","text_body":"Weekly.","priority":"bulk"}`, i)
			}, 18, [][2]string{{"/authmail/send", plain}, {"/authmail/send", bulk}}, "auth_reserve", 2},
		{"per key", func(d *Delivery) { d.MaxQueuedPerKey = 5 },
			func(i int) (string, string) { return "/authmail/send/otp", otp(fmt.Sprintf("user%d@example.org", i)) },
			5, [][2]string{{"/authmail/send/otp", otp("more@example.org")}, {"/authmail/send", plain}}, "max_queued_per_key", 5},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newInstance(t, "").handler(withSMTP(t, srv), twoKeys(t), withDelivery(c.delivery))
			filled := 0
			for ; filled < 100; filled++ {
				path, body := c.fill(filled)
				rec, out := call(t, h, "POST", path, body, "Prefer: respond-async")
				if rec.Code == 503 && out["error_code"] == "queue_full" {
					break
				}
				if rec.Code != 202 {
					t.Fatalf("a's message %d: %d %s", filled, rec.Code, rec.Body)
				}
			}
			if filled != c.filled {
				t.Fatalf("a filled %d places, want %d", filled, c.filled)
			}
			for _, req := range c.moreOfA {
				rec, out := call(t, h, "POST", req[0], req[1], "Prefer: respond-async")
				if rec.Code != 503 || out["error_code"] != "queue_full" || rec.Header().Get("Retry-After") == "" {
					t.Fatalf("a's further %s %s: %d %s, want 503 queue_full", req[0], req[1], rec.Code, rec.Body)
				}
				if msg, _ := out["message"].(string); !strings.Contains(msg, c.refusal) {
					t.Fatalf("a's further %s: the refusal says %q, want it to name %s", req[0], msg, c.refusal)
				}
			}
			for i := range c.bAccepted {
				rec, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("jane%d@example.org", i)), "Prefer: respond-async", asB)
				if rec.Code != 202 {
					t.Fatalf("b's code %d with a's mail filling its part of the queue: %d %s", i, rec.Code, rec.Body)
				}
				if st := waitState(t, h, out["id"].(string), func(outbox.State) bool { return true }); st.KeyID != "b" {
					t.Fatalf("b's code: %+v", st)
				}
			}
		})
	}
}
