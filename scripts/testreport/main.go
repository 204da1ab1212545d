// Command testreport prints the summary of scripts/test.sh: each stage's
// result and time, the number of tests that passed, failed and were
// skipped, every skipped test with its reason, and every failure with
// the tail of its output. The tests' own output (mostly the JSON logs of
// the Caddy instances under test) stays in the log file; this reads the
// `go test -json` streams the stages wrote there.
//
//	go run ./scripts/testreport -stages stages.tsv -log run.log
//
// stages.tsv has one line per stage, tab-separated: name, result (ok,
// FAIL or skipped), seconds, the file of its output, and optionally the
// file of its `go test -json` stream. A stream may hold other lines
// (scripts/fuzz.sh writes the failing inputs between its runs); only
// lines that parse as test2json events count.
//
// The last line is "tests: N passed, N failed, N skipped", which CI
// reads. "failed" counts failing tests, packages that failed without a
// failing test (a build error, a TestMain check) and failed stages that
// run no tests (gofmt, vet), so that it is 0 exactly when every stage
// passed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string // build-output and build-fail
}

// test is one test, subtest, benchmark or fuzz target of a stream.
type test struct {
	pkg, name string
	result    string // pass, fail, skip; "" while running
	output    []string
}

// stream is what one stage's `go test -json` reported.
type stream struct {
	tests    map[string]*test // by package and name
	order    []*test
	pkgFail  map[string]bool
	pkgOut   map[string][]string // output outside any test, and build output
	pkgOrder []string
}

func readStream(r io.Reader) *stream {
	s := &stream{tests: map[string]*test{}, pkgFail: map[string]bool{}, pkgOut: map[string][]string{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var e event
		if json.Unmarshal(line, &e) != nil || e.Action == "" {
			continue
		}
		pkg := e.Package
		if pkg == "" {
			pkg = e.ImportPath
		}
		if _, ok := s.pkgOut[pkg]; !ok {
			s.pkgOut[pkg] = nil
			s.pkgOrder = append(s.pkgOrder, pkg)
		}
		switch {
		case e.Action == "build-output":
			s.pkgOut[pkg] = append(s.pkgOut[pkg], e.Output)
		case e.Action == "build-fail":
			s.pkgFail[pkg] = true
		case e.Test == "":
			switch e.Action {
			case "output":
				s.pkgOut[pkg] = append(s.pkgOut[pkg], e.Output)
			case "fail":
				s.pkgFail[pkg] = true
			}
		default:
			key := pkg + " " + e.Test
			t := s.tests[key]
			if t == nil {
				t = &test{pkg: pkg, name: e.Test}
				s.tests[key] = t
				s.order = append(s.order, t)
			}
			switch e.Action {
			case "output":
				t.output = append(t.output, e.Output)
			case "pass", "fail", "skip":
				t.result = e.Action
			}
		}
	}
	// A benchmark reports no result of its own, and a test still running
	// when its package died has none either: the package's result is
	// theirs.
	for _, t := range s.order {
		if t.result == "" {
			t.result = "pass"
			if s.pkgFail[t.pkg] {
				t.result = "fail"
			}
		}
	}
	return s
}

// stage is one line of stages.tsv.
type stage struct {
	name, result string
	seconds      float64
	out          string
	stream       *stream
}

func readStages(path string) ([]*stage, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []*stage
	for line := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 4 {
			continue
		}
		st := &stage{name: f[0], result: f[1], out: f[3]}
		st.seconds, _ = strconv.ParseFloat(f[2], 64)
		if len(f) > 4 && f[4] != "" {
			if fh, err := os.Open(f[4]); err == nil {
				st.stream = readStream(fh)
				fh.Close()
			}
		}
		out = append(out, st)
	}
	return out, nil
}

// logLine matches the start of a t.Log, t.Skip or t.Error line.
var logLine = regexp.MustCompile(`^\s+[\w.-]+\.go:\d+: `)

