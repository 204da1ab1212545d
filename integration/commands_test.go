package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// runCmd runs the built caddy binary with args, stdin and extra
// environment, and returns its exit code, stdout and stderr.
func runCmd(t *testing.T, stdin string, env []string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(caddyBinary(t), args...)
	cmd.Env = append(append(os.Environ(), "XDG_DATA_HOME="+filepath.Join(tmpDir, "cmd-data"), "XDG_CONFIG_HOME="+filepath.Join(tmpDir, "cmd-config")), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, out.String(), errb.String()
}

// TestAuthmailTestCommand runs `caddy authmail test` of the built binary
// against the in-process SMTP server: success, a refused recipient, an
// authentication failure, capture mode, and picking one of two handlers;
// nothing starts a server or touches the outbox storage, and no secret is
// printed.
func TestAuthmailTestCommand(t *testing.T) {
	dir := t.TempDir()
	storage := filepath.Join(dir, "outbox")
	capture := filepath.Join(dir, "captured")
	cfg := fmt.Sprintf(`{
	admin off
}

http://mail.example.com {
	authmail {
		smtp 127.0.0.1:%d {
			username mailer
			password {env.AUTHMAIL_IT_SMTP_PASSWORD}
			ca %s
			helo it.example
		}
		from no-reply@example.com "Example App"
		key app {env.AUTHMAIL_IT_KEY}
		storage file_system %s
	}
}

http://dev.example.com {
	authmail {
		path_prefix /mail
		capture %s
		from no-reply@example.com
		key app {env.AUTHMAIL_IT_KEY}
		storage file_system %s
	}
}
`, smtpSrv.Port, smtpSrv.CAFile, storage, capture, storage)
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	smtpSrv.SetHooks(smtptest.Hooks{})
	smtpSrv.Reset()
	test := func(env []string, extra ...string) (int, string, string) {
		return runCmd(t, "", env, append([]string{"authmail", "test", "--config", file, "--adapter", "caddyfile", "--to", "jane@example.org"}, extra...)...)
	}
	noSecrets := func(s string) {
		t.Helper()
		for _, v := range []string{smtpPassword, keyApp, "wrong-Pa55word"} {
			if strings.Contains(s, v) {
				t.Fatalf("output holds a secret:\n%s", s)
			}
		}
	}
	t.Run("two handlers", func(t *testing.T) {
		code, out, errOut := test(nil)
		noSecrets(out + errOut)
		if code != 1 || !strings.Contains(errOut, "the config has 2 authmail handlers (path_prefix /authmail on mail.example.com; path_prefix /mail on dev.example.com); pick one with --path-prefix and/or --site") {
			t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
		}
	})
	t.Run("sent", func(t *testing.T) {
		code, out, errOut := test(nil, "--site", "mail.example.com")
		noSecrets(out + errOut)
		msgs := smtpSrv.Messages()
		if code != 0 || len(msgs) != 1 || msgs[0].To[0] != "jane@example.org" {
			t.Fatalf("exit %d, %d messages\nstdout %s\nstderr %s", code, len(msgs), out, errOut)
		}
		want := regexp.MustCompile(`^handler:       path_prefix /authmail on mail\.example\.com
transport:     smtp 127\.0\.0\.1:\d+ \(starttls\)
dkim:          not signed: dkim is not configured
message_id:    <[^>]+@example\.com>
status:        sent
smtp_response: 2\.0\.0 OK: queued
duration_ms:   \d+
$`)
		if !want.MatchString(out) {
			t.Fatalf("stdout:\n%s", out)
		}
		if !strings.Contains(out, "message_id:    "+headerOf(t, msgs[0].Data, "Message-Id")) {
			t.Fatalf("message_id does not match the message: %s", out)
		}
		smtpSrv.ClearMessages()
	})
	t.Run("recipient refused", func(t *testing.T) {
		smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpErr(550, [3]int{5, 1, 1}, "no such user") }})
		defer smtpSrv.SetHooks(smtptest.Hooks{})
		code, out, errOut := test(nil, "--path-prefix", "/authmail")
		noSecrets(out + errOut)
		if code != 1 || !strings.Contains(out, "status:        failed\nsmtp_response: 550 5.1.1 no such user\n") || !strings.Contains(out, "error_code:    recipient_refused\n") {
			t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
		}
	})
	t.Run("auth failure", func(t *testing.T) {
		code, out, errOut := test([]string{"AUTHMAIL_IT_SMTP_PASSWORD=wrong-Pa55word"}, "--site", "mail.example.com")
		noSecrets(out + errOut)
		if code != 1 || !strings.Contains(out, "error_code:    smtp_auth_failed\n") {
			t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
		}
	})
	t.Run("capture", func(t *testing.T) {
		code, out, errOut := test(nil, "--path-prefix", "/mail")
		files, _ := filepath.Glob(filepath.Join(capture, "*.eml"))
		if code != 0 || len(files) != 1 || !strings.Contains(out, "transport:     capture "+capture+"\n") || !strings.Contains(out, "status:        captured\n") {
			t.Fatalf("exit %d, %d files\nstdout %s\nstderr %s", code, len(files), out, errOut)
		}
	})
	if _, err := os.Stat(storage); !os.IsNotExist(err) {
		t.Errorf("the command touched the outbox storage: %v", err)
	}
	if n := len(smtpSrv.Messages()); n != 0 {
		t.Errorf("%d messages left", n)
	}
}

