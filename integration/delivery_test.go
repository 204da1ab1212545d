package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
	"github.com/emersion/go-smtp"
)

// expectFailure asserts a 502 answer for a message that reached a final
// state other than sent (failed, or unknown), with the error code, the
// message's ids and a message naming the problem.
func expectFailure(t *testing.T, r response, state, code, inMessage string) {
	t.Helper()
	if r.status != http.StatusBadGateway || r.str("error_code") != code || r.str("status") != state {
		t.Fatalf("got %d %s %s: %s\nwant 502 %s %s", r.status, r.str("status"), r.str("error_code"), r.raw, state, code)
	}
	if !idPattern.MatchString(r.str("id")) || !strings.HasPrefix(r.str("message_id"), "<") {
		t.Errorf("a failed send must report the message's id and message_id: %s", r.raw)
	}
	if !strings.Contains(r.str("message"), inMessage) {
		t.Errorf("message %q lacks %q", r.str("message"), inMessage)
	}
	if r.json["sent"] != nil {
		t.Errorf("error answers carry no sent field: %s", r.raw)
	}
}

// expectQueued asserts a 202 answer: the message is stored and will be
// retried; code is the error of the first attempt ("" for none).
func expectQueued(t *testing.T, r response, code string) {
	t.Helper()
	if r.status != http.StatusAccepted || r.json["sent"] != false || r.str("status") != "queued" || r.str("error_code") != code {
		t.Fatalf("got %d: %s\nwant 202 queued with error_code %q", r.status, r.raw, code)
	}
	if !idPattern.MatchString(r.str("id")) || r.header.Get("Location") != "/authmail/messages/"+r.str("id") {
		t.Errorf("id %q, Location %q", r.str("id"), r.header.Get("Location"))
	}
}

func smtpErr(code int, esc [3]int, msg string) error {
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(esc), Message: msg}
}

