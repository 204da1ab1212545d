#!/usr/bin/env bash
# The full test suite: formatting, vet, unit and integration tests with
# the race detector (a real in-process Caddy and SMTP server, plus the
# built binary on examples/Caddyfile), one iteration of every Go
# benchmark, then a short run of every fuzz target. FUZZTIME=0 skips
# fuzzing; FUZZTIME=1m fuzzes longer.
#
# Every stage runs even when an earlier one failed, and the script exits
# 1 if any did. The tests' output — mostly the JSON logs of the Caddy
# instances under test — goes to a log file, kept when something failed
# (or with AUTHMAIL_TEST_KEEP_LOG=1) and named in the summary. The
# terminal gets one line per stage and a summary: each stage's result and
# time, every skipped test with its reason (which names what to install),
# every failure with the tail of its output, and last the line CI reads:
#
#   tests: 812 passed, 0 failed, 9 skipped
set -uo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/authmail-test.XXXXXX")
log="$work/test.log"
stages="$work/stages.tsv"
: >"$stages"
failed=0

now() { date +%s.%N; }
human() { awk -v s="$1" 'BEGIN { if (s < 60) printf "%.1fs", s; else printf "%dm%02ds", s / 60, s % 60 }'; }

# The summary's tool, built once; without it (a checkout that does not
# build) the stages still run and the summary is reduced to the counts of
# failed stages.
report=""
if go build -o "$work/testreport" ./scripts/testreport >"$work/testreport.out" 2>&1; then
	report="$work/testreport"
fi

# stage NAME JSON CMD...: runs CMD with its output in a file of its own,
# JSON naming the file where CMD writes a go test -json stream (or "").
# A command's exit status decides the stage's result; the log gets the
# output as text.
n=0
stage() {
	local name=$1 json=$2
	shift 2
	n=$((n + 1))
	local out="$work/$n.out"
	printf '== %s … ' "$name"
	local start end result=ok
	start=$(now)
	"$@" >"$out" 2>&1 || result=FAIL
	end=$(now)
	local secs
	secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
	[ "$result" = FAIL ] && failed=$((failed + 1))
	printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$result" "$secs" "$out" "$json" >>"$stages"
	local counts=""
	if [ -s "$json" ] && [ -n "$report" ]; then
		counts="; $("$report" -count "$json")"
	fi
	printf '%s (%s%s)\n' "$result" "$(human "$secs")" "$counts"
	{
		echo "===== $name: $result ($(human "$secs"))"
		if [ -s "$json" ] && [ -n "$report" ]; then "$report" -text "$json"; elif [ -n "$json" ]; then cat "$json" 2>/dev/null; fi
		cat "$out"
	} >>"$log"
}

gofmt_check() {
	local unformatted
	unformatted=$(gofmt -l $(find . -name '*.go' -not -path './.git/*'))
	if [ -n "$unformatted" ]; then
		echo "gofmt would change:"
		echo "$unformatted"
		return 1
	fi
}

# The conformance test's Mailpit part needs mailpit: found on PATH, named
# by AUTHMAIL_MAILPIT, or built into the cache .ci/run uses.
mailpit_dir="${XDG_CACHE_HOME:-$HOME/.cache}/authmail-ci/mailpit-v1.33.1"
build_mailpit() {
	echo "== building mailpit v1.33.1 into $mailpit_dir (about 2 minutes) …"
	mkdir -p "$mailpit_dir" &&
		GOBIN="$mailpit_dir" go install github.com/axllent/mailpit@v1.33.1 >"$work/mailpit-build.out" 2>&1 ||
		{ echo "   the build failed (see $work/mailpit-build.out); the Mailpit part will be skipped"; cat "$work/mailpit-build.out" >>"$log"; }
}
if [ -z "${AUTHMAIL_MAILPIT:-}" ] && ! command -v mailpit >/dev/null 2>&1; then
	if [ ! -x "$mailpit_dir/mailpit" ]; then
		if [ -n "${CI:-}" ]; then
			build_mailpit
		elif [ -t 0 ]; then
			read -r -p "Mailpit is not installed, so the conformance test's Mailpit part would be skipped. Build it now (about 2 minutes, cached in $mailpit_dir)? [y/N] " answer
			case "$answer" in [yY]*) build_mailpit ;; esac
		else
			echo "== Mailpit is not installed: the conformance test's Mailpit part will be skipped. To build it once"
			echo "   (about 2 minutes; later runs find it there): GOBIN=$mailpit_dir go install github.com/axllent/mailpit@v1.33.1"
		fi
	fi
	if [ -x "$mailpit_dir/mailpit" ]; then
		export AUTHMAIL_MAILPIT="$mailpit_dir/mailpit"
	fi
fi

stage "gofmt" "" gofmt_check
stage "go vet" "" go vet ./...
# -timeout: the root package runs for 6-7 minutes with the race
# detector on a 2-core machine, too close to go test's default 10
stage "go test -race (unit + integration)" "$work/test.json" \
	sh -c 'go test -race -count=1 -timeout 30m -json ./... >"$1"' sh "$work/test.json"
# the Go benchmarks run once each, so that they keep working (numbers:
# go test -run '^$' -bench . -benchmem .)
stage "go test -bench (one iteration each)" "$work/bench.json" \
	sh -c 'go test -run "^\$" -bench . -benchtime=1x -json . >"$1"' sh "$work/bench.json"
# every fuzz target, starting from the committed corpus in testdata/fuzz
if [ "${FUZZTIME:-10s}" != "0" ]; then
	stage "fuzz (${FUZZTIME:-10s} per target)" "$work/fuzz.json" \
		sh -c './scripts/fuzz.sh --json >"$1"' sh "$work/fuzz.json"
else
	echo "== fuzz: skipped (FUZZTIME=0)"
	printf '%s\t%s\t%s\t%s\t\n' "fuzz" "skipped" "0" "/dev/null" >>"$stages"
fi

keep=""
if [ "$failed" -gt 0 ] || [ "${AUTHMAIL_TEST_KEEP_LOG:-}" = 1 ]; then
	keep="$log"
fi
if [ -n "$report" ]; then
	"$report" -stages "$stages" -log "$keep" -module "$(go list -m)"
else
	echo
	echo "== summary unavailable: scripts/testreport does not build:"
	cat "$work/testreport.out"
	echo "log: $log"
	keep="$log"
	echo "tests: 0 passed, $((failed + 1)) failed, 0 skipped"
fi
if [ -z "$keep" ]; then
	rm -rf "$work"
fi
[ "$failed" -eq 0 ] && [ -n "$report" ]
