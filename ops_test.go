package authmail

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// The operations guide (docs/production.md) ships files that run outside
// Go: a systemd unit and Prometheus alerting rules. These tests lint
// them with the tools that read them, systemd-analyze and promtool. A
// machine without a tool skips its test loudly, naming the Debian
// package; .ci/run installs both and sets AUTHMAIL_REQUIRE_SYSTEMD=1 and
// AUTHMAIL_REQUIRE_PROMTOOL=1, which turn the skips into failures.

// requireTool returns the path of a command, or skips t (fails it when
// the environment variable require is 1).
func requireTool(t *testing.T, name, pkg, require string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := name + " is not installed (Debian package " + pkg + ": apt-get install " + pkg + ")"
	if os.Getenv(require) == "1" {
		t.Fatal(msg + ", and " + require + "=1")
	}
	t.Skip("SKIPPING: " + msg + "; " + require + "=1 makes this a failure")
	return ""
}

const unitFile = "examples/authmail-caddy.service"

// TestSystemdUnitVerifies runs `systemd-analyze verify` on the unit:
// systemd reports an unknown option or a value it cannot parse as a
// warning and still exits 0, so any output fails the test. It also
// holds the unit's hardening to its exposure score (`systemd-analyze
// security --offline`).
func TestSystemdUnitVerifies(t *testing.T) {
	sa := requireTool(t, "systemd-analyze", "systemd", "AUTHMAIL_REQUIRE_SYSTEMD")
	unit, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	const bin = "/usr/local/bin/caddy"
	if !strings.Contains(string(unit), "ExecStart="+bin+" run ") {
		t.Fatalf("%s: no ExecStart=%s run …", unitFile, bin)
	}
	// verify also checks that ExecStart's program exists: point it at a
	// stand-in, and change nothing else
	dir := t.TempDir()
	stub := filepath.Join(dir, "caddy")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	lint := func(name, text string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(strings.ReplaceAll(text, bin, stub)), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(sa, "verify", p).CombinedOutput()
		if err != nil && len(out) == 0 {
			t.Fatalf("systemd-analyze verify %s: %v", name, err)
		}
		return strings.TrimSpace(string(out))
	}
	// the lint sees a mistake: a misspelt option is only a warning
	if out := lint("broken.service", strings.Replace(string(unit), "NoNewPrivileges=", "NoNewPrivilege=", 1)); !strings.Contains(out, "NoNewPrivilege") {
		t.Fatalf("systemd-analyze verify did not report a misspelt option; it said: %q", out)
	}
	if out := lint("authmail-caddy.service", string(unit)); out != "" {
		t.Fatalf("systemd-analyze verify %s:\n%s", unitFile, out)
	}

	out, err := exec.Command(sa, "security", "--offline=true", filepath.Join(dir, "authmail-caddy.service")).CombinedOutput()
	if strings.Contains(string(out), "--offline") || strings.Contains(string(out), "unrecognized option") {
		t.Logf("SKIPPING the exposure score: this systemd-analyze has no security --offline (systemd 250 and later):\n%s", out)
		return
	}
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	// 0 is fully locked down, 10 not at all; a Caddy that must reach
	// the network and bind ports 80 and 443 scores about 1.7 here
	if score, _ := strconv.ParseFloat(string(m[1]), 64); score > 2.0 {
		t.Fatalf("%s: exposure %s, want at most 2.0; hardening was lost:\n%s", unitFile, m[1], out)
	}
}

const (
	rulesFile     = "examples/prometheus-rules.yml"
	rulesTestFile = "testdata/prometheus-rules.test.yml"
)

// TestPrometheusRules checks the alerting rules with promtool and runs
// their cases.
func TestPrometheusRules(t *testing.T) {
	promtool := requireTool(t, "promtool", "prometheus", "AUTHMAIL_REQUIRE_PROMTOOL")
	for _, args := range [][]string{{"check", "rules", rulesFile}, {"test", "rules", rulesTestFile}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestPrometheusRulesNameExportedMetrics: every authmail metric a rule
// reads is one authmail exports (a renamed metric would leave its alert
// silent forever, which promtool cannot see), and every alert has a
// case in which it fires. Needs no promtool.
func TestPrometheusRulesNameExportedMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg); err != nil {
		t.Fatal(err)
	}
	descs := make(chan *prometheus.Desc, 100)
	for _, c := range collectors {
		c.Describe(descs)
	}
	close(descs)
	exported := map[string]bool{}
	fqName := regexp.MustCompile(`fqName: "([^"]+)"`)
	for d := range descs {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			exported[m[1]] = true
		}
	}
	rules, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	cases, err := os.ReadFile(rulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	exprs := 0
	for _, line := range strings.Split(string(rules), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		for _, name := range regexp.MustCompile(`caddy_authmail_[a-z_]+`).FindAllString(line, -1) {
			exprs++
			base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
			if !exported[name] && !exported[base] {
				t.Errorf("%s reads %s, which authmail does not export", rulesFile, name)
			}
		}
	}
	alerts := regexp.MustCompile(`(?m)^\s+- alert: (\w+)$`).FindAllStringSubmatch(string(rules), -1)
	if len(alerts) < 10 || exprs < 10 {
		t.Fatalf("found %d alerts reading %d metrics in %s; is the pattern broken?", len(alerts), exprs, rulesFile)
	}
	for _, a := range alerts {
		firing := regexp.MustCompile(`alertname: ` + a[1] + `\n\s+exp_alerts:\n\s+- exp_labels:`)
		if !firing.Match(cases) {
			t.Errorf("%s has no case in which %s fires", rulesTestFile, a[1])
		}
	}
}
