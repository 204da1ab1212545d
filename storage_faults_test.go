package authmail

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// faultyStorage is a real file storage whose operations fail, while a
// fault is set, for keys under a given prefix.
type faultyStorage struct {
	certmagic.Storage
	mu           sync.Mutex
	store        string      // Store fails for keys with this prefix
	load         string      // Load fails for keys with this prefix
	lockOn       string      // Lock fails for names with this prefix
	exists       string      // Exists answers false for keys with this prefix
	loadFailures []time.Time // when Loads failed
	// storeIf, when set, fails the Stores it returns true for
	storeIf func(key string, value []byte) bool
	// stall, when set, makes Load, Store, List, Exists and Lock of keys
	// and names with this prefix block, ignoring their context, like a
	// blackholed connection, until released is closed
	stall    string
	released chan struct{}
}

// stalls blocks while a stall covers key.
func (f *faultyStorage) stalls(key string) {
	f.mu.Lock()
	on, released := f.stall != "" && strings.HasPrefix(key, f.stall), f.released
	f.mu.Unlock()
	if on {
		<-released
	}
}

func (f *faultyStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	f.stalls(path)
	return f.Storage.List(ctx, path, recursive)
}

var errInjected = errors.New("injected storage fault")

func (f *faultyStorage) set(fn func(f *faultyStorage)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *faultyStorage) fails(prefix *string, key string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return *prefix != "" && strings.HasPrefix(key, *prefix)
}

func (f *faultyStorage) Store(ctx context.Context, key string, value []byte) error {
	f.stalls(key)
	if f.fails(&f.store, key) {
		return errInjected
	}
	f.mu.Lock()
	storeIf := f.storeIf
	f.mu.Unlock()
	if storeIf != nil && storeIf(key, value) {
		return errInjected
	}
	return f.Storage.Store(ctx, key, value)
}

func (f *faultyStorage) Load(ctx context.Context, key string) ([]byte, error) {
	f.stalls(key)
	if f.fails(&f.load, key) {
		f.mu.Lock()
		f.loadFailures = append(f.loadFailures, time.Now())
		f.mu.Unlock()
		return nil, errInjected
	}
	return f.Storage.Load(ctx, key)
}

func (f *faultyStorage) Exists(ctx context.Context, key string) bool {
	f.stalls(key)
	if f.fails(&f.exists, key) {
		return false // what some storage modules answer when they fail
	}
	return f.Storage.Exists(ctx, key)
}

func (f *faultyStorage) Lock(ctx context.Context, name string) error {
	f.stalls(name)
	if f.fails(&f.lockOn, name) {
		return errInjected
	}
	return f.Storage.Lock(ctx, name)
}

// faultyHandler provisions a handler that sends to srv and stores into
// a faultyStorage; mods apply after those two.
func faultyHandler(t *testing.T, srv *smtptest.Server, mods ...func(*Handler)) (*Handler, *faultyStorage) {
	t.Helper()
	in := newInstance(t, "")
	fs := &faultyStorage{Storage: openStorage(t, in.storageDir), released: make(chan struct{})}
	t.Cleanup(func() { fs.set(func(f *faultyStorage) { f.stall = "" }); close(fs.released) })
	h := in.handler(append([]func(*Handler){withSMTP(t, srv), func(h *Handler) { h.storageOverride = fs }}, mods...)...)
	return h, fs
}

// TestAcceptFailsCleanlyWhenStorageFails: a message that cannot be made
// durable gets 503 outbox_unavailable, is never sent, leaves no trace in
// the queue figures, and does not consume its Idempotency-Key; once the
// storage works again the same request goes through.
func TestAcceptFailsCleanlyWhenStorageFails(t *testing.T) {
	forEachStorage(t, testAcceptFailsCleanlyWhenStorageFails)
}

