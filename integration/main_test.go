// Package integration tests authmail end to end: a real Caddy, started
// in-process by caddytest and reconfigured through its admin API, in
// front of a real SMTP server (go-smtp with STARTTLS and AUTH PLAIN).
//
// All tests share one Caddy (admin localhost:2999, HTTP 9080), so they
// live in this one package and never run in parallel.
package integration

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"text/template"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/caddyserver/certmagic"

	_ "github.com/caddy-authmail/authmail"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// Secrets used by the tests. They reach Caddy only through {env.*}
// placeholders; tests check that they never show up anywhere else.
const (
	keyApp       = "it-app-key-0123456789abcdef"
	keyOther     = "it-other-key-0123456789abcdef"
	smtpPassword = "smtp-s3cret-Pa55word!"
)

// The shared Caddy's ports. Test configs are written with Caddy's test
// ports (admin localhost:2999, HTTP 9080, HTTPS 9443), and withPorts moves
// them to free ports that TestMain picks, so that another Caddy on this
// machine (a gateway run from examples/Caddyfile, another test run) never
// meets this one.
var (
	adminPort, httpPort, httpsPort int
	baseURL                        string // http://localhost:<httpPort>
	adminURL                       string // http://localhost:<adminPort>
)

// withPorts moves a test config's canonical ports to the run's own.
func withPorts(caddyfile string) string {
	return strings.NewReplacer(
		"localhost:2999", fmt.Sprintf("localhost:%d", adminPort),
		":9080", fmt.Sprintf(":%d", httpPort),
		"http_port 9080", fmt.Sprintf("http_port %d", httpPort),
		"https_port 9443", fmt.Sprintf("https_port %d", httpsPort),
	).Replace(caddyfile)
}

// freePorts returns n distinct free loopback ports.
func freePorts(n int) []int {
	var lns []net.Listener
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	for _, ln := range lns {
		ln.Close()
	}
	return ports
}

var (
	smtpSrv *smtptest.Server
	tmpDir  string
	logFile string

	// secrets holds every secret value a test used (keys, passwords,
	// codes, tokens, links). TestMain fails the run if any of them
	// appears in Caddy's logs.
	secretsMu sync.Mutex
	secrets   = map[string]bool{keyApp: true, keyOther: true, smtpPassword: true}
)

// secret records s as a value that must never be logged, and returns it.
func secret(s string) string {
	secretsMu.Lock()
	secrets[s] = true
	secretsMu.Unlock()
	return s
}

func TestMain(m *testing.M) {
	var err error
	tmpDir, err = os.MkdirTemp("", "authmail-it-")
	if err != nil {
		panic(err)
	}
	// Caddy computes these at init; point them into the temp dir so that
	// tests never touch the developer's ~/.config/caddy or ~/.local/share.
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(tmpDir, "config"))
	os.Setenv("XDG_DATA_HOME", filepath.Join(tmpDir, "data"))
	caddy.ConfigAutosavePath = filepath.Join(caddy.AppConfigDir(), "autosave.json")
	caddy.DefaultStorage = &certmagic.FileStorage{Path: caddy.AppDataDir()}

	ports := freePorts(3)
	adminPort, httpPort, httpsPort = ports[0], ports[1], ports[2]
	baseURL = fmt.Sprintf("http://localhost:%d", httpPort)
	adminURL = fmt.Sprintf("http://localhost:%d", adminPort)
	caddytest.Default.AdminPort = adminPort

	os.Setenv("AUTHMAIL_IT_KEY", keyApp)
	os.Setenv("AUTHMAIL_IT_KEY2", keyOther)
	os.Setenv("AUTHMAIL_IT_SMTP_PASSWORD", smtpPassword)

	smtpSrv, err = smtptest.New(smtptest.Options{TLS: smtptest.StartTLS, Username: "mailer", Password: smtpPassword, Dir: tmpDir})
	if err != nil {
		panic(err)
	}
	logFile = filepath.Join(tmpDir, "caddy.log")

	code := m.Run()
	if code == 0 {
		code = checkLogsHoldNoSecrets()
	}
	_ = smtpSrv.Close()
	// AUTHMAIL_IT_KEEP_LOG=<dir> keeps a copy of Caddy's log of the run
	if d := os.Getenv("AUTHMAIL_IT_KEEP_LOG"); d != "" {
		if b, err := os.ReadFile(logFile); err == nil {
			_ = os.WriteFile(filepath.Join(d, fmt.Sprintf("caddy-%d.log", os.Getpid())), b, 0o600)
		}
	}
	_ = os.RemoveAll(tmpDir)
	os.Exit(code)
}

// config describes one authmail site; render turns it into a Caddyfile.
type config struct {
	SMTPPort   int
	CAFile     string
	SMTPExtra  string // extra lines in the smtp block
	Extra      string // extra lines in the authmail block
	Keys       string // key lines; default: app and other from the env
	Delivery   string // replaces the whole smtp block, e.g. "capture /dir"
	PathPrefix string
	HELO       string // default it.example
	LogFile    string
	StorageDir string // the outbox storage; default: one per test
	Limits     string // auth_failures and recipient_rate lines; default: generous
	Global     string // extra global options
}

