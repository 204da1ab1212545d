package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/mailtest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// Conformance with real mail servers: a private Postfix instance as a
// submission server (STARTTLS with a test certificate, SASL through
// Dovecot, PIPELINING and CHUNKING offered, its own queue, relaying to
// an in-process sink) and Mailpit (STARTTLS, AUTH, REST API). Every flow
// goes through each; the delivered bytes must carry a DKIM signature that
// verifies, and Postfix's log must show TLS, the SASL user and one
// delivery per message.
//
// Each server is a subtest that runs when its server is there: the
// Postfix one needs root (Postfix's master), postfix and dovecot, the
// Mailpit one mailpit (PATH, or AUTHMAIL_MAILPIT). A subtest whose server
// is missing skips, loudly, naming what to install, and the other still
// runs; AUTHMAIL_REQUIRE_CONFORMANCE=1 (CI) turns every such skip into a
// failure.

// requireTool skips the part of the conformance test that needs what,
// unless ok, naming what to install.
func requireTool(t *testing.T, part, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("AUTHMAIL_REQUIRE_CONFORMANCE") == "1" {
		t.Fatalf("conformance with %s: %s is missing and AUTHMAIL_REQUIRE_CONFORMANCE=1", part, what)
	}
	t.Skipf("SKIPPING the conformance test with %s: %s is missing (AUTHMAIL_REQUIRE_CONFORMANCE=1 makes this a failure)", part, what)
}

func lookTool(name string, env string) string {
	if v := os.Getenv(env); env != "" && v != "" {
		return v
	}
	p, _ := exec.LookPath(name)
	if p == "" {
		for _, d := range []string{"/usr/sbin", "/usr/local/sbin", "/usr/local/bin"} {
			if _, err := os.Stat(filepath.Join(d, name)); err == nil {
				return filepath.Join(d, name)
			}
		}
	}
	return p
}