func testAcceptFailsCleanlyWhenStorageFails(t *testing.T) {
	for _, failing := range []string{outbox.KeySeg, outbox.KeyOwn} {
		t.Run(strings.TrimSuffix(strings.TrimPrefix(failing, "authmail/"), "/"), func(t *testing.T) {
			srv := authServer(t, smtptest.StartTLS)
			h, fs := faultyHandler(t, srv)
			fs.set(func(f *faultyStorage) { f.store = failing })
			for _, headers := range [][]string{nil, {"Prefer: respond-async"}, {"Idempotency-Key: fault-1"}} {
				rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), headers...)
				if rec.Code != 503 || out["error_code"] != "outbox_unavailable" || out["id"] != nil ||
					!strings.Contains(out["message"].(string), "nothing was sent") {
					t.Fatalf("%v: %d %v", headers, rec.Code, out)
				}
				if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
					t.Errorf("content type %q", ct)
				}
			}
			time.Sleep(200 * time.Millisecond)
			if n := len(srv.Attempts()); n != 0 {
				t.Fatalf("%d messages reached the SMTP server although none was stored", n)
			}
			if depth, _ := h.engine.QueueStats(); depth != 0 {
				t.Errorf("queue depth %d after failed accepts", depth)
			}
			inv := h.engine.Inventory()
			reserved, nonFinal := inv.Reserved, inv.NonFinal
			if reserved != 0 || nonFinal != 0 {
				t.Errorf("failed accepts still count against max_queued: reserved %d, unfinished %d", reserved, nonFinal)
			}
			ctx := context.Background()
			if owned, err := h.shared.st.ownedBatches(ctx, h.engine.Instance()); err != nil || len(owned) != 0 {
				t.Errorf("ownership markers of failed batches: %v %v", owned, err)
			}
			if keys, _ := h.shared.st.list(ctx, strings.TrimSuffix(outbox.KeySeg, "/")); len(keys) != 0 {
				t.Errorf("segments of failed accepts stayed in storage: %v", keys)
			}
			if keys, _ := h.engine.Storage().List(ctx, outbox.KeyIdem+h.keys[0].tenant, false); len(keys) != 0 {
				t.Errorf("a failed accept consumed its Idempotency-Key: %v", keys)
			}

			fs.set(func(f *faultyStorage) { f.store = "" })
			rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: fault-1")
			if rec.Code != 200 || out["status"] != "sent" {
				t.Fatalf("after the storage recovered: %d %v", rec.Code, out)
			}
			if m := srv.WaitMessages(1, 5*time.Second); len(m) != 1 || m[0].To[0] != "jane@example.org" {
				t.Fatalf("messages after recovery: %d", len(m))
			}
		})
	}
}

// TestStatusAndIdempotencyAnswer503WhenStorageFails: reads that storage
// cannot serve are a retryable 503, never a 404 or a 500, and a send that
// cannot lock or read its idempotency record sends nothing.
func TestStatusAndIdempotencyAnswer503WhenStorageFails(t *testing.T) {
	forEachStorage(t, testStatusAndIdempotencyAnswer503WhenStorageFails)
}

func testStatusAndIdempotencyAnswer503WhenStorageFails(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv)
	ctx := context.Background()

	// a finished message whose batch left memory is read from storage
	_, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	id, _ := out["id"].(string)
	waitState(t, h, id, status(outbox.Sent))
	deadline := time.Now().Add(5 * time.Second)
	for h.engine.Storage().Exists(ctx, outbox.KeySeg+outbox.BatchOf(id)) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	_, resident := h.engine.Inventory().Resident[id]
	if resident {
		t.Fatal("a retired message is still in memory; this test needs one read from storage")
	}
	fs.set(func(f *faultyStorage) { f.load = outbox.KeySt })
	rec, out := call(t, h, "GET", "/authmail/messages/"+id, "")
	if rec.Code != 503 || out["error_code"] != "outbox_unavailable" {
		t.Fatalf("status with failing storage: %d %v", rec.Code, out)
	}
	fs.set(func(f *faultyStorage) { f.load = "" })
	if rec, out := call(t, h, "GET", "/authmail/messages/"+id, ""); rec.Code != 200 || out["status"] != "sent" {
		t.Fatalf("status after recovery: %d %v", rec.Code, out)
	}

	srv.ClearMessages()
	for name, fault := range map[string]func(f *faultyStorage){
		"lock":  func(f *faultyStorage) { f.lockOn = "authmail_idem_" },
		"read":  func(f *faultyStorage) { f.load = outbox.KeyIdem },
		"write": func(f *faultyStorage) { f.store = outbox.KeyIdem },
	} {
		// a record must exist for the read to be attempted
		if name == "read" {
			if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("ann@example.org"), "Idempotency-Key: k-read"); rec.Code != 200 {
				t.Fatalf("seeding the record: %d", rec.Code)
			}
			srv.WaitMessages(1, 5*time.Second)
			srv.ClearMessages()
		}
		fs.set(fault)
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp("ann@example.org"), "Idempotency-Key: k-"+name)
		fs.set(func(f *faultyStorage) { f.lockOn, f.load, f.store = "", "", "" })
		if rec.Code != 503 || out["error_code"] != "outbox_unavailable" || out["id"] != nil {
			t.Fatalf("%s: %d %v", name, rec.Code, out)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Attempts()); n != 0 {
		t.Fatalf("%d messages sent although their idempotency record could not be checked", n)
	}
}