// skipReason is the message of a skipped test: its last log entry (t.Skip
// logs its arguments, then stops the test), continuation lines included.
func skipReason(output []string) string {
	var entries [][]string
	for _, l := range output {
		l = strings.TrimRight(l, "\n")
		switch {
		case logLine.MatchString(l):
			entries = append(entries, []string{logLine.ReplaceAllString(l, "")})
		case strings.HasPrefix(l, "        ") && len(entries) > 0:
			last := &entries[len(entries)-1]
			*last = append(*last, strings.TrimSpace(l))
		}
	}
	if len(entries) == 0 {
		return "(no reason given)"
	}
	return strings.Join(entries[len(entries)-1], " ")
}

// noise reports whether an output line is a log line of a Caddy under
// test or a test framing line, left out of a failure's tail.
func noise(l string) bool {
	t := strings.TrimSpace(l)
	return t == "" || strings.HasPrefix(t, `{"level":`) || strings.HasPrefix(t, "fuzz: elapsed") || strings.HasPrefix(t, "=== RUN") ||
		strings.HasPrefix(t, "=== PAUSE") || strings.HasPrefix(t, "=== CONT") || strings.HasPrefix(t, "=== NAME")
}

// tail returns the last n lines of output that are not noise, and how
// many lines it left out.
func tail(output []string, n int) ([]string, int) {
	var keep []string
	for _, chunk := range output {
		for l := range strings.SplitSeq(strings.TrimRight(chunk, "\n"), "\n") {
			if !noise(l) {
				keep = append(keep, strings.TrimPrefix(l, "    "))
			}
		}
	}
	left := 0
	if len(keep) > n {
		left = len(keep) - n
		keep = keep[left:]
	}
	return keep, left
}

func fileTail(path string, n int) ([]string, int) {
	b, err := os.ReadFile(path)
	if err != nil {
		return []string{fmt.Sprintf("(cannot read %s: %v)", path, err)}, 0
	}
	return tail([]string{string(b)}, n)
}

func duration(sec float64) string {
	d := time.Duration(sec * float64(time.Second)).Round(time.Second)
	if d < time.Minute {
		return fmt.Sprintf("%ds", int(d.Seconds()))
	}
	return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
}

func shortPkg(pkg, module string) string {
	if p, ok := strings.CutPrefix(pkg, module+"/"); ok {
		return p
	}
	if pkg == module {
		return "."
	}
	return pkg
}

func main() {
	stagesFile := flag.String("stages", "", "the stages file test.sh wrote: print the summary")
	logFile := flag.String("log", "", "the log file, named in the summary")
	lines := flag.Int("tail", 30, "lines of output shown per failure")
	module := flag.String("module", "", "the module path, left out of package names")
	count := flag.String("count", "", "a go test -json stream: print its counts")
	text := flag.String("text", "", "a go test -json stream: print its output as go test -v would")
	flag.Parse()
	open := func(path string) *os.File {
		f, err := os.Open(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testreport:", err)
			os.Exit(2)
		}
		return f
	}
	switch {
	case *count != "":
		f := open(*count)
		defer f.Close()
		p, fl, k := readStream(f).counts()
		fmt.Printf("%d passed, %d failed, %d skipped\n", p, fl, k)
	case *text != "":
		f := open(*text)
		defer f.Close()
		writeText(os.Stdout, f)
	default:
		stages, err := readStages(*stagesFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testreport:", err)
			os.Exit(2)
		}
		fmt.Print(report(stages, *logFile, *module, *lines))
	}
}

// counts returns how many tests passed, failed and were skipped, a
// package that failed without a failing test counted as a failure.
func (s *stream) counts() (passed, failed, skipped int) {
	for _, t := range s.order {
		switch t.result {
		case "pass":
			passed++
		case "fail":
			failed++
		case "skip":
			skipped++
		}
	}
	for _, pkg := range s.pkgOrder {
		if s.pkgFail[pkg] && !slices.ContainsFunc(s.order, func(t *test) bool { return t.pkg == pkg && t.result == "fail" }) {
			failed++
		}
	}
	return passed, failed, skipped
}

