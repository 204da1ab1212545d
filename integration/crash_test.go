package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// refusingAtMail makes the server answer every MAIL with 421 until the
// returned switch is flipped: no session ever reaches DATA, so nothing
// can have been delivered, and every message stays queued.
func refusingAtMail(srv *smtptest.Server) *atomic.Bool {
	var refusing atomic.Bool
	refusing.Store(true)
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		if refusing.Load() {
			return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "not now"}
		}
		return nil
	}})
	return &refusing
}

// sendN sends n OTPs with Prefer: respond-async to p and returns what
// the client learned; every one must be accepted.
func sendN(t *testing.T, p *caddyProc, tag string, n int) []sendResult {
	t.Helper()
	var out []sendResult
	for i := range n {
		rcpt := fmt.Sprintf("%s-%d@example.org", tag, i)
		req, _ := http.NewRequest(http.MethodPost, p.url("/authmail/send/otp"), strings.NewReader(fmt.Sprintf(`{"to":%q,"code":"%d"}`, rcpt, 100000+i)))
		req.Header.Set("Authorization", "Bearer "+keyApp)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Prefer", "respond-async")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusAccepted {
			t.Fatalf("%s: %d %s", rcpt, res.StatusCode, b)
		}
		var body map[string]any
		_ = json.Unmarshal(b, &body)
		out = append(out, sendResult{rcpt: rcpt, id: body["id"].(string), accepted: true})
	}
	return out
}

// expectAllOnce asserts that every result was delivered exactly once
// and reached "sent" (none unknown), and nothing else arrived.
func expectAllOnce(t *testing.T, srv *smtptest.Server, results []sendResult, states map[string]string) {
	t.Helper()
	time.Sleep(time.Second) // let any duplicate arrive
	per := map[string]int{}
	for _, m := range srv.Messages() {
		per[m.To[0]]++
	}
	unknown := 0
	for _, r := range results {
		if states[r.rcpt] == "unknown" {
			unknown++
		}
		if per[r.rcpt] != 1 || states[r.rcpt] != "sent" {
			t.Errorf("%s: state %s, delivered %d times", r.rcpt, states[r.rcpt], per[r.rcpt])
		}
	}
	if len(per) != len(results) {
		t.Errorf("%d distinct recipients delivered, want %d", len(per), len(results))
	}
	t.Logf("%d accepted, %d delivered, %d unknown", len(results), len(srv.Messages()), unknown)
}

// TestKill9WithQueuedMailLosesNothing: messages accepted while the SMTP
// server refuses every MAIL, then kill -9 at once (claims written, some
// attempts under way, none past MAIL): after a restart every one is
// delivered exactly once. None may end unknown: no final dot was sent.
func TestKill9WithQueuedMailLosesNothing(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refusing := refusingAtMail(srv)
	dataDir, storage := t.TempDir(), t.TempDir()
	a := startCaddy(t, "a", dataDir, storage, srv)
	results := sendN(t, a, "queued", 20)
	a.kill()
	refusing.Store(false)
	a2 := startCaddy(t, "a", dataDir, storage, srv) // same data dir: the same instance
	expectAllOnce(t, srv, results, finalStates(t, a2, results))
}

// TestTakeoverWithQueuedMailLosesNothing: the same with a second
// instance adopting the killed one's work after its lease.
func TestTakeoverWithQueuedMailLosesNothing(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refusing := refusingAtMail(srv)
	storage := t.TempDir()
	a := startCaddy(t, "a", t.TempDir(), storage, srv)
	b := startCaddy(t, "b", t.TempDir(), storage, srv)
	results := sendN(t, a, "orphan", 10)
	a.kill()
	refusing.Store(false)
	expectAllOnce(t, srv, results, finalStates(t, b, results))
}

// TestTwoProcessesOneDataDirectory: two live processes that read the same
// Caddy instance id (one data directory, one storage) must not act as one
// instance: the second runs under an identity of its own. Each queues 20
// messages while the SMTP server refuses; then every one of the 40 is
// delivered exactly once.
func TestTwoProcessesOneDataDirectory(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refusing := refusingAtMail(srv)
	dataDir, storage := t.TempDir(), t.TempDir()
	a := startCaddy(t, "a", dataDir, storage, srv)
	first := sendN(t, a, "first", 20)
	b := startCaddy(t, "b", dataDir, storage, srv)
	second := sendN(t, b, "second", 20)
	time.Sleep(300 * time.Millisecond) // both retry against the refusing server
	refusing.Store(false)
	all := append(append([]sendResult{}, first...), second...)
	states := finalStates(t, a, first)
	for k, v := range finalStates(t, b, second) {
		states[k] = v
	}
	expectAllOnce(t, srv, all, states)
	logs, _ := os.ReadFile(b.log)
	if !strings.Contains(string(logs), "another live process runs the outbox as this Caddy instance") {
		t.Error("the second process did not report taking an identity of its own")
	}
}