// brokenBody yields a prefix and then fails, like a client that goes
// away in the middle of its request body.
type brokenBody struct{ sent bool }

func (b *brokenBody) Read(p []byte) (int, error) {
	if !b.sent {
		b.sent = true
		return copy(p, `{"to":"jane@example.org","co`), nil
	}
	return 0, errors.New("connection reset by peer")
}

func TestUnreadableBodyIs400AndSendsNothing(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv))
	rec, out := serveRequest(t, h, apiRequest("POST", "/authmail/send/otp", &brokenBody{}))
	if rec.Code != 400 || out["error_code"] != "invalid_request" || out["message"] != "the request body could not be read" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(srv.Attempts()); n != 0 {
		t.Fatalf("%d messages sent from a truncated body", n)
	}
	if depth, _ := h.engine.QueueStats(); depth != 0 {
		t.Fatalf("queue depth %d", depth)
	}
}

// storedState reads a message's state from storage, not from memory; ok
// is false when it cannot be read or is not there.
func storedState(h *Handler, id string) (outbox.State, bool) {
	bs, err := outbox.LoadState(context.Background(), h.engine.Storage(), outbox.BatchOf(id))
	if err != nil {
		return outbox.State{}, false
	}
	return bs.Message(id)
}

// storedStatus is the status of storedState, "" when there is none.
func storedStatus(t *testing.T, h *Handler, id string) string {
	t.Helper()
	m, _ := storedState(h, id)
	return m.Status
}

// TestStateThatCannotBeWrittenHoldsNoDelivery: claims are not written
// before an attempt (the dot mark is what a crash needs), so a storage
// that refuses state writes does not hold delivery back: the message is
// sent once, its dot mark is in storage (a crash now would leave it
// unknown, never resend it), and its outcome is written once the storage
// takes writes again.
func TestStateThatCannotBeWrittenHoldsNoDelivery(t *testing.T) {
	forEachStorage(t, testStateThatCannotBeWrittenHoldsNoDelivery)
}

func testStateThatCannotBeWrittenHoldsNoDelivery(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv)
	fs.set(func(f *faultyStorage) { f.store = outbox.KeySt })
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 202 {
		t.Fatalf("%d %v", rec.Code, out)
	}
	id := out["id"].(string)
	if m := srv.WaitMessages(1, 5*time.Second); len(m) != 1 {
		t.Fatalf("%d messages", len(m))
	}
	if got := storedStatus(t, h, id); got != outbox.Queued {
		t.Fatalf("stored status %q while state writes fail, want queued (as accepted)", got)
	}
	if dots, err := h.engine.OwnDots(); err != nil || dots.Marks[id] != 1 {
		t.Fatalf("the sent attempt is not marked in storage: %v %v", dots.Marks, err)
	}
	fs.set(func(f *faultyStorage) { f.store = "" })
	deadline := time.Now().Add(5 * time.Second)
	for storedStatus(t, h, id) != outbox.Sent {
		if time.Now().After(deadline) {
			t.Fatalf("the outcome was never written: %q", storedStatus(t, h, id))
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("%d SMTP transactions, want exactly one", n)
	}
}

// TestOutcomeThatCannotBeWrittenIsRetried: when the write that records
// "sent" fails, the outcome is written again later; the message is not
// sent a second time meanwhile.
func TestOutcomeThatCannotBeWrittenIsRetried(t *testing.T) {
	forEachStorage(t, testOutcomeThatCannotBeWrittenIsRetried)
}

