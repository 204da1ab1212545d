package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestReadmeQuickStart does what the README tells a newcomer: build Caddy
// with authmail from cmd/caddy, run it on examples/Caddyfile as is, walk
// through it with scripts/try-it.sh from the same directory (every kind
// of mail, a code issued and verified, the console endpoints, the preview
// page it points to), and find the .eml files and the outbox in that
// directory. It first checks that these are the commands of the README's
// quick start.
func TestReadmeQuickStart(t *testing.T) {
	repo, _ := filepath.Abs("..")
	readme, err := os.ReadFile(filepath.Join(repo, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, quickStart, ok := strings.Cut(string(readme), "\n## Quick start: two commands\n")
	if !ok {
		t.Fatal("README.md has no quick start section")
	}
	quickStart, _, _ = strings.Cut(quickStart, "\n## ")
	for _, cmd := range []string{"\ngo run ./cmd/caddy run --config examples/Caddyfile\n", "\n./scripts/test.sh\n",
		"\n./scripts/try-it.sh\n", "\nls captured-mail/ "} {
		if !strings.Contains(quickStart, cmd) {
			t.Errorf("the README's quick start no longer has %q", strings.TrimSpace(cmd))
		}
	}
	if testing.Short() {
		t.Skip("builds and runs the Caddy binary")
	}
	work := t.TempDir()
	bin := filepath.Join(work, "caddy")
	build := exec.Command("go", "build", "-o", bin, "./cmd/caddy")
	build.Dir = repo
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/caddy: %v\n%s", err, out)
	}

	// the example as is, on free ports, so that a gateway a developer
	// runs from it (on 2019 and 8080) does not get in the way
	example, err := os.ReadFile(filepath.Join(repo, "examples", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	admin, web := freePort(t), freePort(t)
	cfg := strings.ReplaceAll(string(example), "localhost:2019", fmt.Sprintf("localhost:%d", admin))
	cfg = strings.ReplaceAll(cfg, "8080", fmt.Sprint(web))
	if !strings.Contains(string(example), "admin localhost:2019") || !strings.Contains(string(example), "http_port 8080") {
		t.Fatalf("examples/Caddyfile no longer has the admin and HTTP ports this test moves:\n%s", example)
	}
	cfgFile := filepath.Join(work, "Caddyfile")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	origin := fmt.Sprintf("http://localhost:%d", web)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	caddy := exec.CommandContext(ctx, bin, "run", "--config", cfgFile)
	caddy.Dir = work // captured-mail is relative to the working directory
	caddy.Env = append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(work, "config"), "XDG_DATA_HOME="+filepath.Join(work, "data"))
	logs, _ := os.Create(filepath.Join(work, "caddy.log"))
	caddy.Stdout, caddy.Stderr = logs, logs
	if err := caddy.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		// a clean stop through the admin API, as a user would do it
		if res, err := http.Post(fmt.Sprintf("http://localhost:%d/stop", admin), "", nil); err == nil {
			res.Body.Close()
		}
		done := make(chan struct{})
		go func() { caddy.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cancel()
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(work, "caddy.log"))
			t.Logf("caddy log:\n%s", b)
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		res, err := http.Get(origin + "/authmail/health")
		if err == nil {
			res.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy did not start: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	script := exec.Command(filepath.Join(repo, "scripts", "try-it.sh"))
	script.Dir = work // as the README runs it: where the gateway runs
	script.Env = append(os.Environ(), "AUTHMAIL_URL="+origin+"/authmail")
	out, err := script.CombinedOutput()
	if err != nil {
		t.Fatalf("try-it.sh: %v\n%s", err, out)
	}
	// each step's line starts with its label; want holds what it shows
	sends := []string{"/send/otp", "/send/magic-link", "/send/password-reset", "/send/verify-email", "/send/email-change",
		"/send/security-alert", "/send"}
	steps := [][2]string{{"/health", `{"status":"ok"}`}}
	for _, s := range sends {
		steps = append(steps, [2]string{s, `"status":"captured"`})
	}
	steps = append(steps, [][2]string{
		{"/send/otp code:auto", `"challenge_id":"`},
		{"the code in the mail", ".eml)"},
		{"/verify/otp", `{"valid":true,"to":"jane@example.com","purpose":"login"}`},
		{"/messages/{id}", `"status":"sent"`},
		{"/status", `"mode":"capture"`},
		{"/messages?limit=3", `"key_id":"auth"`},
		{"/test", `"status":"captured"`},
		{"  " + origin + "/authmail/preview", ""},
	}...)
	lines := strings.Split(string(out), "\n")
	i := 0
	for _, step := range steps {
		for i < len(lines) && !strings.HasPrefix(lines[i], step[0]+" ") && lines[i] != step[0] {
			i++
		}
		if i == len(lines) {
			t.Fatalf("try-it.sh printed no %q line (in this order):\n%s", step[0], out)
		}
		if !strings.Contains(lines[i], step[1]) {
			t.Errorf("try-it.sh's %q line lacks %s: %s", step[0], step[1], lines[i])
		}
		i++
	}
	// the preview page it points to opens with the console key as the
	// Basic-auth password, and not with the app's key
	for secret, want := range map[string]int{"dev-console-key-change-me-01": 200, "dev-app-key-change-me-0123": 403} {
		req, _ := http.NewRequest("GET", origin+"/authmail/preview", nil)
		req.SetBasicAuth("me", secret)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != want {
			t.Errorf("the preview page with %s: %d, want %d", secret, res.StatusCode, want)
		}
	}
	// the outbox is in the working directory, not in the user's data
	// directory
	if _, err := os.Stat(filepath.Join(work, "authmail-data", "authmail", "st")); err != nil {
		t.Errorf("no outbox in ./authmail-data: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(work, "captured-mail", "*.eml"))
	// email-change also notifies the old address; then the issued code
	// and /test
	if len(files) != 10 {
		t.Fatalf("%d .eml files, want 10:\n%s", len(files), out)
	}
	var all strings.Builder
	for _, f := range files {
		b, _ := os.ReadFile(f)
		p := parseMail(t, b)
		all.WriteString(p.Subject + "\n" + p.Text)
	}
	for _, want := range []string{"482913", origin + "/magic-link?token=magic-token-123",
		origin + "/account/reset?token=reset-token-456", origin + "/verify?code=789",
		"Example App security alert: New sign-in to your account", "Order #1042 is paid.", "Your Example App email address is being changed"} {
		if !strings.Contains(all.String(), want) {
			t.Errorf("no captured message contains %q", want)
		}
	}
}
