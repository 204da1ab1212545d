package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// The cluster on Redis: three Caddy processes (the repository's binary,
// which has the Redis storage module) share one real redis-server
// through `storage redis { … }` in their authmail blocks, each with its
// own data directory and so its own instance id. lease is short (2s) to
// keep adoption quick.

const redisLease = "2s"

func startRedisCluster(t *testing.T, srv *smtptest.Server) (*redistest.Server, []*caddyProc) {
	t.Helper()
	caddyBinary(t)
	redis := redistest.Start(t)
	storage := fmt.Sprintf("redis {\n\t\t\taddress %s\n\t\t\tkey_prefix %s\n\t\t}", redis.Addr, redistest.Prefix(t))
	var procs []*caddyProc
	for _, name := range []string{"redis-a", "redis-b", "redis-c"} {
		procs = append(procs, startCaddyOn(t, name, t.TempDir(), storage, redisLease, srv))
	}
	return redis, procs
}

// request sends one API request to p and returns the status and JSON
// answer (status 0 when the request itself failed).
func request(c *http.Client, p *caddyProc, method, path, body string, headers ...string) (int, map[string]any) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, p.url(path), rd)
	req.Header.Set("Authorization", "Bearer "+keyApp)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := c.Do(req)
	if err != nil {
		return 0, nil
	}
	defer res.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(res.Body).Decode(&out)
	return res.StatusCode, out
}

// refuseAtMail makes the SMTP server answer 421 at MAIL while refuse is
// set: every attempt fails before anything was sent, so mail stays queued.
func refuseAtMail(srv *smtptest.Server) *atomic.Bool {
	var refuse atomic.Bool
	refuse.Store(true)
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		if refuse.Load() {
			return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "try again later"}
		}
		return nil
	}})
	return &refuse
}

// sendQueued sends n messages round robin to procs, each accepted (202),
// and returns them.
func sendQueued(t *testing.T, procs []*caddyProc, prefix string, n int) []sendResult {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	var results []sendResult
	for i := range n {
		p := procs[i%len(procs)]
		rcpt := fmt.Sprintf("%s-%d@example.org", prefix, i)
		code, out := request(c, p, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":%q,"code":"%d"}`, rcpt, i), "Prefer", "respond-async")
		if code != 202 {
			t.Fatalf("message %d through %s: %d %v", i, p.name, code, out)
		}
		results = append(results, sendResult{rcpt: rcpt, id: out["id"].(string), accepted: true})
	}
	return results
}

// deliveredOnce asserts that every result was delivered exactly once and
// reports how many ended unknown.
func deliveredOnce(t *testing.T, srv *smtptest.Server, results []sendResult, states map[string]string) (unknown int) {
	t.Helper()
	time.Sleep(500 * time.Millisecond) // let any duplicate arrive
	per := map[string]int{}
	for _, m := range srv.Messages() {
		per[m.To[0]]++
	}
	for _, r := range results {
		switch n := per[r.rcpt]; {
		case n > 1:
			t.Errorf("%s delivered %d times", r.rcpt, n)
		case states[r.rcpt] == "unknown":
			unknown++
		case states[r.rcpt] != "sent" || n != 1:
			t.Errorf("%s: state %s, delivered %d times", r.rcpt, states[r.rcpt], n)
		}
	}
	return unknown
}

// TestRedisClusterDeliversOnceAndAnswersAlike: messages sent round robin
// over three instances are delivered exactly once; every instance
// reports the same status for every message; concurrent identical
// idempotent requests spread over the three make one message.
func TestRedisClusterDeliversOnceAndAnswersAlike(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	_, procs := startRedisCluster(t, srv)
	results := sendQueued(t, procs, "rr", 60)
	states := finalStates(t, procs[1], results)
	if unknown := deliveredOnce(t, srv, results, states); unknown != 0 {
		t.Errorf("%d messages unknown without any crash", unknown)
	}
	c := &http.Client{Timeout: 10 * time.Second}
	for _, r := range results {
		for _, p := range procs {
			code, out := request(c, p, "GET", "/authmail/messages/"+r.id, "")
			if code != 200 || out["status"] != "sent" || out["id"] != r.id {
				t.Fatalf("status of %s through %s: %d %v", r.id, p.name, code, out)
			}
		}
	}

	// 30 identical idempotent requests at once, 10 per instance
	srv.Reset()
	var wg sync.WaitGroup
	codes, ids := make([]int, 30), make([]string, 30)
	start := time.Now()
	for i := range 30 {
		wg.Go(func() {
			code, out := request(c, procs[i%3], "POST", "/authmail/send/otp", `{"to":"idem@example.org","code":"424242"}`, "Idempotency-Key", "cluster-retry-1")
			codes[i] = code
			ids[i], _ = out["id"].(string)
		})
	}
	wg.Wait()
	took := time.Since(start)
	for i := range 30 {
		if codes[i] != 200 || ids[i] == "" || ids[i] != ids[0] {
			t.Fatalf("idempotent request %d through %s: %d id %q (first %q)", i, procs[i%3].name, codes[i], ids[i], ids[0])
		}
	}
	time.Sleep(500 * time.Millisecond)
	if n := len(srv.Messages()); n != 1 {
		t.Fatalf("30 identical idempotent requests over 3 instances made %d messages, want 1", n)
	}
	t.Logf("60 messages round robin delivered once each; 30 concurrent identical idempotent requests over 3 instances: one message, all answered in %s", took.Round(time.Millisecond))

	// a reload loads the storage module anew and cleans up the old one
	// (which closes its Redis client); the outbox goes on on the new one
	reloadProc(t, procs[0])
	srv.Reset()
	after := sendQueued(t, procs[:1], "after-reload", 10)
	states = finalStates(t, procs[0], after)
	if unknown := deliveredOnce(t, srv, after, states); unknown != 0 {
		t.Errorf("%d messages unknown after a reload", unknown)
	}
}

// reloadProc makes p load its Caddyfile again through the admin API, forced
// (Caddy skips a reload of an unchanged config otherwise).
func reloadProc(t *testing.T, p *caddyProc) {
	t.Helper()
	cfg, err := os.ReadFile(p.cfgFile)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/load", p.admin), strings.NewReader(string(cfg)))
	req.Header.Set("Content-Type", "text/caddyfile")
	req.Header.Set("Cache-Control", "must-revalidate")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("reloading %s: %d %s", p.name, res.StatusCode, b)
	}
	// the reload closes the old server's keep-alive connections; a
	// request written onto one of them at that moment is never read
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}