func testOutcomeThatCannotBeWrittenIsRetried(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv)
	fs.set(func(f *faultyStorage) {
		f.storeIf = func(key string, value []byte) bool {
			return strings.HasPrefix(key, outbox.KeySt) && strings.Contains(string(value), `"status":"sent"`)
		}
	})
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 202 {
		t.Fatalf("%d %v", rec.Code, out)
	}
	id := out["id"].(string)
	if m := srv.WaitMessages(1, 5*time.Second); len(m) != 1 {
		t.Fatalf("%d messages", len(m))
	}
	time.Sleep(1500 * time.Millisecond) // a failed state write is retried every second
	// the claim is not written; the dot mark is what a crash now would
	// read, and it calls the message unknown instead of resending it
	if got := storedStatus(t, h, id); got != outbox.Queued {
		t.Fatalf("stored status %q while the outcome cannot be written, want queued", got)
	}
	if dots, err := h.engine.OwnDots(); err != nil || dots.Marks[id] != 1 {
		t.Fatalf("the sent attempt is not marked in storage: %v %v", dots.Marks, err)
	}
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("%d SMTP transactions while the outcome could not be written, want one", n)
	}
	fs.set(func(f *faultyStorage) { f.storeIf = nil })
	deadline := time.Now().Add(5 * time.Second)
	for storedStatus(t, h, id) != outbox.Sent {
		if time.Now().After(deadline) {
			t.Fatalf("the outcome was never written: %q", storedStatus(t, h, id))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("%d SMTP transactions, want exactly one", n)
	}
}

// TestLapsedLeaseStopsWorkUntilItIsReestablished: an instance whose
// heartbeat writes fail stops owning its work once lease − margin passed
// since its last acknowledged renewal: it accepts nothing (503) and
// attempts nothing. Once the writes succeed it re-establishes its
// ownership and works again, and what it accepted is delivered once.
func TestLapsedLeaseStopsWorkUntilItIsReestablished(t *testing.T) {
	forEachStorage(t, testLapsedLeaseStopsWorkUntilItIsReestablished)
}

func testLapsedLeaseStopsWorkUntilItIsReestablished(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv, withDelivery(func(d *Delivery) {
		d.Lease = caddy.Duration(time.Second)
	}))
	fs.set(func(f *faultyStorage) { f.store = outbox.KeyInst })
	time.Sleep(1200 * time.Millisecond) // past lease − margin
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 503 || out["error_code"] != "outbox_unavailable" {
		t.Fatalf("while the lease lapsed: %d %v, want 503 outbox_unavailable", rec.Code, out)
	}
	if n := len(srv.Attempts()); n != 0 {
		t.Fatalf("%d SMTP transactions while the lease lapsed", n)
	}
	fs.set(func(f *faultyStorage) { f.store = "" })
	var id string
	deadline := time.Now().Add(5 * time.Second)
	for id == "" {
		rec, out = call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
		if rec.Code == 202 {
			id = out["id"].(string)
		} else if time.Now().After(deadline) {
			t.Fatalf("never accepted again: %d %v", rec.Code, out)
		} else {
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitState(t, h, id, status(outbox.Sent))
	time.Sleep(200 * time.Millisecond)
	// one message; on a loaded machine a one-second lease can lapse again
	// during the attempt, whose transaction then ends before its dot and
	// is made again: more transactions, never a second message
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages delivered, want exactly one", n)
	}
}

// TestParkedBatchThatCannotBeReadIsRetried: a batch that left memory
// while it waited for a retry is read back before it is due. If that
// read fails, the batch stays parked and the read is tried again; the
// message is neither lost nor sent twice.
func TestParkedBatchThatCannotBeReadIsRetried(t *testing.T) {
	forEachStorage(t, testParkedBatchThatCannotBeReadIsRetried)
}

func testParkedBatchThatCannotBeReadIsRetried(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv, fixedBackoff(900*time.Millisecond))
	fastParking(h.engine)
	h.engine.Tunables().UnparkRetry = 200 * time.Millisecond
	gate := refuseMail(srv)
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 202 {
		t.Fatalf("%d %v", rec.Code, out)
	}
	id := out["id"].(string)
	waitParked(t, h, []string{id})
	fs.set(func(f *faultyStorage) { f.load = outbox.KeySt })
	gate.refuse.Store(false)
	time.Sleep(1500 * time.Millisecond) // past the retry, several failed reads
	if n := len(srv.Messages()); n != 0 {
		t.Fatalf("%d messages sent while their batch could not be read", n)
	}
	if resident, parked := residentIDs(h, []string{id}); resident != 0 || parked != 1 {
		t.Fatalf("after failed reads: %d resident, %d parked; want the batch still parked", resident, parked)
	}
	if depth, _ := h.engine.QueueStats(); depth != 1 {
		t.Fatalf("queue depth %d while the batch cannot be read, want 1", depth)
	}
	// the failed read is repeated every unparkRetry (200ms), not sooner
	fs.mu.Lock()
	failures := append([]time.Time(nil), fs.loadFailures...)
	fs.mu.Unlock()
	if len(failures) < 2 {
		t.Fatalf("%d failed reads of the parked batch, want several", len(failures))
	}
	for i := 1; i < len(failures); i++ {
		if gap := failures[i].Sub(failures[i-1]); gap < 180*time.Millisecond {
			t.Fatalf("parked batch read again after %v, want unparkRetry (200ms)", gap)
		}
	}
	fs.set(func(f *faultyStorage) { f.load = "" })
	if st := waitState(t, h, id, status(outbox.Sent)); st.Attempts != 2 {
		t.Fatalf("%d attempts, want 2", st.Attempts)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages, want exactly one", n)
	}
}

