package authmail

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
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

const unitKey = "0123456789abcdef0123"

// withSMTP makes a test handler deliver to srv with short retry delays.
func withSMTP(t testing.TB, srv *smtptest.Server) func(*Handler) {
	t.Setenv("AUTHMAIL_UNIT_SMTP_PASSWORD", "s3cret-pass")
	return func(h *Handler) {
		h.Capture = ""
		h.SMTP = &SMTP{Host: "127.0.0.1", Port: srv.Port, Username: "user", Password: "{env.AUTHMAIL_UNIT_SMTP_PASSWORD}",
			CA: srv.CAFile, Timeout: caddy.Duration(2 * time.Second), Connections: 2}
		h.Delivery = &Delivery{RetryBackoff: caddy.Duration(40 * time.Millisecond), MaxBackoff: caddy.Duration(160 * time.Millisecond)}
	}
}

func withDelivery(mod func(*Delivery)) func(*Handler) {
	return func(h *Handler) {
		if h.Delivery == nil {
			h.Delivery = &Delivery{}
		}
		mod(h.Delivery)
	}
}

// withoutLimits turns off the per-key and per-recipient rate limits, for
// tests and benchmarks that send many messages with one key.
func withoutLimits(h *Handler) {
	h.RecipientRate = map[string]string{"default": "off"}
	h.Keys[0].Rate = "off"
}

// call runs one API request through the handler.
func call(t testing.TB, h *Handler, method, path, body string, headers ...string) (*httptest.ResponseRecorder, map[string]any) {
	t.Helper()
	return serveRequest(t, h, apiRequest(method, path, strings.NewReader(body), headers...))
}

// apiRequest builds a request the way Caddy hands it to the handler: a
// replacer in its context, the unit key and a JSON content type, then
// the given "Name: value" headers.
func apiRequest(method, path string, body io.Reader, headers ...string) *http.Request {
	req := httptest.NewRequest(method, path, body)
	req.Header.Set("Authorization", "Bearer "+unitKey)
	req.Header.Set("Content-Type", "application/json")
	for _, kv := range headers {
		k, v, _ := strings.Cut(kv, ":")
		req.Header.Set(k, strings.TrimSpace(v))
	}
	return req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
}

// serveRequest runs req through h and decodes the JSON answer, if any.
func serveRequest(t testing.TB, h *Handler, req *http.Request) (*httptest.ResponseRecorder, map[string]any) {
	t.Helper()
	rec := httptest.NewRecorder()
	if err := h.ServeHTTP(rec, req, nil); err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	_ = json.Unmarshal(rec.Body.Bytes(), &out)
	return rec, out
}

func otp(to string) string { return fmt.Sprintf(`{"to":%q,"code":"123456"}`, to) }

// waitState polls a message's state until cond holds.
func waitState(t testing.TB, h *Handler, id string, cond func(outbox.State) bool) outbox.State {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, ok, err := h.engine.Lookup(context.Background(), id)
		if err == nil && ok && cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s: state %+v (found %v, %v) never matched", id, st, ok, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func status(want string) func(outbox.State) bool {
	return func(s outbox.State) bool { return s.Status == want }
}

func TestOutboxSendRecordsStateAndDeletesBody(t *testing.T) {
	forEachStorage(t, testOutboxSendRecordsStateAndDeletesBody)
}

