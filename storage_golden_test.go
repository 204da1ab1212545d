package authmail

import (
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// The storage layout is a promise: an outbox folder written by an
// earlier version (testdata/golden-storage, written by
// TestWriteGoldenStorage and committed) is read by this one, and its
// queued messages are delivered, once each, by an instance that adopts
// the writer's work. The writer's OTP, past its expiry now, is made
// expired instead of sent; its idempotency key still answers with the
// message it made.
//
// The folder was written on a fixed date, so every age it relies on is
// pinned here rather than left to the defaults, or the test would start
// failing on some later day: max_age (its queued messages are not
// failed for age) and idempotency_ttl (its idempotency record still
// answers), both a century.
func TestGoldenStorageIsDelivered(t *testing.T) {
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS("testdata/golden-storage")); err != nil {
		t.Fatal(err)
	}
	srv := authServer(t, smtptest.StartTLS)
	h := newInstance(t, dir).handler(withSMTP(t, srv), withoutLimits, func(h *Handler) {
		h.Delivery = &Delivery{RetryBackoff: caddy.Duration(40 * time.Millisecond), MaxBackoff: caddy.Duration(160 * time.Millisecond),
			MaxAge: caddy.Duration(100 * 365 * 24 * time.Hour), IdempotencyTTL: caddy.Duration(100 * 365 * 24 * time.Hour),
			Lease: caddy.Duration(2 * time.Second)}
	})
	h.shared.Start() // what the authmail app does when the config starts
	want := map[string]string{
		"ann@example.org":  "Receipt 1042",
		"bob@example.org":  "Weekly digest",
		"carl@example.org": "Order 1043 shipped",
		"dana@example.org": "Example security alert: Your password was changed",
	}
	msgs := srv.WaitMessages(len(want), 30*time.Second)
	time.Sleep(300 * time.Millisecond) // a duplicate would arrive now
	msgs = srv.Messages()
	got := map[string]string{}
	for _, m := range msgs {
		if len(m.To) != 1 {
			t.Fatalf("message to %v", m.To)
		}
		if _, dup := got[m.To[0]]; dup {
			t.Fatalf("%s got two messages", m.To[0])
		}
		got[m.To[0]] = subjectOf(string(m.Data))
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("delivered %v, want %v", got, want)
	}
	ids := readGoldenIDs(t)
	for rcpt, id := range ids {
		rec, out := call(t, h, "GET", "/authmail/messages/"+id, "")
		wantStatus := "sent"
		if rcpt == "jane@example.org" {
			wantStatus = "expired"
		}
		if rec.Code != 200 || out["status"] != wantStatus {
			t.Fatalf("%s (%s): %d %s, want %s", rcpt, id, rec.Code, rec.Body, wantStatus)
		}
	}
	// the idempotent request answers with its message, not a new one
	rec, out := call(t, h, "POST", "/authmail/send", goldenIdempotentBody, "Idempotency-Key: order-1043-shipped", "Prefer: respond-async")
	if rec.Code/100 != 2 || out["id"] != ids["carl@example.org"] {
		t.Fatalf("idempotent replay: %d %s, want the stored message %s", rec.Code, rec.Body, ids["carl@example.org"])
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(srv.Messages()); n != len(want) {
		t.Fatalf("%d messages after the replay, want %d", n, len(want))
	}
}

func subjectOf(data string) string {
	for _, line := range strings.Split(data, "\r\n") {
		if s, ok := strings.CutPrefix(line, "Subject: "); ok {
			return s
		}
	}
	return ""
}

const goldenIdempotentBody = `{"to":"carl@example.org","subject":"Order 1043 shipped","text_body":"On its way."}`

// readGoldenIDs reads the message ids the writer recorded.
func readGoldenIDs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile("testdata/golden-storage.ids")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		rcpt, id, _ := strings.Cut(line, " ")
		ids[rcpt] = id
	}
	return ids
}

// TestWriteGoldenStorage writes testdata/golden-storage when
// AUTHMAIL_WRITE_GOLDEN=1: five messages accepted while the SMTP server
// cannot be reached, each attempted once, then the instance stopped.
// The OTP is valid for a minute, so it has expired whenever the folder
// is read.
func TestWriteGoldenStorage(t *testing.T) {
	if os.Getenv("AUTHMAIL_WRITE_GOLDEN") != "1" {
		t.Skip("writes testdata/golden-storage; set AUTHMAIL_WRITE_GOLDEN=1")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens: every attempt fails at connect
	dir := t.TempDir()
	h := newInstance(t, dir).handler(withoutLimits, func(h *Handler) {
		h.Capture = ""
		h.SMTP = &SMTP{Host: "127.0.0.1", Port: port, TLS: "none", Timeout: caddy.Duration(time.Second)}
		// the next attempts are due a few seconds after the folder is
		// written, so that a reader finds them due
		h.Delivery = &Delivery{RetryBackoff: caddy.Duration(5 * time.Second), MaxBackoff: caddy.Duration(5 * time.Second)}
	})
	ids := map[string]string{}
	for _, c := range []struct{ rcpt, path, body, header string }{
		{"jane@example.org", "/authmail/send/otp", `{"to":"jane@example.org","code":"482915","expires_in_minutes":1}`, ""},
		{"ann@example.org", "/authmail/send", `{"to":"ann@example.org","subject":"Receipt 1042","text_body":"Paid."}`, ""},
		{"bob@example.org", "/authmail/send", `{"to":"bob@example.org","subject":"Weekly digest","text_body":"News.","priority":"bulk"}`, ""},
		{"carl@example.org", "/authmail/send", goldenIdempotentBody, "Idempotency-Key: order-1043-shipped"},
		{"dana@example.org", "/authmail/send/security-alert", `{"to":"dana@example.org","event":"password_changed"}`, ""},
	} {
		headers := []string{"Prefer: respond-async"}
		if c.header != "" {
			headers = append(headers, c.header)
		}
		rec, out := call(t, h, "POST", c.path, c.body, headers...)
		if rec.Code != 202 {
			t.Fatalf("%s: %d %s", c.path, rec.Code, rec.Body)
		}
		ids[c.rcpt] = out["id"].(string)
	}
	for _, id := range ids {
		waitState(t, h, id, func(st outbox.State) bool { return st.Status == outbox.Queued && st.Attempts == 1 })
	}
	time.Sleep(500 * time.Millisecond) // the states of the failed attempts are written
	h.engine.Shutdown()
	out := "testdata/golden-storage"
	if err := os.RemoveAll(out); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(out, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for rcpt, id := range ids {
		lines = append(lines, rcpt+" "+id)
	}
	sort.Strings(lines)
	if err := os.WriteFile("testdata/golden-storage.ids", []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = filepath.WalkDir(out, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			t.Log(p)
		}
		return nil
	})
}