func TestSMTPOutcomesThroughCaddy(t *testing.T) {
	load(t, config{})
	body := `{"to":["good@example.org","bad@example.org"],"subject":"s","text_body":"b"}`

	t.Run("recipient refused", func(t *testing.T) {
		smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(to string) error {
			if to == "bad@example.org" {
				return smtpErr(550, [3]int{5, 1, 1}, "mailbox unavailable")
			}
			return nil
		}})
		r := post(t, "/authmail/send", body)
		expectFailure(t, r, "failed", "recipient_refused", "refused 1 of 2 recipients")
		if !strings.Contains(r.str("message"), "550 5.1.1 mailbox unavailable") || !strings.Contains(r.str("message"), "nothing was sent") {
			t.Errorf("message %q", r.str("message"))
		}
		if len(smtpSrv.Attempts()) != 0 {
			t.Fatal("a partially refused message was sent to the accepted recipients")
		}
	})
	t.Run("transient at end of data", func(t *testing.T) {
		smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtpErr(451, [3]int{4, 3, 0}, "try again later") }})
		expectQueued(t, post(t, "/authmail/send", body), "smtp_transient")
	})
	t.Run("rejected at end of data", func(t *testing.T) {
		smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtpErr(554, [3]int{5, 7, 1}, "message refused") }})
		expectFailure(t, post(t, "/authmail/send", body), "failed", "smtp_rejected", "554 5.7.1 message refused")
	})
	t.Run("sender rejected", func(t *testing.T) {
		smtpSrv.SetHooks(smtptest.Hooks{Mail: func(string) error { return smtpErr(553, [3]int{5, 7, 1}, "sender not owned by user") }})
		expectFailure(t, post(t, "/authmail/send", body), "failed", "smtp_rejected", "sender not owned")
	})
	t.Run("connection lost after the final dot", func(t *testing.T) {
		smtpSrv.Reset()
		smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtptest.ErrDrop }})
		expectFailure(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`), "unknown", "smtp_disconnect_uncertain", "may or may not have accepted it")
		if n := len(smtpSrv.Attempts()); n != 1 {
			t.Fatalf("the server saw %d copies; an uncertain message is never resent", n)
		}
	})
	// after all these failures, delivery works on the same server again
	smtpSrv.SetHooks(smtptest.Hooks{})
	smtpSrv.ClearMessages()
	expectSent(t, post(t, "/authmail/send", body))
}

func TestSMTPConnectionFailuresThroughCaddy(t *testing.T) {
	t.Run("auth failed", func(t *testing.T) {
		t.Setenv("AUTHMAIL_IT_BAD_PASSWORD", secret("not-the-password-123"))
		load(t, config{Delivery: fmt.Sprintf("smtp 127.0.0.1:%d {\nusername mailer\npassword {env.AUTHMAIL_IT_BAD_PASSWORD}\nca %s\n}", smtpSrv.Port, smtpSrv.CAFile)})
		r := post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`)
		expectQueued(t, r, "smtp_auth_failed")
		if strings.Contains(r.raw, "not-the-password-123") {
			t.Fatal("password in the answer")
		}
	})
	t.Run("starttls unsupported", func(t *testing.T) {
		plain := smtptest.Start(t, smtptest.Options{TLS: smtptest.None, Username: "mailer", Password: smtpPassword})
		load(t, config{SMTPPort: plain.Port})
		expectQueued(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`), "starttls_unsupported")
		if plain.Auths() != 0 || len(plain.Attempts()) != 0 {
			t.Fatal("credentials or mail went over plaintext")
		}
	})
	t.Run("untrusted certificate", func(t *testing.T) {
		other := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
		load(t, config{CAFile: other.CAFile}) // trusts another CA than the server's
		expectQueued(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`), "smtp_connection")
	})
	t.Run("connection refused", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		load(t, config{SMTPPort: port})
		expectQueued(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`), "smtp_connection")
	})
	t.Run("timeout", func(t *testing.T) {
		load(t, config{SMTPPort: smtptest.Silent(t)})
		start := time.Now()
		expectQueued(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`), "smtp_timeout")
		if d := time.Since(start); d > 4500*time.Millisecond {
			t.Fatalf("took %s with a 3s timeout", d)
		}
	})
	// the log carries one line per failed attempt with the id, flow, key
	// id, code, how long the attempt took, and the recipient domain only
	logs, _ := os.ReadFile(logFile)
	found := false
	for _, line := range strings.Split(string(logs), "\n") {
		if strings.Contains(line, `"msg":"delivery attempt failed; will retry"`) && strings.Contains(line, `"error_code":"smtp_timeout"`) &&
			strings.Contains(line, `"rcpt":["`) && strings.Contains(line, `@example.org"]`) && strings.Contains(line, `"next_attempt_at"`) {
			var f map[string]any
			if err := json.Unmarshal([]byte(line), &f); err != nil {
				t.Fatalf("log line is not JSON: %v", err)
			}
			took, _ := f["duration"].(float64) // seconds, Caddy's encoding
			if f["flow"] != "otp" || f["key_id"] != "app" || f["id"] == "" || took < 2.5 || took > 4.5 {
				t.Errorf("log line misses id, flow, key_id or a duration near the 3s timeout: %s", line)
			}
			found = true
		}
	}
	if !found {
		t.Fatal("no structured log line for the failed attempt")
	}
}