func testOutboxSendRecordsStateAndDeletesBody(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	h := in.handler(withSMTP(t, srv))
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 200 || out["status"] != "sent" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	bid := outbox.BatchOf(id)
	// the batch retires: body and marker deleted, the status record stays
	deadline := time.Now().Add(5 * time.Second)
	st := h.shared.st
	for (st.s.Exists(context.Background(), outbox.KeySeg+bid) || st.s.Exists(context.Background(), outbox.OwnKey(h.engine.Instance(), bid))) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if st.s.Exists(context.Background(), outbox.KeySeg+bid) {
		t.Fatal("the message body is still in storage after delivery")
	}
	var bs outbox.BatchState
	if err := st.getJSON(context.Background(), outbox.KeySt+bid, &bs); err != nil || !bs.Done || bs.Messages[0].Status != outbox.Sent {
		t.Fatalf("status record %+v %v", bs, err)
	}
	raw, _ := st.s.Load(context.Background(), outbox.KeySt+bid)
	if strings.Contains(string(raw), "123456") || strings.Contains(string(raw), "jane@example.org") {
		t.Fatal("the status record holds the code or the recipient address")
	}
	rec, out = call(t, h, "GET", "/authmail/messages/"+id, "")
	if rec.Code != 200 || out["status"] != "sent" || out["attempts"] != 1.0 || out["message_id"] != bs.Messages[0].MessageID ||
		out["next_attempt_at"] != nil || out["last_error_code"] != nil || !strings.Contains(out["smtp_response"].(string), "OK") {
		t.Fatalf("status %d %s", rec.Code, rec.Body)
	}
	for _, k := range []string{"id", "status", "attempts", "created_at", "updated_at", "next_attempt_at", "message_id", "last_error_code", "last_error", "smtp_response"} {
		if _, ok := out[k]; !ok {
			t.Errorf("status answer lacks %s", k)
		}
	}
}

func TestOutboxRetriesTransientFailures(t *testing.T) {
	forEachStorage(t, testOutboxRetriesTransientFailures)
}

func testOutboxRetriesTransientFailures(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	var mu sync.Mutex
	fails := 2
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error {
		mu.Lock()
		defer mu.Unlock()
		if fails > 0 {
			fails--
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
		}
		return nil
	}})
	h := newInstance(t, "").handler(withSMTP(t, srv))
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 202 || out["status"] != "queued" || out["error_code"] != "smtp_transient" ||
		rec.Header().Get("Location") != "/authmail/messages/"+out["id"].(string) {
		t.Fatalf("%d %v %s", rec.Code, rec.Header(), rec.Body)
	}
	st := waitState(t, h, out["id"].(string), status(outbox.Sent))
	if st.Attempts != 3 || st.LastCode != "" {
		t.Fatalf("state %+v", st)
	}
	if n, all := len(srv.Messages()), len(srv.Attempts()); n != 1 || all != 3 {
		t.Fatalf("accepted %d, attempts %d; want 1 and 3", n, all)
	}
}

func TestOutboxPermanentFailureIsNotRetried(t *testing.T) {
	forEachStorage(t, testOutboxPermanentFailureIsNotRetried)
}

func testOutboxPermanentFailureIsNotRetried(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}})
	h := newInstance(t, "").handler(withSMTP(t, srv))
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("nobody@example.org"))
	if rec.Code != 502 || out["status"] != "failed" || out["error_code"] != "recipient_refused" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	time.Sleep(300 * time.Millisecond)
	st := waitState(t, h, out["id"].(string), status(outbox.Failed))
	if st.Attempts != 1 || !strings.Contains(st.SMTPResponse, "550 5.1.1") {
		t.Fatalf("state %+v", st)
	}
}

func TestOutboxUncertainIsNotResent(t *testing.T) { forEachStorage(t, testOutboxUncertainIsNotResent) }

func testOutboxUncertainIsNotResent(t *testing.T) {
	for _, retry := range []bool{false, true} {
		t.Run(fmt.Sprintf("retry_uncertain=%v", retry), func(t *testing.T) {
			srv := authServer(t, smtptest.StartTLS)
			var mu sync.Mutex
			drops := 1
			srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error {
				mu.Lock()
				defer mu.Unlock()
				if drops > 0 {
					drops--
					return smtptest.ErrDrop
				}
				return nil
			}})
			h := newInstance(t, "").handler(withSMTP(t, srv), withDelivery(func(d *Delivery) { d.RetryUncertain = retry }))
			rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
			id := out["id"].(string)
			if !retry {
				if rec.Code != 502 || out["status"] != "unknown" || out["error_code"] != "smtp_disconnect_uncertain" {
					t.Fatalf("%d %s", rec.Code, rec.Body)
				}
				time.Sleep(300 * time.Millisecond)
				if n := len(srv.Attempts()); n != 1 {
					t.Fatalf("an uncertain message was sent %d times", n)
				}
				waitState(t, h, id, status(outbox.Unknown))
				return
			}
			if rec.Code != 202 || out["error_code"] != "smtp_disconnect_uncertain" {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			waitState(t, h, id, status(outbox.Sent))
			if n := len(srv.Attempts()); n != 2 {
				t.Fatalf("attempts %d, want 2 with retry_uncertain", n)
			}
		})
	}
}

