package integration

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// authmailGoroutines returns the stacks of live goroutines that run
// authmail code.
func authmailGoroutines() []string {
	var b bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&b, 2)
	var out []string
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, "caddy-authmail/authmail.") && !strings.Contains(g, "/integration.") {
			out = append(out, g)
		}
	}
	return out
}

// TestNothingLeftAfterUnload reloads authmail through the admin API with
// changing SMTP identities, webhooks and limits, sending through each
// config, and then loads a config without authmail: no goroutine may keep
// running authmail code (delivery workers, heartbeats, limit publishers,
// webhook senders, janitors) and no SMTP connection may stay open.
func TestNothingLeftAfterUnload(t *testing.T) {
	var hooked atomic.Int64
	hooks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hooked.Add(1) }))
	defer hooks.Close()
	t.Setenv("AUTHMAIL_IT_HOOK_SECRET", secret("it-leak-hook-secret-1"))
	hook := "webhook_secret {env.AUTHMAIL_IT_HOOK_SECRET}\n\t\twebhook_allow_hosts 127.0.0.1"
	for i := 0; i < 6; i++ {
		c := config{Limits: "auth_failures 10/1m\n\t\trecipient_rate 5/15m"}
		if i%2 == 1 {
			c.HELO = "it2.example"
			c.Extra = hook
		}
		reload(t, c)
		body := fmtJSON(`{"to":"leak%d@example.com","code":"123456"}`, i)
		if i%2 == 1 {
			body = fmtJSON(`{"to":"leak%d@example.com","code":"123456","webhook_url":%q}`, i, hooks.URL)
		}
		if r := post(t, "/authmail/send/otp", body); r.status != 200 {
			t.Fatalf("send %d: %d %s", i, r.status, r.raw)
		}
		call(t, "POST", "/authmail/send/otp", strings.NewReader(`{}`), "Authorization: Bearer wrong")
	}
	// every webhook has arrived before the unload, so that the webhook
	// senders ran
	for deadline := time.Now().Add(10 * time.Second); hooked.Load() < 3 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if n := hooked.Load(); n != 3 {
		t.Errorf("the webhook receiver got %d calls, want 3 (one per message that asked for it)", n)
	}
	// the check below can only see a leak if it sees authmail's
	// goroutines while authmail runs
	if n := len(authmailGoroutines()); n == 0 {
		t.Fatal("no goroutine runs authmail code while it is loaded; the check cannot work")
	}
	loadRaw(t, `{
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1ns
}
http://localhost:9080 {
	respond "bye" 200
}`)
	var left []string
	open := -1
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		left, open = authmailGoroutines(), smtpSrv.OpenConnections()
		if len(left) == 0 && open == 0 {
			break
		}
	}
	if len(left) > 0 {
		t.Errorf("%d goroutines still run authmail code after it was unloaded:\n%s", len(left), strings.Join(left, "\n\n"))
	}
	if open != 0 {
		t.Errorf("%d SMTP connections are still open after authmail was unloaded", open)
	}
}
