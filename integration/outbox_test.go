package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// status fetches GET /messages/{id} with a key.
func status(t *testing.T, id, key string) response {
	t.Helper()
	return call(t, http.MethodGet, "/authmail/messages/"+id, nil, "Authorization: Bearer "+key)
}

// waitStatus polls the status endpoint until the message has the state.
func waitStatus(t *testing.T, id, want string) response {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		r := status(t, id, keyApp)
		if r.str("status") == want || time.Now().After(deadline) {
			if r.str("status") != want {
				t.Fatalf("message %s: %s, want %s", id, r.raw, want)
			}
			return r
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAsyncAcceptAndStatus(t *testing.T) {
	load(t, config{Extra: "delivery {\n\t\t\tretry_backoff 100ms\n\t\t\tmax_backoff 200ms\n\t\t}"})
	// respond-async: 202 right after the durable write, with a Location
	r := post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"1"}`, "Prefer: respond-async")
	expectQueued(t, r, "")
	if r.header.Get("Preference-Applied") != "respond-async" {
		t.Errorf("Preference-Applied %q", r.header.Get("Preference-Applied"))
	}
	st := waitStatus(t, r.str("id"), "sent")
	if st.json["attempts"] != 1.0 || st.str("message_id") != r.str("message_id") || st.json["next_attempt_at"] != nil {
		t.Errorf("status %s", st.raw)
	}
	m := smtpSrv.WaitMessages(1, 5*time.Second)
	if len(m) != 1 || headerOf(t, m[0].Data, "Message-Id") != r.str("message_id") {
		t.Fatalf("delivered %d", len(m))
	}
	smtpSrv.ClearMessages()
	// the status of another key's message is not found, nor is an unknown id
	expectError(t, status(t, r.str("id"), keyOther), 404, "not_found", "")
	expectError(t, status(t, "0000000000000000000000000000", keyApp), 404, "not_found", "")
	expectError(t, call(t, http.MethodGet, "/authmail/messages/"+r.str("id"), nil), 401, "unauthorized", "")
	expectError(t, call(t, http.MethodPost, "/authmail/messages/"+r.str("id"), nil, "Authorization: Bearer "+keyApp), 405, "method_not_allowed", "")

	// Prefer: wait=1 with a server that takes 2 s: 202 after about 1 s,
	// then sent
	smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { time.Sleep(2 * time.Second); return nil }})
	start := time.Now()
	r = post(t, "/authmail/send/otp", `{"to":"slow@example.org","code":"2"}`, "Prefer: wait=1")
	if d := time.Since(start); d < 900*time.Millisecond || d > 1900*time.Millisecond {
		t.Errorf("Prefer: wait=1 answered after %s", d)
	}
	expectQueued(t, r, "")
	if r.header.Get("Preference-Applied") != "wait=1" {
		t.Errorf("Preference-Applied %q", r.header.Get("Preference-Applied"))
	}
	if s := status(t, r.str("id"), keyApp); s.str("status") != "sending" {
		t.Errorf("while the server is busy: %s", s.raw)
	}
	waitStatus(t, r.str("id"), "sent")
}

func TestIdempotencyThroughCaddy(t *testing.T) {
	load(t, config{})
	body := `{"to":"jane@example.org","code":"777"}`
	var wg sync.WaitGroup
	answers := make([]response, 10)
	for i := range 10 {
		wg.Go(func() {
			answers[i] = post(t, "/authmail/send/otp", body, "Idempotency-Key: order-7-receipt")
		})
	}
	wg.Wait()
	replays := 0
	for i, a := range answers {
		if a.status != 200 || a.str("id") != answers[0].str("id") {
			t.Fatalf("answer %d: %d %s", i, a.status, a.raw)
		}
		if a.header.Get("Idempotent-Replayed") == "true" {
			replays++
		}
	}
	if replays != 9 {
		t.Errorf("%d replays, want 9", replays)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(smtpSrv.Attempts()); n != 1 {
		t.Fatalf("%d messages for 10 identical requests", n)
	}
	smtpSrv.ClearMessages()
	expectError(t, post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"778"}`, "Idempotency-Key: order-7-receipt"), 409, "idempotency_conflict", "")
	expectError(t, post(t, "/authmail/send/otp", body, "Idempotency-Key: "+strings.Repeat("x", 256)), 400, "invalid_idempotency_key", "")
}

func TestWebhookThroughCaddy(t *testing.T) {
	var mu sync.Mutex
	var got []map[string]any
	var sigs []string
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var p map[string]any
		_ = json.Unmarshal(b, &p)
		mu.Lock()
		got = append(got, p)
		sigs = append(sigs, r.Header.Get("webhook-signature"))
		mu.Unlock()
		w.WriteHeader(200)
	}))
	defer recv.Close()
	t.Setenv("AUTHMAIL_IT_HOOK_SECRET", secret("it-hook-secret-123"))
	load(t, config{Extra: "webhook_secret {env.AUTHMAIL_IT_HOOK_SECRET}\n\t\twebhook_allow_hosts 127.0.0.1"})
	r := post(t, "/authmail/send/otp", fmt.Sprintf(`{"to":"jane@example.org","code":"1","webhook_url":%q}`, recv.URL+"/authmail-events"))
	expectSent(t, r)
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0]["id"] != r.str("id") || got[0]["status"] != "sent" || !strings.HasPrefix(sigs[0], "v1,") {
		t.Fatalf("webhooks %v %v", got, sigs)
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		s := status(t, r.str("id"), keyApp)
		if strings.Contains(s.raw, `"webhook":{"status":"delivered","attempts":1}`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status %s", s.raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// the configured secret stays out of the running config
	res, _ := http.Get(adminURL + "/config/")
	cfg, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if strings.Contains(string(cfg), "it-hook-secret-123") {
		t.Fatal("webhook secret in the config")
	}
}

func TestMetricsOnTheAdminEndpoint(t *testing.T) {
	load(t, config{})
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"1"}`))
	reloadNow(t, config{HELO: "reloaded.example"}) // a new config has a new registry
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"2"}`))
	res, err := http.Get(adminURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	text := string(b)
	for _, want := range []string{`caddy_authmail_messages_total{flow="otp",outcome="sent"}`, `caddy_authmail_delivery_attempts_total{result="sent"}`,
		"caddy_authmail_queue_depth ", "caddy_authmail_smtp_connections ", "caddy_authmail_smtp_duration_seconds_bucket"} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(text, "jane@example.org") || strings.Contains(text, "example.org") {
		t.Error("an address in the metrics")
	}
}

