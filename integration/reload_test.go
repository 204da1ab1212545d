package integration

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// reload applies a config through the admin API without resetting the
// SMTP server's counters.
func reload(t *testing.T, c config) {
	t.Helper()
	if c.StorageDir == "" {
		c.StorageDir = storageFor(t)
	}
	caddytest.NewTester(t).InitServer(c.render(), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
}

// reloadNow is reload for tests that do not load traffic concurrently:
// it also drops the client's keep-alive connections to the old server.
func reloadNow(t *testing.T, c config) {
	t.Helper()
	reload(t, c)
	client.CloseIdleConnections()
}

// TestKeyRotationUnderLoad rotates an API key through three admin-API
// reloads while clients keep sending: old key only, both keys, new key
// only. No request may fail, and the SMTP connections must survive the
// reloads (the SMTP identity does not change).
func TestKeyRotationUnderLoad(t *testing.T) {
	v1 := config{Keys: "key old {env.AUTHMAIL_IT_KEY}"}
	v2 := config{Keys: "key old {env.AUTHMAIL_IT_KEY}\n\t\tkey new {env.AUTHMAIL_IT_KEY2}"}
	v3 := config{Keys: "key new {env.AUTHMAIL_IT_KEY2}"}
	load(t, v1)

	var current atomic.Value
	current.Store(keyApp)
	var sent, failed, retried atomic.Int64
	var failures sync.Map
	stop := make(chan struct{})
	wait := workers(stop, func(w, i int) {
		// each request has its own recipient, so the SMTP side can
		// prove that no request was lost or processed twice
		body := fmt.Sprintf(`{"to":"w%d-%d@example.org","code":"%06d"}`, w, i, i)
		for attempt := 0; ; attempt++ {
			req, _ := http.NewRequest(http.MethodPost, baseURL+"/authmail/send/otp", strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+current.Load().(string))
			req.Header.Set("Content-Type", "application/json")
			res, err := client.Do(req)
			if err != nil {
				// A reload closes the old server's idle keep-alive
				// connections; a request written onto one at that
				// instant is never read, and an HTTP client retries it.
				if attempt == 0 {
					retried.Add(1)
					continue
				}
				failed.Add(1)
				failures.Store(err.Error(), true)
				break
			}
			res.Body.Close()
			if res.StatusCode != 200 {
				failed.Add(1)
				failures.Store(fmt.Sprintf("status %d", res.StatusCode), true)
				break
			}
			sent.Add(1)
			break
		}
	})
	waitSent := func(n int64) {
		deadline := time.Now().Add(10 * time.Second)
		for sent.Load() < n && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitSent(50)
	reload(t, v2) // both keys valid
	waitSent(100)
	current.Store(keyOther) // clients switch to the new key
	waitSent(150)
	reload(t, v3) // old key removed
	waitSent(250)
	close(stop)
	wait()

	failures.Range(func(k, _ any) bool { t.Errorf("request failed during rotation: %v", k); return true })
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed during the key rotation", failed.Load(), failed.Load()+sent.Load())
	}
	perRecipient := map[string]int{}
	for _, m := range smtpSrv.Messages() {
		perRecipient[m.To[0]]++
	}
	for rcpt, n := range perRecipient {
		if n != 1 {
			t.Errorf("%s received %d messages; a retried request was processed twice", rcpt, n)
		}
	}
	if int64(len(perRecipient)) != sent.Load() {
		t.Fatalf("the SMTP server received mail for %d recipients, %d requests succeeded", len(perRecipient), sent.Load())
	}
	// connections = 2 in the config; reloads keep using the pooled ones
	if c, a := smtpSrv.Connections(), smtpSrv.Auths(); c > 2 || a > 2 {
		t.Fatalf("%d SMTP connections and %d AUTHs for %d messages over 3 configs; want the 2 pooled connections reused", c, a, sent.Load())
	}
	t.Logf("%d messages over 3 configs on %d SMTP connections; %d requests hit a keep-alive connection closed by a reload and were retried",
		sent.Load(), smtpSrv.Connections(), retried.Load())

	// after the rotation: the old key is refused, the new one works
	smtpSrv.ClearMessages()
	expectError(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`), 401, "unauthorized", "")
	r := call(t, http.MethodPost, "/authmail/send/otp", strings.NewReader(`{"to":"a@example.org","code":"1"}`),
		"Authorization: Bearer "+keyOther, "Content-Type: application/json")
	expectSent(t, r)
}

// TestInFlightSendSurvivesIdentityChange reloads to a config with another
// SMTP identity while a slow send is in flight on the old one: the old
// sender is released, but the send finishes and reports the truth.
func TestInFlightSendSurvivesIdentityChange(t *testing.T) {
	load(t, config{})
	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error {
		once.Do(func() { close(entered) })
		<-release
		return nil
	}})
	done := make(chan response, 1)
	go func() { done <- post(t, "/authmail/send/otp", `{"to":"slow@example.org","code":"1"}`) }()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the send never reached DATA")
	}
	// another helo is another SMTP identity: a new sender, the old one is
	// destructed by the old config's cleanup
	reload(t, config{HELO: "other.example"}) // keeps the in-flight request's connection
	close(release)
	r := <-done
	if r.status != 200 || r.str("status") != "sent" {
		t.Fatalf("the in-flight send failed across the reload: %d %s", r.status, r.raw)
	}
	smtpSrv.SetHooks(smtptest.Hooks{})
	// the new config works on its own connection, and the old connection
	// was closed once its last send finished
	smtpSrv.ClearMessages()
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"after@example.org","code":"2"}`))
	deadline := time.Now().Add(10 * time.Second)
	for smtpSrv.OpenConnections() > 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := smtpSrv.OpenConnections(); n != 1 {
		t.Fatalf("%d SMTP connections open; the old identity's connection should be closed", n)
	}
}