var caddyfileTemplate = template.Must(template.New("").Parse(`{
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1ns
	skip_install_trust
	log {
		output file {{.LogFile}}
		format json
		level DEBUG
	}
{{- if .Global}}
	{{.Global}}
{{- end}}
}

http://localhost:9080 {
	log {
		output file {{.LogFile}}
		format json
	}
	authmail {
{{- if .PathPrefix}}
		path_prefix {{.PathPrefix}}
{{- end}}
{{- if .Delivery}}
		{{.Delivery}}
{{- else}}
		smtp 127.0.0.1:{{.SMTPPort}} {
			username mailer
			password {env.AUTHMAIL_IT_SMTP_PASSWORD}
			ca {{.CAFile}}
			helo {{.HELO}}
			timeout 3s
			connections 2
{{- if .SMTPExtra}}
			{{.SMTPExtra}}
{{- end}}
		}
{{- end}}
		from no-reply@example.com "Example App"
		reply_to support@example.com
		base_url https://app.example.com
		link password-reset https://app.example.com/account/reset?t={token}
{{- if .Keys}}
		{{.Keys}}
{{- else}}
		key app {env.AUTHMAIL_IT_KEY} {
			rate off
		}
		key other {env.AUTHMAIL_IT_KEY2} {
			rate off
		}
{{- end}}
{{- if .Limits}}
		{{.Limits}}
{{- else}}
		auth_failures 1000/1m
		recipient_rate off
{{- end}}
		security_alerts {
			new_login on
			account_locked off
		}
		max_body_size 64KiB
		storage file_system {{.StorageDir}}
{{- if .Extra}}
		{{.Extra}}
{{- end}}
	}

	respond "next handler" 200
}
`))

var (
	storageMu   sync.Mutex
	storageDirs = map[string]string{}
	storageRuns = map[string]int{}
)

// storageFor returns the outbox storage directory of a test: one per
// top-level test, so that messages still queued by one test are never
// delivered during another.
func storageFor(t *testing.T) string {
	name, _, _ := strings.Cut(t.Name(), "/")
	storageMu.Lock()
	defer storageMu.Unlock()
	if d, ok := storageDirs[name]; ok {
		return d
	}
	storageRuns[name]++
	d := filepath.Join(tmpDir, "storage", fmt.Sprintf("%s-%d", name, storageRuns[name]))
	storageDirs[name] = d
	if !strings.Contains(t.Name(), "/") {
		// A later run of the same test (go test -count=N) starts from an
		// empty storage instead of replaying this run's outbox.
		t.Cleanup(func() {
			storageMu.Lock()
			delete(storageDirs, name)
			storageMu.Unlock()
		})
	}
	return d
}

func (c config) render() string {
	if c.SMTPPort == 0 {
		c.SMTPPort = smtpSrv.Port
	}
	if c.CAFile == "" {
		c.CAFile = smtpSrv.CAFile
	}
	if c.HELO == "" {
		c.HELO = "it.example"
	}
	c.LogFile = logFile
	var b bytes.Buffer
	if err := caddyfileTemplate.Execute(&b, c); err != nil {
		panic(err)
	}
	return withPorts(b.String())
}