func TestOutboxGivesUpAfterMaxAge(t *testing.T) { forEachStorage(t, testOutboxGivesUpAfterMaxAge) }

func testOutboxGivesUpAfterMaxAge(t *testing.T) {
	port := smtptest.Silent(t) // never answers
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.SMTP.Port, h.SMTP.Timeout = port, caddy.Duration(50*time.Millisecond)
		h.Delivery.MaxAge = caddy.Duration(400 * time.Millisecond)
	})
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 202 || out["error_code"] != nil || rec.Header().Get("Preference-Applied") != "respond-async" {
		t.Fatalf("%d %v %s", rec.Code, rec.Header(), rec.Body)
	}
	st := waitState(t, h, out["id"].(string), status(outbox.Failed))
	if st.LastCode != mailer.CodeSMTPTimeout || st.Attempts < 2 {
		t.Fatalf("state %+v", st)
	}
}

func TestOutboxDeliversOnceAfterSMTPOutage(t *testing.T) {
	forEachStorage(t, testOutboxDeliversOnceAfterSMTPOutage)
}

func testOutboxDeliversOnceAfterSMTPOutage(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	addr, certPEM, keyPEM := srv.Addr, srv.CAPEM, srv.KeyPEM
	h := newInstance(t, "").handler(withSMTP(t, srv))
	_ = srv.Close() // the SMTP server goes down
	ids := map[string]string{}
	for i := range 30 {
		to := fmt.Sprintf("u%d@example.org", i)
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp(to), "Prefer: wait=1")
		if rec.Code != 202 || out["error_code"] != "smtp_connection" {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		ids[out["id"].(string)] = to
	}
	time.Sleep(200 * time.Millisecond)
	back, err := smtptest.New(smtptest.Options{Addr: addr, CertPEM: certPEM, KeyPEM: keyPEM, Username: "user", Password: "s3cret-pass", Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	msgs := back.WaitMessages(30, 10*time.Second)
	time.Sleep(300 * time.Millisecond) // any duplicate would show up now
	seen := map[string]int{}
	for _, m := range back.Messages() {
		seen[m.To[0]]++
	}
	if len(msgs) != 30 || len(seen) != 30 {
		t.Fatalf("delivered %d messages to %d recipients, want 30 each exactly once", len(back.Messages()), len(seen))
	}
	for rcpt, n := range seen {
		if n != 1 {
			t.Errorf("%s got %d copies", rcpt, n)
		}
	}
	for id := range ids {
		st := waitState(t, h, id, status(outbox.Sent))
		if st.Attempts < 2 {
			t.Errorf("%s: %d attempts", id, st.Attempts)
		}
	}
}

func TestOutboxQueueFull(t *testing.T) { forEachStorage(t, testOutboxQueueFull) }

func testOutboxQueueFull(t *testing.T) {
	port := smtptest.Silent(t)
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.SMTP.Port = port
		h.Delivery.MaxQueued = 3
	})
	for i := range 3 {
		if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("u%d@example.org", i)), "Prefer: respond-async"); rec.Code != 202 {
			t.Fatalf("message %d: %d %s", i, rec.Code, rec.Body)
		}
	}
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("late@example.org"), "Prefer: respond-async")
	if rec.Code != 503 || out["error_code"] != "queue_full" || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("%d %v %s", rec.Code, rec.Header(), rec.Body)
	}
}

func TestOutboxAuthFailureIsRetriedUntilAReloadFixesIt(t *testing.T) {
	forEachStorage(t, testOutboxAuthFailureIsRetriedUntilAReloadFixesIt)
}

