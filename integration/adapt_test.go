package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestCaddyfileAdapt checks that the Caddyfile syntax documented in
// docs/configuration.md produces the documented JSON: each
// testdata/caddyfile_adapt file holds a Caddyfile, a line of dashes and the
// expected JSON.
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

// TestDocsExamplesAgree adapts the README's production Caddyfile and
// checks that docs/configuration.md shows the same Caddyfile and that the
// authmail handler it adapts to is exactly that page's JSON example.
func TestDocsExamplesAgree(t *testing.T) {
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join("..", name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	readme, config := read("README.md"), read("docs/configuration.md")
	block := func(doc, name, after, fence string) string {
		_, rest, ok := strings.Cut(doc, after)
		if !ok {
			t.Fatalf("%s has no %q", name, after)
		}
		_, rest, ok = strings.Cut(rest, fence+"\n")
		if !ok {
			t.Fatalf("no %s block after %q in %s", fence, after, name)
		}
		b, _, _ := strings.Cut(rest, "```")
		return b
	}
	caddyfileSrc := block(readme, "README.md", "\n## A production example\n", "```caddyfile")
	if got := block(config, "docs/configuration.md", "\n### A production example\n", "```caddyfile"); got != caddyfileSrc {
		t.Fatalf("the production example of docs/configuration.md differs from the README's:\n%s", got)
	}
	jsonSrc := block(config, "docs/configuration.md", "\n## JSON config\n", "```json")

	adapter := caddyconfig.GetAdapter("caddyfile")
	out, _, err := adapter.Adapt([]byte(caddyfileSrc), nil)
	if err != nil {
		t.Fatalf("README production Caddyfile does not adapt: %v", err)
	}
	handler := findHandler(t, out, "authmail")
	var want any
	if err := json.Unmarshal([]byte(jsonSrc), &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(handler, want) {
		got, _ := json.MarshalIndent(handler, "", "\t")
		t.Fatalf("the JSON example of docs/configuration.md differs from the adapted production Caddyfile:\n%s", got)
	}
}

// findHandler returns the first handler object with the given name.
func findHandler(t *testing.T, cfg []byte, name string) any {
	t.Helper()
	var doc any
	if err := json.Unmarshal(cfg, &doc); err != nil {
		t.Fatal(err)
	}
	var walk func(v any) any
	walk = func(v any) any {
		switch x := v.(type) {
		case map[string]any:
			if x["handler"] == name {
				return x
			}
			for _, c := range x {
				if f := walk(c); f != nil {
					return f
				}
			}
		case []any:
			for _, c := range x {
				if f := walk(c); f != nil {
					return f
				}
			}
		}
		return nil
	}
	h := walk(doc)
	if h == nil {
		t.Fatalf("no %s handler in the adapted config", name)
	}
	return h
}