// writeText writes the output of a go test -json stream as text, in the
// order it came, and passes lines that are not events through.
func writeText(w io.Writer, r io.Reader) {
	bw := bufio.NewWriter(w)
	defer bw.Flush()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) > 0 && line[0] == '{' && json.Unmarshal(line, &e) == nil && e.Action != "" {
			if e.Action == "output" || e.Action == "build-output" {
				bw.WriteString(e.Output)
			}
			continue
		}
		bw.Write(line)
		bw.WriteString("\n")
	}
}

// report renders the summary.
func report(stages []*stage, logFile, module string, lines int) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	var passed, failed, skipped int
	var skips, notes, fails []string
	total := 0.0
	w("\n== summary\n")
	for _, st := range stages {
		total += st.seconds
		counts := ""
		stageFailures := 0
		if s := st.stream; s != nil {
			for _, t := range s.order {
				pkg := shortPkg(t.pkg, module)
				switch t.result {
				case "pass":
					for _, l := range t.output {
						if strings.Contains(l, "SKIPPING") && logLine.MatchString(l) {
							notes = append(notes, fmt.Sprintf("  %s %s: %s", pkg, t.name, strings.TrimSpace(logLine.ReplaceAllString(strings.TrimRight(l, "\n"), ""))))
						}
					}
				case "skip":
					skips = append(skips, fmt.Sprintf("  %s %s\n      %s", pkg, t.name, skipReason(t.output)))
				case "fail":
					// list the innermost failures: a parent fails with
					// its subtest and says nothing more
					leaf := !slices.ContainsFunc(s.order, func(o *test) bool {
						return o.pkg == t.pkg && o.result == "fail" && strings.HasPrefix(o.name, t.name+"/")
					})
					if leaf {
						out, left := tail(t.output, lines)
						fails = append(fails, failure(st.name, pkg+" "+t.name, out, left))
					}
				}
			}
			// a package that failed without a failing test: a build
			// error, a panic outside tests, a TestMain check
			for _, pkg := range s.pkgOrder {
				if !s.pkgFail[pkg] || slices.ContainsFunc(s.order, func(t *test) bool { return t.pkg == pkg && t.result == "fail" }) {
					continue
				}
				out, left := tail(s.pkgOut[pkg], lines)
				fails = append(fails, failure(st.name, "package "+shortPkg(pkg, module)+" (no test failed)", out, left))
			}
			p, f, k := s.counts()
			passed, failed, skipped = passed+p, failed+f, skipped+k
			stageFailures = f
			counts = fmt.Sprintf("  %d passed, %d failed, %d skipped", p, f, k)
		}
		if st.result == "FAIL" && stageFailures == 0 {
			failed++
			out, left := fileTail(st.out, lines)
			fails = append(fails, failure(st.name, "the stage's output", out, left))
		}
		w("  %-7s %-38s %7s%s\n", st.result, st.name, duration(st.seconds), counts)
	}
	w("  %-7s %-38s %7s\n", "", "total", duration(total))
	if len(skips) > 0 {
		w("\nskipped (%d):\n%s\n", len(skips), strings.Join(skips, "\n"))
	}
	if len(notes) > 0 {
		w("\npassed with a part skipped (%d):\n%s\n", len(notes), strings.Join(notes, "\n"))
	}
	if len(fails) > 0 {
		w("\nfailed:\n%s", strings.Join(fails, ""))
	}
	if logFile != "" {
		w("\nlog: %s\n", logFile)
	}
	w("tests: %d passed, %d failed, %d skipped\n", passed, failed, skipped)
	return b.String()
}

func failure(stage, what string, out []string, left int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  [%s] %s\n", stage, what)
	if left > 0 {
		fmt.Fprintf(&b, "      (%d earlier lines in the log)\n", left)
	}
	for _, l := range out {
		fmt.Fprintf(&b, "      %s\n", l)
	}
	return b.String()
}
