package authmail

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// leftBehind writes what an instance that died mid-delivery leaves in
// storage: a batch with one message being sent, two queued and one sent.
func leftBehind(t *testing.T, storageDir, instance string, heartbeatAge time.Duration) (ids []string) {
	t.Helper()
	st := store{s: openStorage(t, storageDir)}
	ctx := context.Background()
	now := time.Now()
	bid := outbox.NewID(now.Add(-time.Minute))
	seg := &outbox.Segment{Batch: bid, Owner: instance, Created: now.Add(-time.Minute)}
	bs := outbox.BatchState{Batch: bid, Owner: instance, Updated: now}
	for i, status := range []string{outbox.Sending, outbox.Queued, outbox.Queued, outbox.Sent} {
		id := outbox.MessageID(bid, i)
		ids = append(ids, id)
		to := fmt.Sprintf("left%d@example.org", i)
		seg.Messages = append(seg.Messages, outbox.StoredMessage{ID: id, From: "no-reply@example.com", To: []string{to},
			Data: []byte("Subject: left behind\r\n\r\nmessage " + id + "\r\n")})
		m := outbox.State{ID: id, KeyID: "app", Flow: "otp", Profile: "no-reply@example.com", MessageID: "<" + id + "@example.com>",
			Recipients: 1, Status: status, Created: now.Add(-time.Minute), Updated: now}
		if status == outbox.Sending {
			m.Attempts = 1
		}
		seg.States = append(seg.States, outbox.State{ID: id, KeyID: "app", Flow: "otp", Profile: m.Profile, MessageID: m.MessageID,
			Recipients: 1, Status: outbox.Queued, Created: m.Created, Updated: m.Created})
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
	must(st.putJSON(ctx, outbox.KeyInst+instance, outbox.Heartbeat{Instance: instance, Updated: now.Add(-heartbeatAge)}))
	return ids
}

// instanceID returns the id a test instance will get.
func instanceID(t *testing.T, in *testInstance) string {
	t.Setenv("XDG_DATA_HOME", in.dataDir)
	id, err := caddy.InstanceID()
	if err != nil {
		t.Fatal(err)
	}
	return id.String()
}

func checkLeftBehindOutcome(t *testing.T, h *Handler, srv *smtptest.Server, ids []string) {
	t.Helper()
	// the message that was being sent when the instance died is unknown:
	// it may have reached the server, so it is not sent again
	st := waitState(t, h, ids[0], status(outbox.Unknown))
	if st.LastCode != mailer.CodeUncertain || st.LastError != mailer.InterruptedError {
		t.Errorf("interrupted message %+v", st)
	}
	waitState(t, h, ids[1], status(outbox.Sent))
	waitState(t, h, ids[2], status(outbox.Sent))
	if s := waitState(t, h, ids[3], status(outbox.Sent)); s.Attempts != 0 {
		t.Errorf("already-sent message was touched: %+v", s)
	}
	time.Sleep(200 * time.Millisecond)
	got := map[string]int{}
	for _, m := range srv.Messages() {
		got[m.To[0]]++
	}
	if len(got) != 2 || got["left1@example.org"] != 1 || got["left2@example.org"] != 1 {
		t.Fatalf("delivered %v; want left1 and left2 exactly once, nothing for left0 and left3", got)
	}
}

func TestOutboxRecoversAfterCrash(t *testing.T) { forEachStorage(t, testOutboxRecoversAfterCrash) }

func testOutboxRecoversAfterCrash(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	ids := leftBehind(t, in.storageDir, instanceID(t, in), time.Hour)
	h := in.handler(withSMTP(t, srv))
	h.shared.Start() // what the authmail app does when the config starts
	checkLeftBehindOutcome(t, h, srv, ids)
}

func TestOutboxAdoptsTheWorkOfADeadInstance(t *testing.T) {
	forEachStorage(t, testOutboxAdoptsTheWorkOfADeadInstance)
}

func testOutboxAdoptsTheWorkOfADeadInstance(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	dead := uuid.NewString()
	ids := leftBehind(t, shared, dead, time.Hour)
	b := newInstance(t, shared).handler(withSMTP(t, srv), withDelivery(func(d *Delivery) { d.Lease = caddy.Duration(300 * time.Millisecond) }))
	b.shared.Start()
	checkLeftBehindOutcome(t, b, srv, ids)
	st := b.shared.st
	ctx := context.Background()
	if owned, _ := st.ownedBatches(ctx, dead); len(owned) != 0 {
		t.Fatalf("the dead instance still owns %v", owned)
	}
	var bs outbox.BatchState
	if err := st.getJSON(ctx, outbox.KeySt+outbox.BatchOf(ids[0]), &bs); err != nil || bs.Owner != b.engine.Instance() {
		t.Fatalf("state owner %q, want %q (%v)", bs.Owner, b.engine.Instance(), err)
	}
	var hb outbox.Heartbeat
	if err := st.getJSON(ctx, outbox.KeyInst+dead, &hb); err != nil || hb.AdoptedBy != b.engine.Instance() {
		t.Fatalf("outbox.Heartbeat %+v %v", hb, err)
	}
}

func TestOutboxLeavesLiveInstancesAlone(t *testing.T) {
	forEachStorage(t, testOutboxLeavesLiveInstancesAlone)
}

func testOutboxLeavesLiveInstancesAlone(t *testing.T) {
	port := smtptest.Silent(t) // nothing gets delivered: A keeps its queue
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	lease := withDelivery(func(d *Delivery) { d.Lease = caddy.Duration(300 * time.Millisecond) })
	silent := func(h *Handler) { h.SMTP.Port, h.SMTP.Timeout = port, caddy.Duration(100*time.Millisecond) }
	a := newInstance(t, shared).handler(withSMTP(t, srv), lease, silent)
	b := newInstance(t, shared).handler(withSMTP(t, srv), lease, silent)
	a.shared.Start()
	b.shared.Start()
	_, out := call(t, a, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: respond-async")
	bid := outbox.BatchOf(out["id"].(string))
	time.Sleep(1500 * time.Millisecond) // five leases
	if owned, _ := a.shared.st.ownedBatches(context.Background(), a.engine.Instance()); len(owned) != 1 || owned[0] != bid {
		t.Fatalf("a live instance lost its batch: %v", owned)
	}
	adopted := b.engine.Inventory().Batches[bid]
	if adopted {
		t.Fatal("a live instance's batch was adopted")
	}
}

func TestOutboxGracefulStopKeepsQueuedMessages(t *testing.T) {
	forEachStorage(t, testOutboxGracefulStopKeepsQueuedMessages)
}

func testOutboxGracefulStopKeepsQueuedMessages(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	addr, certPEM, keyPEM := srv.Addr, srv.CAPEM, srv.KeyPEM
	in := newInstance(t, "")
	h := in.handler(withSMTP(t, srv))
	_ = srv.Close()
	var ids []string
	for i := range 5 {
		_, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("u%d@example.org", i)), "Prefer: respond-async")
		ids = append(ids, out["id"].(string))
	}
	e := h.engine
	_ = h.Cleanup() // the last config goes away: the engine drains and stops
	select {
	case <-e.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the engine did not stop")
	}
	back, err := smtptest.New(smtptest.Options{Addr: addr, CertPEM: certPEM, KeyPEM: keyPEM, Username: "user", Password: "s3cret-pass", Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	h2 := in.handler(withSMTP(t, srv))
	if h2.engine == e {
		t.Fatal("a stopped engine was reused")
	}
	h2.shared.Start()
	for _, id := range ids {
		waitState(t, h2, id, status(outbox.Sent))
	}
	if n := len(back.Messages()); n != 5 {
		t.Fatalf("%d messages after the restart, want 5", n)
	}
}

// holds reports whether the engine holds a batch, in memory or parked.
func holds(e *outbox.Engine, bid string) (resident, parked bool) {
	inv := e.Inventory()
	return inv.Batches[bid], inv.Parked[bid]
}

func TestOutboxDropsWorkAdoptedWhilePaused(t *testing.T) {
	forEachStorage(t, testOutboxDropsWorkAdoptedWhilePaused)
}

func testOutboxDropsWorkAdoptedWhilePaused(t *testing.T) {
	for _, park := range []bool{false, true} {
		t.Run(map[bool]string{false: "resident", true: "parked"}[park], func(t *testing.T) {
			testDropsWorkAdoptedWhilePaused(t, park)
		})
	}
}

func testDropsWorkAdoptedWhilePaused(t *testing.T, park bool) {
	port := smtptest.Silent(t)
	srv := authServer(t, smtptest.StartTLS)
	in := newInstance(t, "")
	h := in.handler(withSMTP(t, srv), func(h *Handler) {
		h.SMTP.Port, h.SMTP.Timeout = port, caddy.Duration(50*time.Millisecond)
		h.Delivery.Lease = caddy.Duration(400 * time.Millisecond)
		h.Delivery.RetryBackoff, h.Delivery.MaxBackoff = caddy.Duration(time.Hour), caddy.Duration(time.Hour)
	})
	if park {
		h.engine.Tunables().ParkEvery = 10 * time.Millisecond
	} else {
		h.engine.Tunables().ParkEvery = time.Hour
	}
	_, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Prefer: wait=1")
	bid := outbox.BatchOf(out["id"].(string))
	deadline := time.Now().Add(5 * time.Second)
	for park {
		if _, parked := holds(h.engine, bid); parked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the batch, deferred for an hour, was not parked")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// another instance adopted the batch while this one was paused: the
	// ownership marker moved
	ctx := context.Background()
	st := h.shared.st
	other := uuid.NewString()
	if err := st.s.Store(ctx, outbox.OwnKey(other, bid), nil); err != nil {
		t.Fatal(err)
	}
	if err := st.s.Delete(ctx, outbox.OwnKey(h.engine.Instance(), bid)); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		resident, parked := holds(h.engine, bid)
		if !resident && !parked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the instance kept a batch another instance adopted")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if depth, _ := h.engine.QueueStats(); depth != 0 {
		t.Errorf("queue depth %d after the only batch was dropped", depth)
	}
	// new work is unaffected
	_, out = call(t, h, "POST", "/authmail/send/otp", otp("new@example.org"), "Prefer: respond-async")
	time.Sleep(600 * time.Millisecond)
	if resident, parked := holds(h.engine, outbox.BatchOf(out["id"].(string))); !resident && !parked {
		t.Fatal("a batch of its own was dropped")
	}
}

// TestListingSurvivesConcurrentDeletes guards against a real bug: file
// storage fails a listing with "not exist" when a key vanishes during
// the walk, which once made an instance believe it owned nothing and
// drop its own batches.
func TestListingSurvivesConcurrentDeletes(t *testing.T) {
	forEachStorage(t, testListingSurvivesConcurrentDeletes)
}

func testListingSurvivesConcurrentDeletes(t *testing.T) {
	st := store{s: openStorage(t, t.TempDir())}
	ctx := context.Background()
	const keep = 50
	for i := range keep {
		if err := st.s.Store(ctx, fmt.Sprintf("%sinst/%s", outbox.KeyOwn, outbox.NewID(time.Now().Add(time.Duration(i)*time.Millisecond))), nil); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			k := fmt.Sprintf("%sinst/%s", outbox.KeyOwn, outbox.NewID(time.Now()))
			_ = st.s.Store(ctx, k, nil)
			_ = st.s.Delete(ctx, k)
		}
	}()
	defer func() { close(stop); <-done }()
	for range 300 {
		owned, err := st.ownedBatches(ctx, "inst")
		if err != nil {
			continue // reported as an error: callers then do nothing
		}
		if len(owned) < keep {
			t.Fatalf("listed %d batches, at least %d exist", len(owned), keep)
		}
	}
	if owned, err := st.ownedBatches(ctx, "nobody"); err != nil || len(owned) != 0 {
		t.Fatalf("absent directory: %v %v", owned, err)
	}
}
