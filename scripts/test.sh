#!/usr/bin/env bash
# The full test suite: formatting, vet, unit and integration tests with
# the race detector (a real in-process Caddy and SMTP server, plus the
# built binary on examples/Caddyfile), one iteration of every Go
# benchmark, then a short run of every fuzz target. FUZZTIME=0 skips fuzzing; FUZZTIME=1m fuzzes longer.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== gofmt"
unformatted=$(gofmt -l $(find . -name '*.go' -not -path './.git/*'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

echo "== go vet"
go vet ./...

echo "== go test -race (unit + integration)"
go test -race -count=1 ./...

# the Go benchmarks run once each, so that they keep working (numbers:
# go test -run '^$' -bench . -benchmem .)
echo "== go test -bench (one iteration each)"
if ! out=$(go test -run '^$' -bench . -benchtime=1x . 2>&1); then
	echo "$out"; exit 1
fi

# every fuzz target, starting from the committed corpus in testdata/fuzz
if [ "${FUZZTIME:-10s}" != "0" ]; then
	./scripts/fuzz.sh
fi
echo "== all tests passed"