func testOutboxAuthFailureIsRetriedUntilAReloadFixesIt(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	t.Setenv("AUTHMAIL_UNIT_WRONG_PASSWORD", "wrong-pass")
	old := in.handler(withSMTP(t, srv), func(h *Handler) { h.SMTP.Password = "{env.AUTHMAIL_UNIT_WRONG_PASSWORD}" })
	rec, out := call(t, old, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 202 || out["error_code"] != "smtp_auth_failed" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	// the operator fixes the password and reloads: the new handler
	// provisions on the same engine, then the old one is cleaned up
	fixed := in.handler(withSMTP(t, srv))
	if fixed.engine != old.engine {
		t.Fatal("a reload must keep the same outbox engine")
	}
	_ = old.Cleanup()
	waitState(t, fixed, id, status(outbox.Sent))
	if len(srv.Messages()) != 1 {
		t.Fatalf("%d messages", len(srv.Messages()))
	}
}

func TestOutboxStatusFromAnotherInstanceAndKeyScoping(t *testing.T) {
	forEachStorage(t, testOutboxStatusFromAnotherInstanceAndKeyScoping)
}

func testOutboxStatusFromAnotherInstanceAndKeyScoping(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	a := newInstance(t, shared).handler(withSMTP(t, srv))
	b := newInstance(t, shared).handler(withSMTP(t, srv), func(h *Handler) {
		h.Keys = append(h.Keys, Key{ID: "other", Secret: "another-key-0123456789"})
	})
	if a.engine == b.engine || a.engine.Instance() == b.engine.Instance() {
		t.Fatal("two instances must have two engines")
	}
	_, out := call(t, a, "POST", "/authmail/send/otp", otp("jane@example.org"))
	id := out["id"].(string)
	waitState(t, a, id, status(outbox.Sent))
	rec, st := call(t, b, "GET", "/authmail/messages/"+id, "")
	if rec.Code != 200 || st["status"] != "sent" || st["id"] != id {
		t.Fatalf("status from the other instance: %d %s", rec.Code, rec.Body)
	}
	for _, path := range []string{"/authmail/messages/" + id[:len(id)-1] + "z", "/authmail/messages/nope", "/authmail/messages/../../x"} {
		if rec, _ := call(t, b, "GET", path, ""); rec.Code != 404 {
			t.Errorf("%s: %d", path, rec.Code)
		}
	}
	if w, _ := serveRequest(t, b, apiRequest("GET", "/authmail/messages/"+id, nil, "Authorization: Bearer another-key-0123456789")); w.Code != 404 {
		t.Fatalf("another key's message: %d %s", w.Code, w.Body)
	}
}

var _ = http.StatusOK

// TestAsyncAnswerIsAlways202: an answer given right after the durable
// write ("Prefer: respond-async", or delivery wait 0) is 202 queued even
// when a fast transport has already delivered the message by the time the
// answer is built; the status endpoint reports the rest.
func TestAsyncAnswerIsAlways202(t *testing.T) {
	for name, setup := range map[string]struct {
		mod     func(*Handler)
		headers []string
		applied string
	}{
		"respond-async": {func(*Handler) {}, []string{"Prefer: respond-async"}, "respond-async"},
		"wait 0":        {func(h *Handler) { h.Delivery = &Delivery{Wait: -1} }, nil, ""},
	} {
		t.Run(name, func(t *testing.T) {
			h := newInstance(t, "").handler(setup.mod, withoutLimits)
			var wg sync.WaitGroup
			ids := make(chan string, 320)
			for g := range 16 {
				wg.Go(func() {
					for i := range 20 {
						rec, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("u%d-%d@example.org", g, i)), setup.headers...)
						if rec.Code != 202 || out["status"] != "queued" || out["sent"] != false || out["error_code"] != nil ||
							rec.Header().Get("Preference-Applied") != setup.applied {
							t.Errorf("%d %v (Preference-Applied %q)", rec.Code, out, rec.Header().Get("Preference-Applied"))
							return
						}
						ids <- out["id"].(string)
					}
				})
			}
			wg.Wait()
			close(ids)
			for id := range ids {
				waitState(t, h, id, status(outbox.Sent))
			}
		})
	}
}