// TestRetryThatCannotReadItsBodyIsRetried: a retry reads the message back
// from storage. When that read fails, nothing reaches the SMTP server, the
// attempt is recorded as outbox_unavailable (not as an SMTP failure), and
// the message goes out once the storage answers again.
func TestRetryThatCannotReadItsBodyIsRetried(t *testing.T) {
	forEachStorage(t, testRetryThatCannotReadItsBodyIsRetried)
}

func testRetryThatCannotReadItsBodyIsRetried(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv, fixedBackoff(200*time.Millisecond))
	gate := refuseMail(srv)
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	if rec.Code != 202 {
		t.Fatalf("%d %v", rec.Code, out)
	}
	id := out["id"].(string)
	waitState(t, h, id, func(st outbox.State) bool { return st.Attempts == 1 && st.Status == outbox.Queued })
	fs.set(func(f *faultyStorage) { f.load = outbox.KeySeg })
	gate.refuse.Store(false)
	waitState(t, h, id, func(st outbox.State) bool { return st.LastCode == mailer.CodeOutboxUnavailable })
	if n := gate.mails.Load(); n != 1 {
		t.Fatalf("%d SMTP transactions, want only the first (refused) one", n)
	}
	rec, out = call(t, h, "GET", "/authmail/messages/"+id, "")
	if rec.Code != 200 || out["status"] != "queued" || out["last_error_code"] != "outbox_unavailable" ||
		!strings.Contains(out["last_error"].(string), "could not read the message from storage; nothing was sent") {
		t.Fatalf("status while the body cannot be read: %d %v", rec.Code, out)
	}
	fs.set(func(f *faultyStorage) { f.load = "" })
	st := waitState(t, h, id, status(outbox.Sent))
	if st.LastCode != "" || st.Attempts < 3 {
		t.Fatalf("after the storage recovered: %+v", st)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages delivered, want exactly one", n)
	}
}

// TestPendingIdempotencyRecordWithUnreadableMessage: a retry finds the
// record of a request that reserved its id and may have been accepted
// (the instance stopped before storing the answer). If the message's
// state cannot be read, authmail cannot tell whether it exists: it must
// answer 503 and send nothing, not accept the message again under the
// same id (which could send it twice). Once storage reads again, the
// retry answers for the accepted message.
func TestPendingIdempotencyRecordWithUnreadableMessage(t *testing.T) {
	forEachStorage(t, testPendingIdempotencyRecordWithUnreadableMessage)
}

func testPendingIdempotencyRecordWithUnreadableMessage(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv)
	ctx := context.Background()
	body := `{"to":"a@example.org","code":"1"}`
	r, out := call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: pend-1")
	if r.Code != 200 {
		t.Fatalf("%d %s", r.Code, r.Body)
	}
	id := out["id"].(string)
	keys, _ := h.engine.Storage().List(ctx, outbox.KeyIdem+h.keys[0].tenant, false)
	if len(keys) != 1 {
		t.Fatalf("idempotency records: %v", keys)
	}
	var rec idemRecord
	if err := h.shared.st.getJSON(ctx, keys[0], &rec); err != nil {
		t.Fatal(err)
	}
	rec.State, rec.Status, rec.Body = "pending", 0, nil
	if err := h.shared.st.putJSON(ctx, keys[0], rec); err != nil {
		t.Fatal(err)
	}
	// the batch is no longer in memory (as after a restart) and its
	// state cannot be read
	waitRetired(t, h, id)
	fs.set(func(f *faultyStorage) { f.load = outbox.KeySt })
	r, out = call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: pend-1")
	if r.Code != 503 || out["error_code"] != "outbox_unavailable" {
		t.Fatalf("unreadable message of a pending record: %d %s", r.Code, r.Body)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("%d messages, want the original one only", n)
	}
	fs.set(func(f *faultyStorage) { f.load = "" })
	r, out = call(t, h, "POST", "/authmail/send/otp", body, "Idempotency-Key: pend-1")
	if r.Code != 200 || out["id"] != id || len(srv.Messages()) != 1 {
		t.Fatalf("retry once storage works: %d %s, %d messages", r.Code, r.Body, len(srv.Messages()))
	}
}

