package authmail

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

func TestJanitorExpiresRecords(t *testing.T) { forEachStorage(t, testJanitorExpiresRecords) }

func testJanitorExpiresRecords(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv), withDelivery(func(d *Delivery) {
		d.Retention = caddy.Duration(50 * time.Millisecond)
		d.IdempotencyTTL = caddy.Duration(50 * time.Millisecond)
	}))
	ctx := context.Background()
	st := h.shared.st
	_, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"), "Idempotency-Key: j-1")
	id := out["id"].(string)
	waitState(t, h, id, status(outbox.Sent))
	// wait for the batch to retire (body deleted)
	deadline := time.Now().Add(5 * time.Second)
	for st.s.Exists(ctx, outbox.KeySeg+outbox.BatchOf(id)) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	// an orphan: a batch written for a request that never got its answer
	h.engine.Tunables().OrphanAge = 50 * time.Millisecond
	orphan := outbox.NewID(time.Now())
	if err := st.putJSON(ctx, outbox.KeySeg+orphan, outbox.Segment{Batch: orphan}); err != nil {
		t.Fatal(err)
	}
	// a batch with work left (the server defers it) must survive
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error { return smtpRefusal(451) }})
	_, live := call(t, h, "POST", "/authmail/send/otp", otp("live@example.org"), "Prefer: respond-async")
	liveBatch := outbox.BatchOf(live["id"].(string))

	time.Sleep(100 * time.Millisecond)
	h.engine.Janitor(ctx)
	if !st.s.Exists(ctx, outbox.KeySeg+liveBatch) {
		t.Fatal("the janitor deleted a batch that is still being retried")
	}
	srv.SetHooks(smtptest.Hooks{})

	if st.s.Exists(ctx, outbox.KeySt+outbox.BatchOf(id)) {
		t.Error("the status record outlived its retention")
	}
	if keys, _ := st.s.List(ctx, strings.TrimSuffix(outbox.KeyIdem, "/"), true); len(keys) != 0 && !allDirs(ctx, st, keys) {
		t.Errorf("idempotency records outlived their TTL: %v", keys)
	}
	if st.s.Exists(ctx, outbox.KeySeg+orphan) {
		t.Error("an orphan batch was kept")
	}
	waitState(t, h, live["id"].(string), status(outbox.Sent))
	// after its status record is gone, the status endpoint says not found
	if rec, _ := call(t, h, "GET", "/authmail/messages/"+id, ""); rec.Code != 404 {
		t.Errorf("expired message: %d", rec.Code)
	}
}

func allDirs(ctx context.Context, st store, keys []string) bool {
	for _, k := range keys {
		if info, err := st.s.Stat(ctx, k); err == nil && info.IsTerminal {
			return false
		}
	}
	return true
}

func TestMetricsSurviveReloads(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv))
	call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	call(t, h, "POST", "/authmail/send/otp", `{"to":"bad"}`)
	// every config load has a new registry; the collectors must show up in
	// each, with the values counted so far
	for range 2 {
		reg := prometheus.NewPedanticRegistry()
		if err := registerMetrics(reg); err != nil {
			t.Fatal(err)
		}
		if err := registerMetrics(reg); err != nil {
			t.Fatal("registering twice must be harmless:", err)
		}
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]*dto.MetricFamily{}
		for _, f := range families {
			got[f.GetName()] = f
		}
		for _, name := range []string{"caddy_authmail_messages_accepted_total", "caddy_authmail_messages_total",
			"caddy_authmail_delivery_attempts_total", "caddy_authmail_smtp_duration_seconds", "caddy_authmail_queue_depth",
			"caddy_authmail_queue_oldest_age_seconds", "caddy_authmail_smtp_connections", "caddy_authmail_requests_rejected_total"} {
			if got[name] == nil {
				t.Errorf("metric %s missing", name)
			}
		}
		if f := got["caddy_authmail_messages_total"]; f != nil && sumCounter(f, "outcome", "sent") < 1 {
			t.Error("no sent message counted")
		}
		if f := got["caddy_authmail_requests_rejected_total"]; f != nil && sumCounter(f, "error_code", "invalid_request") < 1 {
			t.Error("no rejected request counted")
		}
		for _, f := range families {
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if strings.Contains(l.GetValue(), "@") {
						t.Errorf("metric %s has an address as a label value", f.GetName())
					}
				}
			}
		}
	}
}

func sumCounter(f *dto.MetricFamily, label, value string) float64 {
	total := 0.0
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label && l.GetValue() == value {
				total += m.GetCounter().GetValue()
			}
		}
	}
	return total
}

// flakyListing is a file storage whose listings below authmail/own fail
// while fail is set.
type flakyListing struct {
	certmagic.Storage
	fail atomic.Bool
}

func (f *flakyListing) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	if f.fail.Load() && strings.HasPrefix(prefix, strings.TrimSuffix(outbox.KeyOwn, "/")) {
		return nil, errors.New("listing failed")
	}
	return f.Storage.List(ctx, prefix, recursive)
}

