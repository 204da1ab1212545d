package integration

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// expectAllOnce asserts that every result was delivered exactly once
// and reached "sent": none may be unknown, because no final dot was in
// flight when the instance died.
func expectAllOnce(t *testing.T, srv *smtptest.Server, results []sendResult, states map[string]string) {
	t.Helper()
	if unknown := deliveredOnce(t, srv, results, states); unknown != 0 {
		t.Errorf("%d of %d messages ended unknown although no final dot was in flight", unknown, len(results))
	}
	if n := len(srv.Messages()); n != len(results) {
		t.Errorf("%d messages delivered, want %d", n, len(results))
	}
}

// TestKill9WithQueuedMailLosesNothing: messages accepted while the SMTP
// server refuses every MAIL, then kill -9 at once (claims written, some
// attempts under way, none past MAIL): after a restart every one is
// delivered exactly once. None may end unknown: no final dot was sent.
func TestKill9WithQueuedMailLosesNothing(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refusing := refuseAtMail(srv)
	dataDir, storage := t.TempDir(), t.TempDir()
	a := startCaddy(t, "a", dataDir, storage, srv)
	results := sendQueued(t, []*caddyProc{a}, "queued", 20)
	a.kill()
	refusing.Store(false)
	a2 := startCaddy(t, "a", dataDir, storage, srv) // same data dir: the same instance
	expectAllOnce(t, srv, results, finalStates(t, a2, results))
}

// TestTakeoverWithQueuedMailLosesNothing: the same with a second
// instance adopting the killed one's work after its lease.
func TestTakeoverWithQueuedMailLosesNothing(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
	refusing := refuseAtMail(srv)
	storage := t.TempDir()
	a := startCaddy(t, "a", t.TempDir(), storage, srv)
	b := startCaddy(t, "b", t.TempDir(), storage, srv)
	results := sendQueued(t, []*caddyProc{a}, "orphan", 10)
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
	refusing := refuseAtMail(srv)
	dataDir, storage := t.TempDir(), t.TempDir()
	a := startCaddy(t, "a", dataDir, storage, srv)
	first := sendQueued(t, []*caddyProc{a}, "first", 20)
	b := startCaddy(t, "b", dataDir, storage, srv)
	second := sendQueued(t, []*caddyProc{b}, "second", 20)
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
