package authmail

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestOutboxSurvivesAReloadOfItsStorageModule: a reload loads the
// storage module again, and Caddy then cleans up the old config's
// modules; the Redis module's Cleanup closes its client. The outbox
// engine outlives the reload (one per storage), so it must not keep
// using the client of the config it was first provisioned with: after the
// old config is gone, mail is still accepted and delivered.
func TestOutboxSurvivesAReloadOfItsStorageModule(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	redis := redistest.Start(t)
	storage := json.RawMessage(redis.StorageJSON(redistest.Prefix(t)))
	in := newInstance(t, "")
	load := func() (*Handler, context.CancelFunc) {
		t.Helper()
		t.Setenv("AUTHMAIL_UNIT_KEY", "0123456789abcdef0123")
		t.Setenv("XDG_DATA_HOME", in.dataDir)
		h := &Handler{From: "no-reply@example.com", BaseURL: "https://app.example.com",
			Keys: []Key{{ID: "app", Secret: "{env.AUTHMAIL_UNIT_KEY}"}}, StorageRaw: storage}
		withSMTP(t, srv)(h)
		pctx, err := caddy.ProvisionContext(&caddy.Config{})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := caddy.NewContext(pctx)
		if err := h.Provision(ctx); err != nil {
			cancel()
			t.Fatal(err)
		}
		if err := h.Validate(); err != nil {
			cancel()
			t.Fatal(err)
		}
		return h, cancel
	}
	first, cancelFirst := load()
	e := first.engine
	e.Start()
	t.Cleanup(func() {
		e.Shutdown()
		<-e.Done()
	})
	if rec, out := call(t, first, "POST", "/authmail/send/otp", otp("one@example.org")); rec.Code != 200 || out["status"] != "sent" {
		t.Fatalf("before the reload: %d %v", rec.Code, out)
	}
	second, cancelSecond := load()
	defer cancelSecond()
	defer func() { _ = second.Cleanup() }()
	if second.engine != e {
		t.Fatal("the reload made a second outbox engine for the same storage")
	}
	// the old config goes: its handler, then its modules (the storage
	// module's Cleanup closes its Redis client)
	_ = first.Cleanup()
	cancelFirst()
	if rec, out := call(t, second, "POST", "/authmail/send/otp", otp("two@example.org")); rec.Code != 200 || out["status"] != "sent" {
		t.Fatalf("after the reload: %d %v", rec.Code, out)
	}
	if m := srv.WaitMessages(2, 5*time.Second); len(m) != 2 {
		t.Fatalf("%d messages delivered, want 2", len(m))
	}
}
