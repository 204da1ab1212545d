package authmail

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/mailtest"
	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// Backup and restore of the outbox, as docs/production.md describes it:
// an instance accepts mail while its SMTP server cannot be reached, its
// storage is copied the way the guide says, and a new instance on
// another machine (another data directory, so another instance id)
// starts on the copy, with the same config, and a server that answers.
// It adopts the old instance's work and delivers every queued message
// exactly once; the code issued in one of them verifies there, and an
// idempotent request answers with its stored message and sends nothing.

// restoreMessages are the requests the first instance accepts, by
// recipient. jane's code is issued by authmail.
var restoreMessages = []struct{ rcpt, path, body, header string }{
	{"ann@example.org", "/authmail/send", `{"to":"ann@example.org","subject":"Receipt 1042","text_body":"Paid."}`, "Idempotency-Key: receipt-1042"},
	{"bob@example.org", "/authmail/send", `{"to":"bob@example.org","subject":"Weekly digest","text_body":"News.","priority":"bulk"}`, ""},
	{"dana@example.org", "/authmail/send/security-alert", `{"to":"dana@example.org","event":"password_changed"}`, ""},
	{"jane@example.org", "/authmail/send/otp", `{"to":"jane@example.org","code":"auto","purpose":"login"}`, ""},
}

// queuedOutbox is an instance whose accepted messages all wait for a
// retry behind an SMTP server that cannot be reached.
type queuedOutbox struct {
	h         *Handler
	ids       map[string]string // recipient → message id
	challenge string            // of jane's issued code
}