func TestJanitorKeepsSegmentsWhenOwnershipCannotBeListed(t *testing.T) {
	forEachStorage(t, testJanitorKeepsSegmentsWhenOwnershipCannotBeListed)
}

func testJanitorKeepsSegmentsWhenOwnershipCannotBeListed(t *testing.T) {
	in := newInstance(t, "")
	flaky := &flakyListing{Storage: openStorage(t, in.storageDir)}
	h := in.handler(func(h *Handler) { h.storageOverride = flaky })
	e := h.engine
	e.Tunables().OrphanAge = time.Millisecond
	ctx := context.Background()
	// a batch accepted but not attempted yet: outbox.Segment and marker, no state
	live := outbox.NewID(time.Now())
	if err := outbox.PutJSON(ctx, e.Storage(), outbox.KeySeg+live, outbox.Segment{Batch: live, Owner: e.Instance()}); err != nil {
		t.Fatal(err)
	}
	if err := e.Storage().Store(ctx, outbox.OwnKey(e.Instance(), live), []byte("x")); err != nil {
		t.Fatal(err)
	}
	// and a true orphan: a outbox.Segment nobody owns
	orphan := outbox.NewID(time.Now())
	if err := outbox.PutJSON(ctx, e.Storage(), outbox.KeySeg+orphan, outbox.Segment{Batch: orphan}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	flaky.fail.Store(true)
	e.Janitor(ctx)
	flaky.fail.Store(false)
	if !e.Storage().Exists(ctx, outbox.KeySeg+live) || !e.Storage().Exists(ctx, outbox.KeySeg+orphan) {
		t.Fatal("the janitor deleted segments although it could not list who owns them")
	}
	e.Janitor(ctx)
	if !e.Storage().Exists(ctx, outbox.KeySeg+live) {
		t.Error("the janitor deleted an owned outbox.Segment")
	}
	if e.Storage().Exists(ctx, outbox.KeySeg+orphan) {
		t.Error("the janitor kept an orphaned outbox.Segment")
	}
}

func TestJanitorForgetsInstancesThatStoppedLongAgo(t *testing.T) {
	forEachStorage(t, testJanitorForgetsInstancesThatStoppedLongAgo)
}

func testJanitorForgetsInstancesThatStoppedLongAgo(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, "").handler(withSMTP(t, srv))
	ctx := context.Background()
	st := h.shared.st
	now := time.Now()
	put := func(key string, v any) {
		t.Helper()
		if err := st.putJSON(ctx, key, v); err != nil {
			t.Fatal(err)
		}
	}
	// stopped eight days ago; its work was adopted, its folder is empty
	put(outbox.KeyInst+"gone", outbox.Heartbeat{Instance: "gone", Updated: now.Add(-8 * 24 * time.Hour), AdoptedBy: "x"})
	put(keyRL+"gone", limiterState{Instance: "gone", Updated: now.Add(-8 * 24 * time.Hour)})
	put(outbox.KeyOwn+"gone/06gzvg12ec1w730q0e162n041r", "x")
	if err := st.s.Delete(ctx, outbox.KeyOwn+"gone/06gzvg12ec1w730q0e162n041r"); err != nil {
		t.Fatal(err)
	}
	// stopped as long ago, but it still owns a batch: adoption comes first
	put(outbox.KeyInst+"owning", outbox.Heartbeat{Instance: "owning", Updated: now.Add(-8 * 24 * time.Hour)})
	put(outbox.KeyOwn+"owning/06gzvg12fc48gnv03ha1pydr1w", "x")
	// stopped an hour ago: kept for a week
	put(outbox.KeyInst+"recent", outbox.Heartbeat{Instance: "recent", Updated: now.Add(-time.Hour)})
	put(keyRL+"recent", limiterState{Instance: "recent", Updated: now.Add(-time.Hour)})
	// markers without any heartbeat: an instance that may be starting
	put(outbox.KeyOwn+"starting/06gzvg12fc48gnv03ha1pydr1x", "x")

	if err := h.engine.WriteHeartbeat(ctx); err != nil {
		t.Fatal(err)
	}

	h.engine.Janitor(ctx)

	for _, k := range []string{outbox.KeyInst + "gone", keyRL + "gone", outbox.KeyOwn + "gone"} {
		if st.s.Exists(ctx, k) {
			t.Errorf("%s outlived its instance by more than a week", k)
		}
	}
	for _, k := range []string{
		outbox.KeyInst + "owning", outbox.KeyOwn + "owning/06gzvg12fc48gnv03ha1pydr1w",
		outbox.KeyInst + "recent", keyRL + "recent",
		outbox.KeyOwn + "starting/06gzvg12fc48gnv03ha1pydr1x",
		outbox.KeyInst + h.engine.Instance(),
	} {
		if !st.s.Exists(ctx, k) {
			t.Errorf("%s was deleted", k)
		}
	}
	ids, err := st.instances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if id == "gone" {
			t.Errorf("the forgotten instance is still listed: %v", ids)
		}
	}
}
