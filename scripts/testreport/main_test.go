package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A stream as `go test -json` writes it: a passing test that logs a
// skipped part, a skipped test whose reason spans two lines, a failing
// subtest buried in Caddy's JSON logs, a benchmark (which reports no
// result of its own), and a package that does not build.
const sampleStream = `{"Action":"start","Package":"m/integration"}
{"Action":"run","Package":"m/integration","Test":"TestDKIM"}
{"Action":"output","Package":"m/integration","Test":"TestDKIM","Output":"=== RUN   TestDKIM\n"}
{"Action":"output","Package":"m/integration","Test":"TestDKIM","Output":"    dkim_test.go:81: SKIPPING the dkimpy check: install the Debian package python3-dkim\n"}
{"Action":"pass","Package":"m/integration","Test":"TestDKIM"}
{"Action":"run","Package":"m/integration","Test":"TestConformance/mailpit"}
{"Action":"output","Package":"m/integration","Test":"TestConformance/mailpit","Output":"    conformance_test.go:45: SKIPPING the conformance test with Mailpit: mailpit\n"}
{"Action":"output","Package":"m/integration","Test":"TestConformance/mailpit","Output":"        (go install github.com/axllent/mailpit@v1.33.1) is missing\n"}
{"Action":"output","Package":"m/integration","Test":"TestConformance/mailpit","Output":"--- SKIP: TestConformance/mailpit (0.00s)\n"}
{"Action":"skip","Package":"m/integration","Test":"TestConformance/mailpit"}
{"Action":"run","Package":"m/integration","Test":"TestSend"}
{"Action":"run","Package":"m/integration","Test":"TestSend/otp"}
{"Action":"output","Package":"m/integration","Test":"TestSend/otp","Output":"{\"level\":\"info\",\"msg\":\"authmail handler ready\"}\n"}
{"Action":"output","Package":"m/integration","Test":"TestSend/otp","Output":"    api_test.go:12: want 200 sent, got 502\n"}
{"Action":"output","Package":"m/integration","Test":"TestSend/otp","Output":"--- FAIL: TestSend/otp (0.10s)\n"}
{"Action":"fail","Package":"m/integration","Test":"TestSend/otp"}
{"Action":"fail","Package":"m/integration","Test":"TestSend"}
{"Action":"fail","Package":"m/integration"}
{"Action":"run","Package":"m","Test":"BenchmarkCompose"}
{"Action":"output","Package":"m","Test":"BenchmarkCompose","Output":"BenchmarkCompose-2 \t 1\t 443020 ns/op\n"}
{"Action":"pass","Package":"m"}
not JSON: the failing input of a fuzz target
{"ImportPath":"m/broken","Action":"build-output","Output":"broken/x.go:3:1: syntax error\n"}
{"ImportPath":"m/broken","Action":"build-fail"}
{"Action":"fail","Package":"m/broken"}
`

func TestReport(t *testing.T) {
	dir := t.TempDir()
	js := filepath.Join(dir, "test.json")
	gofmtOut := filepath.Join(dir, "gofmt.out")
	stages := filepath.Join(dir, "stages.tsv")
	write := func(p, s string) {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(js, sampleStream)
	write(gofmtOut, "gofmt would change:\n./x.go\n")
	write(stages, "gofmt\tFAIL\t0.3\t"+gofmtOut+"\n"+"go test -race\tFAIL\t75.5\t"+js+"\t"+js+"\n")
	st, err := readStages(stages)
	if err != nil {
		t.Fatal(err)
	}
	out := report(st, "/tmp/run.log", "m", 30)
	for _, want := range []string{
		"  FAIL    gofmt                                       0s\n",
		"  FAIL    go test -race                            1m16s  2 passed, 3 failed, 1 skipped\n",
		"skipped (1):\n  integration TestConformance/mailpit\n      SKIPPING the conformance test with Mailpit: mailpit (go install github.com/axllent/mailpit@v1.33.1) is missing\n",
		"passed with a part skipped (1):\n  integration TestDKIM: SKIPPING the dkimpy check: install the Debian package python3-dkim\n",
		"  [go test -race] integration TestSend/otp\n      api_test.go:12: want 200 sent, got 502\n      --- FAIL: TestSend/otp (0.10s)\n",
		"  [go test -race] package broken (no test failed)\n      broken/x.go:3:1: syntax error\n",
		"  [gofmt] the stage's output\n      gofmt would change:\n      ./x.go\n",
		"log: /tmp/run.log\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the report lacks\n%s\n---\n%s", want, out)
		}
	}
	if strings.Contains(out, `"level"`) || strings.Contains(out, "integration TestSend\n") {
		t.Errorf("the report shows Caddy's logs or the failing subtest's parent:\n%s", out)
	}
	// gofmt, TestSend, TestSend/otp and the package that does not build
	if !strings.HasSuffix(out, "\ntests: 2 passed, 4 failed, 1 skipped\n") {
		t.Errorf("last line:\n%s", out)
	}
}