// TestRedisClusterAdoptsTheQueueOfAKilledInstance: an instance with
// queued mail (the SMTP server refuses with 421 at MAIL) is killed; the
// other two adopt its messages once its lease lapses and deliver every
// one exactly once.
func TestRedisClusterAdoptsTheQueueOfAKilledInstance(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refuse := refuseAtMail(srv)
	_, procs := startRedisCluster(t, srv)
	results := sendQueued(t, procs[:1], "adopt", 30)
	time.Sleep(500 * time.Millisecond) // a few refused attempts and retries
	procs[0].kill()
	refuse.Store(false)
	start := time.Now()
	states := finalStates(t, procs[2], results)
	t.Logf("the 30 messages of the killed instance were final %s after the kill", time.Since(start).Round(time.Millisecond))
	unknown := deliveredOnce(t, srv, results, states)
	adopted := false
	for _, p := range procs[1:] {
		logs, _ := os.ReadFile(p.log)
		adopted = adopted || strings.Contains(string(logs), "adopted the unfinished messages of an instance whose heartbeat lapsed")
	}
	if !adopted {
		t.Error("no instance logged adopting the killed instance's messages")
	}
	// Every attempt was refused at MAIL, so no final dot was ever sent:
	// none of the 30 can have been delivered, and none may end unknown
	// (the killed instance's claims without a dot mark are retried)
	if unknown != 0 {
		t.Errorf("%d of 30 messages ended unknown although every attempt was refused at MAIL", unknown)
	}
}

// TestRedisOutageAnswers503AndLosesNothing: while Redis is down, a send
// is answered 503 outbox_unavailable within a few seconds, never 2xx;
// once Redis is back, everything accepted before the outage is
// delivered exactly once.
func TestRedisOutageAnswers503AndLosesNothing(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refuse := refuseAtMail(srv)
	redis, procs := startRedisCluster(t, srv)
	results := sendQueued(t, procs, "outage", 30)
	redis.Stop()
	c := &http.Client{Timeout: 30 * time.Second}
	var slowest time.Duration
	for i := range 6 {
		p := procs[i%3]
		start := time.Now()
		code, out := request(c, p, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":"during-%d@example.org","code":"1"}`, i))
		took := time.Since(start)
		slowest = max(slowest, took)
		if code != 503 || out["error_code"] != "outbox_unavailable" {
			t.Errorf("send through %s with Redis down: %d %v (after %s), want 503 outbox_unavailable", p.name, code, out, took)
		}
		if took > 5*time.Second {
			t.Errorf("send through %s with Redis down took %s to be refused", p.name, took)
		}
	}
	t.Logf("with Redis down, sends were refused with 503 within %s", slowest.Round(time.Millisecond))
	time.Sleep(3 * time.Second) // longer than the lease: every heartbeat lapses meanwhile
	redis.Start()
	refuse.Store(false)
	states := finalStates(t, procs[0], results)
	if unknown := deliveredOnce(t, srv, results, states); unknown != 0 {
		t.Errorf("%d of 30 messages ended unknown after the outage; every attempt before it was refused at MAIL", unknown)
	}
	for _, m := range srv.Messages() {
		if strings.HasPrefix(m.To[0], "during-") {
			t.Errorf("%s, refused with 503 during the outage, was delivered", m.To[0])
		}
	}
}
