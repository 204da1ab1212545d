package integration

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// TestWebhookBlockListThroughCaddy: webhook URLs at reserved addresses,
// IPv4 embedded in IPv6 included, are refused when the request arrives,
// and nothing is sent.
func TestWebhookBlockListThroughCaddy(t *testing.T) {
	t.Setenv("AUTHMAIL_IT_HOOK_SECRET", secret("it-hook-secret-123"))
	load(t, config{Extra: "webhook_secret {env.AUTHMAIL_IT_HOOK_SECRET}"})
	for _, u := range []string{
		"http://[::7f00:1]/", "http://[::a00:1]/", "http://[64:ff9b:1::7f00:1]/", "http://[2002:7f00:1::1]/",
		"http://[::ffff:127.0.0.1]/", "http://[64:ff9b::a00:1]/", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
		"http://192.0.2.1/", "http://198.51.100.7/", "http://203.0.113.9/", "http://100.64.0.1/", "http://169.254.169.254/",
	} {
		r := post(t, "/authmail/send/otp", fmt.Sprintf(`{"to":"jane@example.org","code":"1","webhook_url":%q}`, u))
		expectError(t, r, 422, "invalid_request", "webhook_url")
	}
}

// TestHangingWebhookHostDelaysNoOtherThroughCaddy: 50 webhooks to a
// receiver that accepts and never answers do not hold up another app's
// webhook to a healthy receiver.
func TestHangingWebhookHostDelaysNoOtherThroughCaddy(t *testing.T) {
	release := make(chan struct{})
	hanging := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer hanging.Close()
	defer close(release)
	var mu sync.Mutex
	var arrived time.Time
	healthy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if arrived.IsZero() {
			arrived = time.Now()
		}
		mu.Unlock()
	}))
	defer healthy.Close()
	t.Setenv("AUTHMAIL_IT_HOOK_SECRET", secret("it-hook-secret-123"))
	load(t, config{Extra: "webhook_secret {env.AUTHMAIL_IT_HOOK_SECRET}\n\t\twebhook_allow_hosts 127.0.0.1"})
	for i := range 50 {
		r := post(t, "/authmail/send/otp", fmt.Sprintf(`{"to":"hang%d@example.org","code":"1","webhook_url":%q}`, i, hanging.URL+"/h"), "Prefer: respond-async")
		if r.status != http.StatusAccepted {
			t.Fatalf("%d %s", r.status, r.raw)
		}
	}
	time.Sleep(300 * time.Millisecond) // the hanging host's slots are taken
	r := post(t, "/authmail/send/otp", fmt.Sprintf(`{"to":"healthy@example.org","code":"1","webhook_url":%q}`, healthy.URL+"/h"))
	sent := time.Now()
	if r.status != http.StatusOK || r.str("status") != "sent" {
		t.Fatalf("%d %s", r.status, r.raw)
	}
	deadline := sent.Add(5 * time.Second)
	for {
		mu.Lock()
		at := arrived
		mu.Unlock()
		if !at.IsZero() {
			if d := at.Sub(sent); d > 2*time.Second {
				t.Fatalf("the healthy webhook arrived %s after its message was sent", d)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the healthy webhook never arrived while 50 others hung")
		}
		time.Sleep(10 * time.Millisecond)
	}
	smtpSrv.ClearMessages()
}
