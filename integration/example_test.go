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
// with authmail from cmd/caddy, run it on examples/Caddyfile as is, send
// every kind of mail with scripts/try-it.sh, and find the .eml files. It
// first checks that these are the commands of the README's quick start.
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
	script.Env = append(os.Environ(), "AUTHMAIL_URL="+origin+"/authmail")
	out, err := script.CombinedOutput()
	if err != nil {
		t.Fatalf("try-it.sh: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 8 || !strings.Contains(lines[0], `{"status":"ok"}`) {
		t.Fatalf("try-it.sh output:\n%s", out)
	}
	for _, l := range lines[1:] {
		if !strings.Contains(l, `"status":"captured"`) {
			t.Errorf("not captured: %s", l)
		}
	}
	files, _ := filepath.Glob(filepath.Join(work, "captured-mail", "*.eml"))
	if len(files) != 8 { // email-change also notifies the old address
		t.Fatalf("%d .eml files, want 8:\n%s", len(files), out)
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
