#!/usr/bin/env bash
# Runs every fuzz target for FUZZTIME (default 10s). With --keep, copies
# the inputs the fuzzer found interesting into testdata/fuzz/<Target>/, so
# the committed corpus grows and every run (and CI) starts from it:
#
#   FUZZTIME=2m ./scripts/fuzz.sh --keep && git add testdata/fuzz
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-10s}
keep=false
[ "${1:-}" = "--keep" ] && keep=true
pkg=$(go list .)
cache="$(go env GOCACHE)/fuzz/${pkg}"
for target in $(go test -list '^Fuzz' . | grep '^Fuzz'); do
	echo "== fuzz $target ($fuzztime)"
	if ! out=$(go test -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" . 2>&1); then
		# the whole report, and the failing input the fuzzer wrote (it
		# lives only in this checkout: CI's log is the only copy)
		echo "$out" | grep -v '^fuzz: elapsed'
		for f in $(git ls-files --others --exclude-standard "testdata/fuzz/$target"); do
			echo "-- $f"; cat "$f"
		done
		exit 1
	fi
	echo "$out" | tail -n 2
	if $keep && [ -d "$cache/$target" ]; then
		mkdir -p "testdata/fuzz/$target"
		cp -n "$cache/$target"/* "testdata/fuzz/$target/" 2>/dev/null || true
		echo "   corpus: $(ls "testdata/fuzz/$target" | wc -l) inputs in testdata/fuzz/$target"
	fi
done