func waitPort(t *testing.T, port int, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 200*time.Millisecond)
		if err == nil {
			_ = c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not listen on %d", what, port)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runTool runs a command with its output in a file, not a pipe: a
// daemon that forks keeps the pipe open and a pipe would never close.
func runTool(t *testing.T, name string, args ...string) {
	t.Helper()
	f, err := os.CreateTemp("", "amcf-out-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(f.Name())
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// conformanceFlows are the requests of every flow; email-change sends two
// messages (to the new address and a notice to the old one).
var conformanceFlows = []struct{ path, body string }{
	{"/authmail/send/otp", `{"to":"jane@example.org","code":"492817"}`},
	{"/authmail/send/magic-link", `{"to":"jane@example.org","token":"cf-magic-token-1"}`},
	{"/authmail/send/password-reset", `{"to":"jane@example.org","token":"cf-reset-token-1"}`},
	{"/authmail/send/verify-email", `{"to":"jane@example.org","token":"cf-verify-token-1"}`},
	{"/authmail/send/email-change", `{"to":"new@example.org","old_email":"old@example.org","token":"cf-change-token-1"}`},
	{"/authmail/send/security-alert", `{"to":"jane@example.org","event":"password_changed"}`},
	{"/authmail/send", `{"to":"Jane <jane@example.org>","cc":"bob@example.net","subject":"Receipt ✓ für Jörg","text_body":"Thanks.\n.leading dot\n","html_body":"<p>Thanks ✓</p>","list_unsubscribe":"<https://app.example.com/u?x=1>","list_unsubscribe_post":"List-Unsubscribe=One-Click"}`},
}

const conformanceMessages = 8

// sendAllFlows sends every flow through the loaded config.
func sendAllFlows(t *testing.T) {
	t.Helper()
	for _, f := range conformanceFlows {
		for _, s := range []string{"cf-magic-token-1", "cf-reset-token-1", "cf-verify-token-1", "cf-change-token-1", "492817"} {
			secret(s)
		}
		r := post(t, f.path, f.body)
		if r.status != 200 || r.json["sent"] != true {
			t.Fatalf("%s: %d %s", f.path, r.status, r.raw)
		}
	}
}

// checkArrived verifies each delivered message: one DKIM signature that
// verifies (so neither server changed a signed header or the body), the
// From, and a parseable MIME structure.
func checkArrived(t *testing.T, where string, raws [][]byte, record string) {
	t.Helper()
	if len(raws) != conformanceMessages {
		t.Fatalf("%s: %d messages arrived, want %d", where, len(raws), conformanceMessages)
	}
	for _, raw := range raws {
		vs, err := verifyDKIM(raw, record)
		if err != nil || len(vs) != 1 || vs[0].Err != nil {
			t.Fatalf("%s: DKIM does not verify (%v %+v):\n%s", where, err, vs, raw)
		}
		m, err := mailtest.Parse(raw)
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		if m.Header.Get("From") != `"Example App" <no-reply@example.com>` {
			t.Fatalf("%s: From %q", where, m.Header.Get("From"))
		}
	}
}

func TestConformancePostfixAndMailpit(t *testing.T) {
	// short paths: unix socket names are limited to 108 bytes
	dir, err := os.MkdirTemp("", "amcf-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	_ = os.Chmod(dir, 0o755)

	// the test CA's certificate for 127.0.0.1, shared by Postfix and Mailpit
	certSrv := smtptest.Start(t, smtptest.Options{TLS: smtptest.None})
	crt, key := filepath.Join(dir, "cf-cert.pem"), filepath.Join(dir, "cf-key.pem")
	_ = os.WriteFile(crt, certSrv.CAPEM, 0o644)
	_ = os.WriteFile(key, certSrv.KeyPEM, 0o600)
	_ = certSrv.Close()

	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	dkimPath, record := dkimKeyFile(t, rk)
	const pw = "cf-Submission-pw-42"
	t.Setenv("AUTHMAIL_IT_CF_PASSWORD", secret(pw))

	conf := func(port int) config {
		return config{
			Delivery: fmt.Sprintf(`smtp 127.0.0.1:%d {
			username mailer
			password {env.AUTHMAIL_IT_CF_PASSWORD}
			ca %s
			helo it.example
			timeout 5s
		}`, port, crt),
			Extra: `dkim {
			domain example.com
			selector s1
			key ` + dkimPath + `
		}`,
		}
	}

	t.Run("postfix", func(t *testing.T) {
		const part = "real Postfix and Dovecot"
		postfix, dovecot := lookTool("postfix", ""), lookTool("dovecot", "")
		requireTool(t, part, "postfix (apt-get install postfix)", postfix != "")
		requireTool(t, part, "dovecot (apt-get install dovecot-core)", dovecot != "")
		requireTool(t, part, "root (Postfix's master runs as root)", os.Geteuid() == 0)
		_, errPF := user.Lookup("postfix")
		_, errDC := user.Lookup("dovecot")
		requireTool(t, part, "the postfix and dovecot users (apt-get install postfix dovecot-core creates them)", errPF == nil && errDC == nil)
		testConformancePostfix(t, dir, postfix, dovecot, crt, key, pw, conf, record)
	})

	t.Run("mailpit", func(t *testing.T) {
		mailpit := lookTool("mailpit", "AUTHMAIL_MAILPIT")
		requireTool(t, "Mailpit", "mailpit (./scripts/test.sh offers to build it; or go install github.com/axllent/mailpit@v1.33.1 and set AUTHMAIL_MAILPIT=<its path>)", mailpit != "")
		testConformanceMailpit(t, dir, mailpit, crt, key, conf, record)
	})
}

// testConformancePostfix starts Dovecot and Postfix, sends every flow
// through Postfix and checks what arrived and Postfix's log.
func testConformancePostfix(t *testing.T, dir, postfix, dovecot, crt, key, pw string, conf func(int) config, record string) {
	// Dovecot: SASL only, no mail protocols
	dc := filepath.Join(dir, "dc")
	for _, d := range []string{"run", "state"} {
		_ = os.MkdirAll(filepath.Join(dc, d), 0o755)
	}
	_ = os.WriteFile(filepath.Join(dc, "users"), []byte("mailer:{PLAIN}"+pw+"\n"), 0o644)
	dcConf := filepath.Join(dc, "dovecot.conf")
	_ = os.WriteFile(dcConf, []byte(fmt.Sprintf(`base_dir = %[1]s/run
state_dir = %[1]s/state
protocols =
log_path = %[1]s/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {
  driver = passwd-file
  args = scheme=PLAIN %[1]s/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=%[1]s
}
service auth {
  unix_listener auth-postfix {
    mode = 0666
  }
}
`, dc)), 0o644)
	// in the foreground, so that the test owns the process and stops it
	dcCmd := exec.Command(dovecot, "-F", "-c", dcConf)
	dcLog, _ := os.Create(filepath.Join(dc, "stdout.log"))
	dcCmd.Stdout, dcCmd.Stderr = dcLog, dcLog
	if err := dcCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dcCmd.Process.Kill(); _ = dcCmd.Wait() })
	sock := filepath.Join(dc, "run", "auth-postfix")
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 200 {
			t.Fatal("dovecot's auth socket did not appear")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Postfix: a submission listener relaying to an in-process sink
	sink := smtptest.Start(t, smtptest.Options{TLS: smtptest.None})
	pf := filepath.Join(dir, "pf")
	for _, d := range []string{"etc", "queue", "data"} {
		_ = os.MkdirAll(filepath.Join(pf, d), 0o755)
	}
	runTool(t, "chown", "postfix", filepath.Join(pf, "data"))
	pfPort := freePort(t)
	maillog := filepath.Join(pf, "maillog")
	_ = os.WriteFile(filepath.Join(pf, "etc", "main.cf"), []byte(fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = submission.test
mydestination =
local_recipient_maps =
relayhost = [127.0.0.1]:%[2]d
mynetworks = 127.0.0.0/8
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_chain_files = %[3]s, %[4]s
smtpd_tls_loglevel = 1
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = %[5]s
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtp_tls_security_level = none
maillog_file_prefixes = %[1]s
maillog_file = %[6]s
`, pf, sink.Port, key, crt, sock, maillog)), 0o644)
	_ = os.WriteFile(filepath.Join(pf, "etc", "master.cf"), []byte(fmt.Sprintf(`127.0.0.1:%d inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
`, pfPort)), 0o644)
	runTool(t, postfix, "-c", filepath.Join(pf, "etc"), "check")
	runTool(t, postfix, "-c", filepath.Join(pf, "etc"), "start")
	t.Cleanup(func() { _ = exec.Command(postfix, "-c", filepath.Join(pf, "etc"), "stop").Run() })
	waitPort(t, pfPort, "postfix")

	load(t, conf(pfPort))
	sendAllFlows(t)
	msgs := sink.WaitMessages(conformanceMessages, 20*time.Second)
	var raws [][]byte
	for _, m := range msgs {
		raws = append(raws, m.Data)
		if !bytes.HasPrefix(m.Data, []byte("Received: ")) {
			t.Fatalf("Postfix added no Received:\n%s", m.Data)
		}
	}
	checkArrived(t, "postfix", raws, record)
	// Postfix's own account of the sessions
	var logText string
	for i := 0; i < 100; i++ {
		b, _ := os.ReadFile(maillog)
		logText = string(b)
		if strings.Count(logText, "status=sent") >= conformanceMessages+1 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	// one relay delivery per message (the /send message has two
	// recipients, so two status=sent lines with one queue id)
	sent := map[string]bool{}
	for _, m := range regexp.MustCompile(`postfix/smtp\[\d+\]: (\w+): to=<[^>]+>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent`).FindAllStringSubmatch(logText, -1) {
		sent[m[1]] = true
	}
	if len(sent) != conformanceMessages || strings.Count(logText, "status=sent") != conformanceMessages+1 {
		t.Fatalf("postfix log: %d messages delivered (%d status=sent), want %d (%d)\n%s", len(sent), strings.Count(logText, "status=sent"), conformanceMessages, conformanceMessages+1, logText)
	}
	if n := len(regexp.MustCompile(`smtpd\[\d+\]: \w+: client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=mailer`).FindAllString(logText, -1)); n != conformanceMessages {
		t.Fatalf("postfix log: %d authenticated submissions, want %d\n%s", n, conformanceMessages, logText)
	}
	if !regexp.MustCompile(`TLS connection established from localhost\[127\.0\.0\.1\]: TLSv1\.3`).MatchString(logText) {
		t.Fatalf("postfix log shows no TLS 1.3 session:\n%s", logText)
	}
	// from authmail's first session on (the port probe before it
	// connected and hung up)
	_, sessions, _ := strings.Cut(logText, "TLS connection established")
	for _, bad := range []string{"improper command pipelining", "warning: non-SMTP command", "lost connection after", "warning:"} {
		if strings.Contains(sessions, bad) {
			t.Fatalf("postfix log: %q\n%s", bad, logText)
		}
	}
	if strings.Contains(logText, pw) {
		t.Fatal("postfix log holds the password")
	}
}

// testConformanceMailpit starts Mailpit, sends every flow through it and
// checks what its API holds.
func testConformanceMailpit(t *testing.T, dir, mailpit, crt, key string, conf func(int) config, record string) {
	// Mailpit: STARTTLS and AUTH, REST API
	mpSMTP, mpHTTP := freePort(t), freePort(t)
	mp := exec.Command(mailpit, "--smtp", fmt.Sprintf("127.0.0.1:%d", mpSMTP), "--listen", fmt.Sprintf("127.0.0.1:%d", mpHTTP),
		"--database", filepath.Join(dir, "mailpit.db"), "--disable-version-check", "--smtp-disable-rdns",
		"--smtp-auth-accept-any", "--smtp-require-starttls", "--smtp-tls-cert", crt, "--smtp-tls-key", key)
	mpLog, _ := os.Create(filepath.Join(dir, "mailpit.log"))
	mp.Stdout, mp.Stderr = mpLog, mpLog
	if err := mp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mp.Process.Kill(); _ = mp.Wait() })
	waitPort(t, mpSMTP, "mailpit smtp")
	waitPort(t, mpHTTP, "mailpit http")

	load(t, conf(mpSMTP))
	sendAllFlows(t)
	api := fmt.Sprintf("http://127.0.0.1:%d/api/v1", mpHTTP)
	var list struct {
		Total    int `json:"total"`
		Messages []struct {
			ID string `json:"ID"`
		} `json:"messages"`
	}
	for i := 0; i < 100; i++ {
		res, err := http.Get(api + "/messages")
		if err != nil {
			t.Fatal(err)
		}
		_ = json.NewDecoder(res.Body).Decode(&list)
		res.Body.Close()
		if list.Total >= conformanceMessages {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var raws [][]byte
	for _, m := range list.Messages {
		res, err := http.Get(api + "/message/" + m.ID + "/raw")
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(res.Body)
		res.Body.Close()
		raws = append(raws, raw)
	}
	checkArrived(t, "mailpit", raws, record)
}