// waitRetired waits until the engine no longer holds the message: its
// batch is final and retired, so lookups read storage.
func waitRetired(t *testing.T, h *Handler, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, held := h.engine.Inventory().Resident[id]
		if !held {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s still held in memory", id)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSaltIsReadOnceStorageAnswers: an instance that could not read the
// cluster's hashing salt at start hashes with one of its own, so its
// limits match no peer's; it reads the salt on a later sync round and
// then agrees with the other instances again.
func TestSaltIsReadOnceStorageAnswers(t *testing.T) {
	forEachStorage(t, testSaltIsReadOnceStorageAnswers)
}

func testSaltIsReadOnceStorageAnswers(t *testing.T) {
	old := limitSyncInterval
	limitSyncInterval = 30 * time.Millisecond
	t.Cleanup(func() { limitSyncInterval = old })
	shared := t.TempDir()
	a := newInstance(t, shared).handler()
	a.shared.Start()
	in := newInstance(t, shared)
	fs := &faultyStorage{Storage: openStorage(t, shared)}
	fs.set(func(f *faultyStorage) { f.load = "authmail/salt" })
	b := in.handler(func(h *Handler) { h.storageOverride = fs })
	b.shared.Start()
	if a.shared.limits.Hash("x") == b.shared.limits.Hash("x") || !b.shared.saltTemporary.Load() {
		t.Fatal("with the salt unreadable, the instance should hash with a salt of its own")
	}
	fs.set(func(f *faultyStorage) { f.load = "" })
	deadline := time.Now().Add(5 * time.Second)
	for b.shared.saltTemporary.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the instance never read the cluster's salt")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if a.shared.limits.Hash("x") != b.shared.limits.Hash("x") {
		t.Error("the salt was read but the instances still hash differently")
	}
}

// TestRequestsAnswerWithinDeadlineWhileStorageStalls: with a storage
// that accepts calls and never answers them (ignoring their context),
// every request that needs the storage answers by storageTimeout with a
// 503, and no idempotent send goes out.
func TestRequestsAnswerWithinDeadlineWhileStorageStalls(t *testing.T) {
	prev := storageTimeout
	storageTimeout = 300 * time.Millisecond
	t.Cleanup(func() { storageTimeout = prev })
	srv := authServer(t, smtptest.StartTLS)
	h, fs := faultyHandler(t, srv, withCodes(t), withoutLimits)
	challenge, _ := issueCode(t, h, srv, `{"to":"jane@example.org","code":"auto"}`)
	fs.set(func(f *faultyStorage) { f.stall = "authmail" }) // keys and lock names
	missing := outbox.MessageID(outbox.NewID(time.Now().Add(-time.Hour)), 0)
	for _, c := range []struct{ name, method, path, body, header string }{
		{"idempotent send", "POST", "/authmail/send/otp", otp("ann@example.org"), "Idempotency-Key: stall-1"},
		{"issued code", "POST", "/authmail/send/otp", `{"to":"ann@example.org","code":"auto"}`, ""},
		{"verify", "POST", "/authmail/verify/otp", `{"challenge_id":"` + challenge + `","code":"000000"}`, ""},
		{"status", "GET", "/authmail/messages/" + missing, "", ""},
		{"list", "GET", "/authmail/messages", "", ""},
		{"retry", "POST", "/authmail/messages/" + missing + "/retry", "", ""},
	} {
		type answer struct {
			code int
			out  map[string]any
		}
		done := make(chan answer, 1)
		go func() {
			var hdr []string
			if c.header != "" {
				hdr = []string{c.header}
			}
			rec, out := serveRequest(t, h, apiRequest(c.method, c.path, strings.NewReader(c.body), hdr...))
			done <- answer{rec.Code, out}
		}()
		select {
		case a := <-done:
			if a.code != 503 || a.out["error_code"] != "outbox_unavailable" {
				t.Errorf("%s: %d %v", c.name, a.code, a.out)
			}
		case <-time.After(3 * storageTimeout):
			t.Fatalf("%s: no answer within 3 × the storage deadline", c.name)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Attempts()); n != 0 {
		t.Errorf("%d messages sent while the storage stalled", n)
	}
}