// TestAuthmailTestCommandSendsWhatTheAPISends: with dkim configured,
// `caddy authmail test` sends the message POST /test sends, signed: the
// received message's signature verifies (go-msgauth, and dkimpy where
// installed), the output names the selector and domain, and its header
// fields and the fields the signature covers are those of the message
// the running handler sends for POST /test with the same config.
func TestAuthmailTestCommandSendsWhatTheAPISends(t *testing.T) {
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	path, record := dkimKeyFile(t, rk)
	c := config{Keys: `key app {env.AUTHMAIL_IT_KEY} {
			allow test
			rate off
		}`, Extra: `dkim {
			domain example.com
			selector s1
			key ` + path + `
		}`, StorageDir: storageFor(t)}
	file := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(file, []byte(c.render()), 0o600); err != nil {
		t.Fatal(err)
	}
	smtpSrv.SetHooks(smtptest.Hooks{})
	smtpSrv.Reset()
	code, out, errOut := runCmd(t, "", nil, "authmail", "test", "--config", file, "--adapter", "caddyfile", "--to", "jane@example.org")
	msgs := smtpSrv.Messages()
	if code != 0 || len(msgs) != 1 {
		t.Fatalf("exit %d, %d messages\nstdout %s\nstderr %s", code, len(msgs), out, errOut)
	}
	if !strings.Contains(out, "\ndkim:          signed with selector s1 for example.com (rsa-sha256; receivers look up s1._domainkey.example.com)\n") {
		t.Errorf("the output does not say how the message was signed:\n%s", out)
	}
	fromCmd := msgs[0].Data
	vs, err := verifyDKIM(fromCmd, record)
	if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.com" {
		t.Fatalf("the command's message does not verify: %v %+v\n%s", err, vs, fromCmd)
	}
	if verified, ok := verifyDKIMpy(t, fromCmd, record); ok && !verified {
		t.Errorf("dkimpy does not verify the command's message")
	}

	load(t, c)
	r := post(t, "/authmail/test", `{"to":"jane@example.org"}`)
	api := smtpSrv.WaitMessages(1, 10*time.Second)
	if r.status != 200 || len(api) != 1 {
		t.Fatalf("POST /test: %d %s, %d messages", r.status, r.raw, len(api))
	}
	apiVs, err := verifyDKIM(api[0].Data, record)
	if err != nil || len(apiVs) != 1 || apiVs[0].Err != nil {
		t.Fatalf("POST /test's message does not verify: %v %+v", err, apiVs)
	}
	if got, want := strings.Join(vs[0].HeaderKeys, ":"), strings.Join(apiVs[0].HeaderKeys, ":"); got != want {
		t.Errorf("the command's signature covers %s\nPOST /test's covers %s", got, want)
	}
	if got, want := headerNames(fromCmd), headerNames(api[0].Data); got != want {
		t.Errorf("the command's message has the header fields %s\nPOST /test's has %s", got, want)
	}
	for _, h := range []string{"From", "To", "Reply-To", "Subject", "Mime-Version"} {
		if got, want := headerOf(t, fromCmd, h), headerOf(t, api[0].Data, h); got != want {
			t.Errorf("%s: the command's %q, POST /test's %q", h, got, want)
		}
	}
}

// headerNames lists a message's header field names in order.
func headerNames(raw []byte) string {
	head, _, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
	var names []string
	for _, line := range strings.Split(string(head), "\r\n") {
		if line == "" || line[0] == ' ' || line[0] == '\t' {
			continue
		}
		name, _, _ := strings.Cut(line, ":")
		names = append(names, name)
	}
	return strings.Join(names, ", ")
}

// TestAuthmailHashKeyCommand: `caddy authmail hash-key` prints the
// sha256: form of the secret on stdin, which a key line accepts.
func TestAuthmailHashKeyCommand(t *testing.T) {
	sum := sha256.Sum256([]byte(keyApp))
	code, out, errOut := runCmd(t, keyApp+"\n", nil, "authmail", "hash-key")
	if code != 0 || out != "sha256:"+hex.EncodeToString(sum[:])+"\n" {
		t.Fatalf("exit %d\nstdout %q\nstderr %s", code, out, errOut)
	}
	code, out, errOut = runCmd(t, "short\n", nil, "authmail", "hash-key")
	if code != 1 || out != "" || !strings.Contains(errOut, "shorter than 16 characters") || strings.Contains(errOut, "short\n") {
		t.Fatalf("exit %d\nstdout %q\nstderr %s", code, out, errOut)
	}
}