func TestCaptureMode(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "mail")
	load(t, config{Delivery: "capture " + dir})
	r := post(t, "/authmail/send/magic-link", `{"to":"jane@example.org","token":"`+secret("capture-tok-55")+`"}`)
	if r.status != 200 || r.json["sent"] != true || r.str("status") != "captured" {
		t.Fatalf("%d %s", r.status, r.raw)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("capture dir: %v %v", entries, err)
	}
	name := entries[0].Name()
	if !strings.HasSuffix(name, "-"+r.str("id")+".eml") {
		t.Errorf("file name %q lacks the id", name)
	}
	info, _ := entries[0].Info()
	if info.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v, want 0600", info.Mode().Perm())
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", di.Mode().Perm())
	}
	data, _ := os.ReadFile(filepath.Join(dir, name))
	p := parseMail(t, data)
	checkStandardHeaders(t, p)
	checkAlternative(t, p)
	if p.Header.Get("Message-Id") != r.str("message_id") || !strings.Contains(p.Text, "https://app.example.com/magic-link?token=capture-tok-55") {
		t.Errorf("captured message: %s %q", p.Header.Get("Message-Id"), p.Text)
	}
	if smtpSrv.Connections() != 0 {
		t.Fatal("capture mode contacted SMTP")
	}
	// the file starts with the envelope, Bcc included, as a local delivery
	// agent writes it; the headers of the message follow
	os.RemoveAll(dir)
	r = post(t, "/authmail/send", `{"to":"jane@example.org","cc":["cc@example.org"],"bcc":["hidden@example.org"],"subject":"s","text_body":"only text"}`)
	if r.status != 200 || r.str("status") != "captured" {
		t.Fatalf("%d %s", r.status, r.raw)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.eml"))
	if len(files) != 1 {
		t.Fatalf("%d capture files", len(files))
	}
	data, _ = os.ReadFile(files[0])
	if want := "Return-Path: <no-reply@example.com>\r\nDelivered-To: jane@example.org\r\nDelivered-To: cc@example.org\r\nDelivered-To: hidden@example.org\r\n"; !strings.HasPrefix(string(data), want) {
		t.Fatalf("capture file starts with\n%q\nwant\n%q", data[:min(len(data), len(want)+40)], want)
	}
	p = parseMail(t, data)
	if p.Header.Get("Return-Path") != "<no-reply@example.com>" || len(p.Header["Delivered-To"]) != 3 || p.Header.Get("Bcc") != "" {
		t.Errorf("mail tools read the envelope as %v", p.Header)
	}
	// a text-only /send is a single text/plain part, not multipart
	if ct := p.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("text-only /send: Content-Type %q", ct)
	}
	// the log says captured, never sent, for a captured message
	logs, _ := os.ReadFile(logFile)
	var captured, sent bool
	for _, line := range strings.Split(string(logs), "\n") {
		if strings.Contains(line, `"id":"`+r.str("id")+`"`) {
			captured = captured || strings.Contains(line, `"msg":"message captured"`) && strings.Contains(line, `"status":"captured"`)
			sent = sent || strings.Contains(line, `"msg":"message sent"`)
		}
	}
	if !captured || sent {
		t.Errorf("log: captured %v, sent %v", captured, sent)
	}
	// sent mail never carries the capture's envelope headers
	load(t, config{})
	m := expectSent(t, post(t, "/authmail/send", `{"to":"jane@example.org","bcc":["hidden@example.org"],"subject":"s","text_body":"b"}`))
	if sp := parseMail(t, m.Data); sp.Header.Get("Return-Path") != "" || sp.Header.Get("Delivered-To") != "" || strings.Contains(string(m.Data), "hidden@example.org") {
		t.Errorf("sent mail holds envelope headers: %s", m.Data)
	}
	// an unwritable capture directory is a clear 500, nothing half-written
	blocker := filepath.Join(t.TempDir(), "file")
	os.WriteFile(blocker, []byte("x"), 0o600)
	load(t, config{Delivery: "capture " + filepath.Join(blocker, "sub")})
	r = post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"1"}`)
	expectQueued(t, r, "capture_failed")
}

func TestSecretsStayOutOfTheConfig(t *testing.T) {
	load(t, config{})
	res, err := http.Get(adminURL + "/config/")
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := io.ReadAll(res.Body)
	res.Body.Close()
	for _, s := range []string{keyApp, keyOther, smtpPassword} {
		if bytes.Contains(cfg, []byte(s)) {
			t.Fatalf("secret %q in the running config", s)
		}
	}
	for _, want := range []string{`"password":"{env.AUTHMAIL_IT_SMTP_PASSWORD}"`, `"secret":"{env.AUTHMAIL_IT_KEY}"`} {
		if !bytes.Contains(cfg, []byte(want)) {
			t.Fatalf("config lacks %s", want)
		}
	}
	saved, err := os.ReadFile(filepath.Join(tmpDir, "config", "caddy", "autosave.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{keyApp, keyOther, smtpPassword} {
		if bytes.Contains(saved, []byte(s)) {
			t.Fatalf("secret %q in autosave.json", s)
		}
	}
}

func TestBadConfigIsRefusedAndOldConfigKeepsRunning(t *testing.T) {
	load(t, config{})
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`))
	tplDir := t.TempDir()
	os.WriteFile(filepath.Join(tplDir, "otp.subject"), []byte("Your code: {{.Code}}"), 0o600)
	for name, c := range map[string]config{
		"secret in subject template": {Extra: "templates " + tplDir},
		"unset env secret":           {Keys: "key app {env.AUTHMAIL_IT_UNSET_KEY}"},
		"missing ca file":            {CAFile: filepath.Join(tplDir, "nope.pem")},
	} {
		t.Run(name, func(t *testing.T) {
			c.StorageDir = storageFor(t)
			res, err := http.Post(adminURL+"/load", "text/caddyfile", strings.NewReader(c.render()))
			if err != nil {
				t.Fatal(err)
			}
			msg, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode == 200 {
				t.Fatal("a broken config was loaded")
			}
			if bytes.Contains(msg, []byte(keyApp)) || bytes.Contains(msg, []byte(smtpPassword)) {
				t.Fatal("the load error echoes a secret")
			}
			// the previous config still serves
			expectSent(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`))
		})
	}
}
