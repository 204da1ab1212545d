package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestCaddyfileAdapt checks that the Caddyfile syntax documented in the
// README produces the documented JSON: each testdata/caddyfile_adapt file
// holds a Caddyfile, a line of dashes and the expected JSON.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			in, want, ok := strings.Cut(string(data), "\n----------\n")
			if !ok {
				t.Fatal("no ---------- separator")
			}
			if !caddytest.CompareAdapt(t, f, in+"\n", "caddyfile", strings.TrimRight(want, "\n")) {
				t.Fatal("adapted JSON differs (diff above)")
			}
		})
	}
}

// TestExampleCaddyfileAdapts keeps examples/Caddyfile valid.
func TestExampleCaddyfileAdapts(t *testing.T) {
	data, err := os.ReadFile("../examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	caddytest.AssertAdapt(t, string(data), "caddyfile", strings.TrimRight(mustReadGolden(t, "example.json"), "\n"))
}

func mustReadGolden(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