// TestReloadStormUnderLoad reloads the config again and again while
// clients send: every accepted message is delivered exactly once.
func TestReloadStormUnderLoad(t *testing.T) {
	base := config{Extra: "delivery {\n\t\t\tretry_backoff 100ms\n\t\t\tmax_backoff 300ms\n\t\t}"}
	load(t, base)
	var accepted sync.Map // recipient -> id
	var failures atomic.Int64
	stop := make(chan struct{})
	wait := workers(stop, func(w, i int) {
		rcpt := fmt.Sprintf("storm-%d-%d@example.org", w, i)
		body := fmt.Sprintf(`{"to":%q,"code":"%d"}`, rcpt, i)
		// clients retry on connection errors with the same
		// Idempotency-Key, which makes retries safe in every case
		for attempt := 0; attempt < 3; attempt++ {
			req, _ := http.NewRequest(http.MethodPost, baseURL+"/authmail/send/otp", strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+keyApp)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", rcpt)
			if w%2 == 0 {
				req.Header.Set("Prefer", "respond-async")
			}
			res, err := client.Do(req)
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			var out map[string]any
			_ = json.Unmarshal(b, &out)
			if res.StatusCode == 200 || res.StatusCode == 202 {
				accepted.Store(rcpt, out["id"])
			} else {
				failures.Add(1)
				t.Errorf("%s: %d %s", rcpt, res.StatusCode, b)
			}
			break
		}
	})
	for i := range 12 {
		time.Sleep(60 * time.Millisecond)
		c := base
		if i%3 == 2 {
			c.HELO = fmt.Sprintf("storm%d.example", i) // a new SMTP identity: a new sender
		} else {
			c.Extra += fmt.Sprintf("\n\t\tapp_name Storm %d", i)
		}
		reload(t, c)
	}
	close(stop)
	wait()
	n := 0
	accepted.Range(func(_, _ any) bool { n++; return true })
	if n < 50 || failures.Load() > 0 {
		t.Fatalf("%d accepted, %d failed", n, failures.Load())
	}
	// every accepted message arrives exactly once
	smtpSrv.WaitMessages(n, 30*time.Second)
	time.Sleep(500 * time.Millisecond)
	per := map[string]int{}
	for _, m := range smtpSrv.Messages() {
		per[m.To[0]]++
	}
	accepted.Range(func(k, v any) bool {
		if per[k.(string)] != 1 {
			t.Errorf("%s (%v) delivered %d times", k, v, per[k.(string)])
		}
		return true
	})
	if len(per) != n {
		t.Errorf("%d recipients got mail, %d were accepted", len(per), n)
	}
	t.Logf("%d messages accepted and delivered exactly once across 12 reloads", n)
}

// TestSMTPOutageThroughCaddy: the SMTP server is down (connections
// refused) while a real Caddy accepts messages; they are queued with
// smtp_connection and retried, and once a server listens on the port
// again each is delivered exactly once.
func TestSMTPOutageThroughCaddy(t *testing.T) {
	down, err := smtptest.New(smtptest.Options{TLS: smtptest.StartTLS, Username: "mailer", Password: smtpPassword, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	addr, certPEM, keyPEM, caFile := down.Addr, down.CAPEM, down.KeyPEM, down.CAFile
	load(t, config{SMTPPort: down.Port, CAFile: caFile, Extra: "delivery {\n\t\t\tretry_backoff 200ms\n\t\t\tmax_backoff 400ms\n\t\t}"})
	_ = down.Close() // the outage begins
	const n = 10
	ids := make([]string, n)
	for i := range n {
		r := post(t, "/authmail/send/otp", fmt.Sprintf(`{"to":"outage%d@example.org","code":"1"}`, i), "Prefer: wait=1")
		expectQueued(t, r, "smtp_connection")
		ids[i] = r.str("id")
	}
	time.Sleep(time.Second) // a few failed retries
	back, err := smtptest.New(smtptest.Options{Addr: addr, CertPEM: certPEM, KeyPEM: keyPEM, TLS: smtptest.StartTLS, Username: "mailer", Password: smtpPassword, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	for _, id := range ids {
		if st := waitStatus(t, id, "sent"); st.json["attempts"].(float64) < 2 {
			t.Errorf("%s sent after %v attempts, want retries", id, st.json["attempts"])
		}
	}
	time.Sleep(500 * time.Millisecond) // a duplicate would arrive now
	seen := map[string]int{}
	for _, m := range back.Messages() {
		seen[m.To[0]]++
	}
	if len(seen) != n {
		t.Fatalf("delivered to %d recipients, want %d", len(seen), n)
	}
	for rcpt, c := range seen {
		if c != 1 {
			t.Errorf("%s got %d copies", rcpt, c)
		}
	}
}
