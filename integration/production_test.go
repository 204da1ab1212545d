package integration

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestProductionGuide keeps docs/production.md true to the files it
// ships and the versions this module builds: its Caddyfiles adapt; every
// credential they read, and the unit's comments name, is one that
// examples/authmail-caddy.service loads; and its container recipe and
// build commands name the Caddy and Redis module versions of go.mod.
// The recipe itself is not run (no Docker here), as the page says; the
// unit and the alerting rules are linted in ../ops_test.go.
func TestProductionGuide(t *testing.T) {
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join("..", name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	page, unit, gomod := read("docs/production.md"), read("examples/authmail-caddy.service"), read("go.mod")
	fenced := func(lang string) []string {
		var out []string
		for _, b := range strings.Split(page, "```"+lang+"\n")[1:] {
			b, _, _ = strings.Cut(b, "```")
			out = append(out, b)
		}
		return out
	}

	caddyfiles := fenced("caddyfile")
	if len(caddyfiles) < 2 {
		t.Fatalf("docs/production.md has %d Caddyfiles, want the service's site and the metrics site", len(caddyfiles))
	}
	for i, src := range caddyfiles {
		if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil); err != nil {
			t.Errorf("Caddyfile %d of docs/production.md does not adapt: %v\n%s", i+1, err, src)
		}
	}

	loaded := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^LoadCredential=([^:]+):`).FindAllStringSubmatch(unit, -1) {
		loaded[m[1]] = true
	}
	used := regexp.MustCompile(`/run/credentials/([^/\s]+)/([A-Za-z0-9_.-]+)`)
	n := 0
	for _, doc := range []string{page, unit} {
		for _, m := range used.FindAllStringSubmatch(doc, -1) {
			n++
			if m[1] != "authmail-caddy.service" {
				t.Errorf("%s: credentials of the unit live under /run/credentials/authmail-caddy.service/", m[0])
			}
			if !loaded[m[2]] {
				t.Errorf("%s: the unit has no LoadCredential=%s:…", m[0], m[2])
			}
		}
	}
	if n < 3 || len(loaded) < 3 {
		t.Fatalf("found %d credential paths and %d LoadCredential lines; is the pattern broken?", n, len(loaded))
	}

	version := func(module string) string {
		m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(module) + ` v(\S+)`).FindStringSubmatch(gomod)
		if m == nil {
			t.Fatalf("go.mod does not require %s", module)
		}
		return m[1]
	}
	caddyV, redisV := version("github.com/caddyserver/caddy/v2"), version("github.com/pberkel/caddy-storage-redis")
	docker := fenced("dockerfile")
	if len(docker) != 1 {
		t.Fatalf("docs/production.md has %d Dockerfiles, want 1", len(docker))
	}
	for _, want := range []string{"FROM caddy:" + caddyV + "-builder AS builder\n", "RUN xcaddy build ",
		"--with github.com/caddy-authmail/authmail", "--with github.com/pberkel/caddy-storage-redis@v" + redisV,
		"FROM caddy:" + caddyV + "\n", "COPY --from=builder /usr/bin/caddy /usr/bin/caddy"} {
		if !strings.Contains(docker[0], want) {
			t.Errorf("the Dockerfile of docs/production.md lacks %q (go.mod builds Caddy %s):\n%s", want, caddyV, docker[0])
		}
	}
	for _, m := range regexp.MustCompile(`xcaddy build v(\S+)`).FindAllStringSubmatch(page, -1) {
		if m[1] != caddyV {
			t.Errorf("docs/production.md builds Caddy %s with xcaddy; go.mod requires %s", m[1], caddyV)
		}
	}
}