// TestEmailChangeNoticeInCaptureMode: the answer describes the notice to
// the old address the way it describes the confirmation: "captured" in
// capture mode, with its own id, and both files are written.
func TestEmailChangeNoticeInCaptureMode(t *testing.T) {
	h := provisionedHandler(t)
	rec, out := call(t, h, "POST", "/authmail/send/email-change", `{"to":"new@example.org","old_email":"old@example.org","token":"t0k"}`)
	notice, _ := out["notice"].(map[string]any)
	if rec.Code != 200 || out["status"] != "captured" || notice == nil {
		t.Fatalf("%d %v", rec.Code, out)
	}
	if notice["sent"] != true || notice["status"] != "captured" || notice["id"] == out["id"] || notice["message_id"] == out["message_id"] {
		t.Fatalf("notice %v", notice)
	}
	files, err := os.ReadDir(h.Capture)
	if err != nil || len(files) != 2 {
		t.Fatalf("%d captured files (%v), want the confirmation and the notice", len(files), err)
	}
	for _, f := range files {
		if !strings.Contains(f.Name(), out["id"].(string)) && !strings.Contains(f.Name(), notice["id"].(string)) {
			t.Errorf("captured file %s belongs to neither message", f.Name())
		}
	}
}

// sendAsync sends an OTP to `to` with Prefer: respond-async and returns
// the message id of the 202.
func sendAsync(t *testing.T, h *Handler, to string) string {
	t.Helper()
	rec, out := call(t, h, http.MethodPost, "/authmail/send/otp", fmt.Sprintf(`{"to":%q,"code":"1"}`, to), "Prefer: respond-async")
	if rec.Code != http.StatusAccepted {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	return out["id"].(string)
}

// waitCount waits until a counter (MAIL commands a hook saw, say)
// reaches n.
func waitCount(t *testing.T, c *atomic.Int32, n int32, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for c.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d %s, want %d", c.Load(), what, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestStopGivesBackClaimsNotYetAttempted: a worker claims a group of
// queued messages with one write and then attempts them one by one. When
// Caddy stops while attempts hang (here: the server never answers MAIL),
// the drain times out; the claimed messages whose attempt never started
// must be written back as queued, so that the next start sends them,
// instead of staying "sending" and becoming unknown.
func TestStopGivesBackClaimsNotYetAttempted(t *testing.T) {
	forEachStorage(t, testStopGivesBackClaimsNotYetAttempted)
}

func testStopGivesBackClaimsNotYetAttempted(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	blockers, hang := make(chan struct{}), make(chan struct{})
	var mails atomic.Int32
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		if mails.Add(1) <= 2 {
			<-blockers // both workers busy while the backlog is accepted
		} else {
			<-hang // then every attempt hangs
		}
		return nil
	}})
	defer close(hang)
	h := newInstance(t, "").handler(withSMTP(t, srv), withoutLimits, withDelivery(func(d *Delivery) {
		d.DrainTimeout = caddy.Duration(300 * time.Millisecond)
	}))
	sendAsync(t, h, "blocker1@example.org")
	sendAsync(t, h, "blocker2@example.org")
	waitCount(t, &mails, 2, "MAIL commands")
	const n = 24
	ids := make([]string, n)
	for i := range n {
		ids[i] = sendAsync(t, h, fmt.Sprintf("u%d@example.org", i))
	}
	close(blockers)
	// each worker claims a group of the backlog with one write, then
	// hangs in the first message's MAIL
	waitCount(t, &mails, 4, "MAIL commands")
	time.Sleep(50 * time.Millisecond)
	inv := h.engine.Inventory()
	claimed := 0
	for _, id := range ids {
		if inv.Resident[id] {
			claimed++
		}
	}
	if claimed <= 2 {
		t.Fatalf("only %d messages claimed; the test needs workers holding groups", claimed)
	}
	h.engine.Shutdown()
	// what the next start finds: every message queued, with no attempt
	// counted, except the two attempts in flight, which are queued or
	// (when another change of their batch was written) sending; none
	// reached its final dot, so the dot record marks none and the next
	// start attempts them all again
	sending, queued := 0, 0
	for _, id := range ids {
		m, ok := storedState(h, id)
		if !ok {
			t.Fatalf("%s: no state in storage", id)
		}
		switch m.Status {
		case outbox.Sending:
			sending++
		case outbox.Queued:
			queued++
		default:
			t.Errorf("%s: %s", id, m.Status)
		}
	}
	rec, err := h.engine.OwnDots()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if a, ok := rec.Marks[id]; ok {
			t.Errorf("message %s attempt %d is marked although no dot was sent", id, a)
		}
	}
	if sending > 2 || queued+sending != n {
		t.Errorf("after the stop: %d sending (at most the 2 attempts in flight), %d queued; %d were claimed", sending, queued, claimed)
	}
}