// queueBehindUnreachableSMTP accepts restoreMessages on a new instance
// on storageDir (mods may put it on another storage) and returns once
// each message's failed first attempt is in storage. The next attempts
// are seconds away (at least 2.25 s with the jitter), so that a copy
// taken now is taken between attempts, and a restored instance finds
// them due soon: it keeps each message's schedule.
func queueBehindUnreachableSMTP(t *testing.T, storageDir string, mods ...func(*Handler)) *queuedOutbox {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens: every attempt fails at connect
	h := newInstance(t, storageDir).handler(append([]func(*Handler){withCodes(t), withoutLimits, func(h *Handler) {
		h.Capture = ""
		h.SMTP = &SMTP{Host: "127.0.0.1", Port: port, TLS: "none", Timeout: caddy.Duration(time.Second)}
		h.Delivery = &Delivery{RetryBackoff: caddy.Duration(3 * time.Second), MaxBackoff: caddy.Duration(3 * time.Second)}
	}}, mods...)...)
	q := &queuedOutbox{h: h, ids: map[string]string{}}
	for _, m := range restoreMessages {
		headers := []string{"Prefer: respond-async"}
		if m.header != "" {
			headers = append(headers, m.header)
		}
		rec, out := call(t, h, "POST", m.path, m.body, headers...)
		if rec.Code != 202 {
			t.Fatalf("%s: %d %s", m.path, rec.Code, rec.Body)
		}
		q.ids[m.rcpt] = out["id"].(string)
		if c, ok := out["challenge_id"].(string); ok {
			q.challenge = c
		}
	}
	if q.challenge == "" {
		t.Fatal("the OTP's answer has no challenge_id")
	}
	deadline := time.Now().Add(10 * time.Second)
	for rcpt, id := range q.ids {
		for {
			st, ok := storedState(h, id)
			if ok && st.Status == outbox.Queued && st.Attempts == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s (%s): stored state %+v, want queued after one attempt", rcpt, id, st)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return q
}

// deliverRestored starts a new instance on a restored copy (mods put it
// on its storage), with a server that answers, and checks that it
// delivers each message of q exactly once.
func deliverRestored(t *testing.T, q *queuedOutbox, storageDir string, mods ...func(*Handler)) {
	t.Helper()
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, storageDir).handler(append([]func(*Handler){withSMTP(t, srv), withCodes(t), withoutLimits,
		// a short lease, so that the old instance's silent heartbeat
		// gives its work away in seconds
		withDelivery(func(d *Delivery) { d.Lease = caddy.Duration(2 * time.Second) })}, mods...)...)
	h.shared.Start() // what the authmail app does when the config starts
	msgs := srv.WaitMessages(len(q.ids), 30*time.Second)
	time.Sleep(300 * time.Millisecond) // a duplicate would arrive now
	msgs = srv.Messages()
	got := map[string]string{}
	for _, m := range msgs {
		if len(m.To) != 1 {
			t.Fatalf("message to %v", m.To)
		}
		rcpt := m.To[0]
		if _, dup := got[rcpt]; dup {
			t.Fatalf("%s got two messages", rcpt)
		}
		p, err := mailtest.Parse(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		got[rcpt] = p.Text
	}
	if len(got) != len(q.ids) {
		t.Fatalf("delivered to %d recipients, want %d: %v", len(got), len(q.ids), got)
	}
	for rcpt, id := range q.ids {
		if _, ok := got[rcpt]; !ok {
			t.Errorf("nothing delivered to %s", rcpt)
		}
		rec, out := call(t, h, "GET", "/authmail/messages/"+id, "")
		if rec.Code != 200 || out["status"] != "sent" {
			t.Errorf("%s (%s) on the restored instance: %d %s, want sent", rcpt, id, rec.Code, rec.Body)
		}
	}
	// the code issued before the backup verifies after the restore: the
	// codes secret is the same
	m := codeLine.FindStringSubmatch(got["jane@example.org"])
	if m == nil {
		t.Fatalf("no code in jane's mail:\n%s", got["jane@example.org"])
	}
	rec, _ := call(t, h, "POST", "/authmail/verify/otp", `{"challenge_id":"`+q.challenge+`","code":"`+m[1]+`"}`)
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"valid":true`) {
		t.Errorf("verifying the restored code: %d %s", rec.Code, rec.Body)
	}
	// the idempotent request answers with its message, not a new one
	rec, out := call(t, h, "POST", restoreMessages[0].path, restoreMessages[0].body, restoreMessages[0].header, "Prefer: respond-async")
	if rec.Code/100 != 2 || out["id"] != q.ids[restoreMessages[0].rcpt] {
		t.Fatalf("idempotent replay: %d %s, want the stored message %s", rec.Code, rec.Body, q.ids[restoreMessages[0].rcpt])
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Messages()); n != len(q.ids) {
		t.Fatalf("%d messages after the replay, want %d", n, len(q.ids))
	}
}

// TestRestoreFileOutbox restores a copy of a file_system storage folder,
// taken as the guide says: after stopping Caddy, and, as the guide
// allows, while it runs (rsync -a of a live folder), between attempts.
func TestRestoreFileOutbox(t *testing.T) {
	for _, stop := range []bool{true, false} {
		name := "stopped"
		if !stop {
			name = "running"
		}
		t.Run(name, func(t *testing.T) {
			src, dst := t.TempDir(), t.TempDir()
			q := queueBehindUnreachableSMTP(t, src)
			if stop {
				// systemctl stop: the engine gives its claims back and
				// leaves everything in storage
				q.h.engine.Shutdown()
			}
			copyFolder(t, filepath.Join(src, "authmail"), filepath.Join(dst, "authmail"))
			deliverRestored(t, q, dst)
		})
	}
}

// copyFolder copies src to dst as `rsync -a` does: a file that vanishes
// while the copy runs (a write in progress renames its temporary file)
// is left out, not an error.
func copyFolder(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o700)
		}
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestRestoreRedisSnapshot restores a Redis snapshot taken with
// `redis-cli --rdb` while Caddy runs (a snapshot is one instant, like a
// crash) into a new redis-server, loaded the way the guide says.
func TestRestoreRedisSnapshot(t *testing.T) {
	live := redistest.Start(t)
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		msg := "redis-cli is not installed (Debian package redis-tools, which redis-server depends on); the Redis backup test needs it"
		if os.Getenv("AUTHMAIL_REQUIRE_REDIS") == "1" {
			t.Fatal(msg + ", and AUTHMAIL_REQUIRE_REDIS=1")
		}
		t.Skip("SKIPPING: " + msg)
	}
	prefix := redistest.Prefix(t)
	q := queueBehindUnreachableSMTP(t, "", func(h *Handler) { h.storageOverride = live.Storage(t, prefix) })
	host, port, _ := net.SplitHostPort(live.Addr)
	rdb := filepath.Join(t.TempDir(), "authmail.rdb")
	if out, err := exec.Command(cli, "-h", host, "-p", port, "--rdb", rdb).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --rdb: %v\n%s", err, out)
	}
	restored := redistest.StartFromRDB(t, rdb)
	deliverRestored(t, q, "", func(h *Handler) { h.storageOverride = restored.Storage(t, prefix) })
}
