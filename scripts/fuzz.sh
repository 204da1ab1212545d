#!/usr/bin/env bash
# Runs every fuzz target for FUZZTIME (default 10s), each one even when an
# earlier one failed, and exits 1 if any failed. With --keep, copies the
# inputs the fuzzer found interesting into testdata/fuzz/<Target>/, so the
# committed corpus grows and every run (and CI) starts from it:
#
#   FUZZTIME=2m ./scripts/fuzz.sh --keep && git add testdata/fuzz
#
# With --json each run's report is `go test -json` (scripts/test.sh reads
# it to count and summarize).
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-10s}
keep=false
json=()
for arg in "$@"; do
	case "$arg" in
	--keep) keep=true ;;
	--json) json=(-json) ;;
	*) echo "usage: $0 [--keep] [--json]" >&2; exit 2 ;;
	esac
done
pkg=$(go list .)
cache="$(go env GOCACHE)/fuzz/${pkg}"
failed=()
for target in $(go test -list '^Fuzz' . | grep '^Fuzz'); do
	echo "== fuzz $target ($fuzztime)"
	rc=0
	out=$(go test ${json[@]+"${json[@]}"} -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" . 2>&1) || rc=$?
	if [ $rc -ne 0 ] && [ -z "$(git ls-files --others --exclude-standard "testdata/fuzz/$target")" ] &&
		grep -q 'context deadline exceeded' <<<"$out"; then
		# Go's fuzzing coordinator sometimes fails a run with a bare
		# "context deadline exceeded" when -fuzztime ends while a worker
		# is busy on a loaded machine. It writes no failing input, so
		# there is nothing to reproduce: such a run is made once more. A
		# real finding writes its input and is reported at once.
		echo "   ($target ended with a bare 'context deadline exceeded' and no failing input; running it once more)"
		rc=0
		out=$(go test ${json[@]+"${json[@]}"} -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" . 2>&1) || rc=$?
	fi
	if [ $rc -ne 0 ]; then
		# the whole report, and the failing input the fuzzer wrote (it
		# lives only in this checkout: CI's log is the only copy)
		echo "$out" | grep -v '^fuzz: elapsed'
		for f in $(git ls-files --others --exclude-standard "testdata/fuzz/$target"); do
			echo "-- $f"; cat "$f"
		done
		failed+=("$target")
		continue
	fi
	if [ ${#json[@]} -gt 0 ]; then echo "$out"; else echo "$out" | tail -n 2; fi
	if $keep && [ -d "$cache/$target" ]; then
		mkdir -p "testdata/fuzz/$target"
		cp -n "$cache/$target"/* "testdata/fuzz/$target/" 2>/dev/null || true
		echo "   corpus: $(ls "testdata/fuzz/$target" | wc -l) inputs in testdata/fuzz/$target"
	fi
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "== fuzzing failed: ${failed[*]}"
	exit 1
fi