// load (re)configures the shared Caddy through the admin API and resets
// the SMTP server's records and hooks.
func load(t *testing.T, c config) {
	t.Helper()
	if c.StorageDir == "" {
		c.StorageDir = storageFor(t)
	}
	caddytest.NewTester(t).InitServer(c.render(), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	waitOneListener(t, httpPort)
	// the reload closed the old server's idle keep-alive connections
	client.CloseIdleConnections()
	smtpSrv.SetHooks(smtptest.Hooks{})
	smtpSrv.Reset()
}

// waitOneListener waits until one socket listens on port. On Linux a
// reload binds the new config's socket beside the old one (SO_REUSEPORT)
// and Caddy returns from the reload before the old server has surely
// closed its socket; a connection the kernel queues on the old socket
// meanwhile is reset when it closes, and the test's request fails with
// EOF (seen under heavy load). Without /proc it returns at once.
func waitOneListener(t *testing.T, port int) {
	t.Helper()
	want := fmt.Sprintf(":%04X ", port)
	count := func() (int, bool) {
		n, ok := 0, false
		for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
			data, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			ok = true
			for _, line := range strings.Split(string(data), "\n")[1:] {
				fields := strings.Fields(line)
				// local_address is fields[1] ("0100007F:2378"), st fields[3]; 0A = LISTEN
				if len(fields) > 3 && fields[3] == "0A" && strings.HasSuffix(fields[1]+" ", want) {
					n++
				}
			}
		}
		return n, ok
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, ok := count()
		if !ok || n <= 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Logf("%d sockets still listen on port %d after the reload", n, port)
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// response is a parsed HTTP answer.
type response struct {
	status int
	header http.Header
	raw    string
	json   map[string]any
}

func (r response) str(key string) string {
	s, _ := r.json[key].(string)
	return s
}

var client = &http.Client{Timeout: 20 * time.Second}

// call sends a request to Caddy. headers are "Name: value" strings.
func call(t *testing.T, method, path string, body io.Reader, headers ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, baseURL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := response{status: res.StatusCode, header: res.Header, raw: string(raw)}
	if len(raw) > 0 && strings.HasPrefix(res.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(raw, &r.json); err != nil {
			t.Fatalf("%s %s: invalid JSON response %q: %v", method, path, raw, err)
		}
	}
	return r
}

// post sends an authenticated JSON request with the app key.
func post(t *testing.T, path, body string, headers ...string) response {
	t.Helper()
	return call(t, http.MethodPost, path, strings.NewReader(body),
		append([]string{"Authorization: Bearer " + keyApp, "Content-Type: application/json"}, headers...)...)
}

// expectError asserts an error answer and that nothing reached SMTP.
func expectError(t *testing.T, r response, status int, code, field string) {
	t.Helper()
	if r.status != status || r.str("error_code") != code || r.str("field") != field {
		t.Fatalf("got %d %s (field %q): %s\nwant %d %s (field %q)", r.status, r.str("error_code"), r.str("field"), r.raw, status, code, field)
	}
	if r.str("message") == "" {
		t.Fatalf("error without a message: %s", r.raw)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q", ct)
	}
	if n := len(smtpSrv.Attempts()); n != 0 {
		t.Fatalf("a refused request reached the SMTP server (%d messages)", n)
	}
}

// expectSent asserts a 200 sent answer and returns the one message the
// SMTP server received for it, which it then forgets (connection
// counters are kept).
func expectSent(t *testing.T, r response) *smtptest.Message {
	t.Helper()
	if r.status != http.StatusOK || r.json["sent"] != true || r.str("status") != "sent" {
		t.Fatalf("want 200 sent, got %d: %s", r.status, r.raw)
	}
	msgs := smtpSrv.Messages()
	if len(msgs) != 1 {
		t.Fatalf("SMTP server received %d messages, want 1", len(msgs))
	}
	if got := headerOf(t, msgs[0].Data, "Message-Id"); got != r.str("message_id") {
		t.Fatalf("Message-ID header %q != response message_id %q", got, r.str("message_id"))
	}
	smtpSrv.ClearMessages()
	return msgs[0]
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

func fmtJSON(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// loadRaw loads a Caddyfile as is.
func loadRaw(t *testing.T, caddyfile string) {
	t.Helper()
	caddytest.NewTester(t).InitServer(withPorts(caddyfile), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	client.CloseIdleConnections()
	smtpSrv.SetHooks(smtptest.Hooks{})
	smtpSrv.Reset()
}

// checkLogsHoldNoSecrets scans everything Caddy logged during the run
// (authmail's lines, Caddy's own and the access log) for the secrets the
// tests used, for full recipient addresses, and for recovered panics.
func checkLogsHoldNoSecrets() int {
	// a full run must have produced authmail and access log lines, or the
	// scan would prove nothing; a -run subset may not have any
	full := flag.Lookup("test.run").Value.String() == ""
	data, err := os.ReadFile(logFile)
	if err != nil && (full || !os.IsNotExist(err)) {
		fmt.Fprintf(os.Stderr, "reading the Caddy log: %v\n", err)
		return 1
	}
	if full && (!bytes.Contains(data, []byte(`"logger":"http.handlers.authmail"`)) || !bytes.Contains(data, []byte(`"logger":"http.log.access`))) {
		fmt.Fprintln(os.Stderr, "the Caddy log lacks authmail or access log lines; the secret scan would prove nothing")
		return 1
	}
	leaks := 0
	secretsMu.Lock()
	defer secretsMu.Unlock()
	for s := range secrets {
		if bytes.Contains(data, []byte(s)) {
			fmt.Fprintf(os.Stderr, "SECRET LEAKED into the Caddy log: %q\n", s)
			leaks++
		}
	}
	for _, addr := range []string{"jane@example.org", "new.address@example.org", "old@example.net", "audit@example.com"} {
		if bytes.Contains(data, []byte(addr)) {
			fmt.Fprintf(os.Stderr, "recipient address logged: %s\n", addr)
			leaks++
		}
	}
	// a handler panic is recovered by net/http, which closes the
	// connection (the client sees EOF) and logs "http: panic serving"
	for _, line := range bytes.Split(data, []byte("\n")) {
		if bytes.Contains(line, []byte("panic")) {
			fmt.Fprintf(os.Stderr, "panic in the Caddy log: %s\n", line)
			leaks++
		}
	}
	if leaks > 0 {
		return 1
	}
	fmt.Printf("log scan: %d bytes of Caddy logs hold none of %d secrets and no panic\n", len(data), len(secrets))
	return 0
}

// workers runs send(w, i), with i = 0, 1, 2, …, in each of 4 goroutines
// (w = 0 … 3) until stop is closed, and returns a function that waits for
// them to return.
func workers(stop <-chan struct{}, send func(w, i int)) (wait func()) {
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				send(w, i)
			}
		})
	}
	return wg.Wait
}
