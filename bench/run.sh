#!/usr/bin/env bash
# authmail benchmark harness. One run measures, on this machine:
#
#   1. async accept: requests/s and p50/p99 latency of
#      POST /authmail/send/otp with "Prefer: respond-async" (202 once the
#      message is durably stored) next to Caddy's own `respond` handler,
#      same Caddy binary and process, same wrk settings;
#   2. end-to-end delivery on loopback: N messages submitted to authmail
#      until postfix's smtp-sink has received all of them, next to raw
#      go-mail sending as many same-size messages over as many connections,
#      and the CPU time each process (client, Caddy, smtp-sink) spends per
#      delivered message;
#   3. the same through a TCP proxy that adds DELAY each way;
#   1b. async accept again on an instance whose SMTP server is unreachable
#      (no delivery work competing for the CPU);
#   4. the Caddy process's RSS with N_QUEUE messages queued (SMTP server
#      unreachable, retries an hour away), and the storage's disk usage;
#   5. phases 1 and 2 again with the outbox on Redis (redis-server with
#      appendonly yes, appendfsync always, through caddy.storage.redis);
#   6. the baseline an operator would pick instead of a gateway: Postfix
#      as a local durable relay (smtp-source, 32 sessions -> postfix smtpd,
#      its queue on the same disk -> smtp-sink through relayhost, 4
#      delivery connections), accepted and end-to-end rates;
#   7. the default synchronous mode (wait for the first attempt) through
#      the delay proxy to an SMTP server that requires STARTTLS and AUTH,
#      on a pooled connection: p50/p99 time to the 200, next to the floor
#      of two SMTP round trips through the proxy (measured with NOOPs, so
#      the proxy's own forwarding counts) plus one durable write;
#   8. a throttled provider: N_THROTTLE OTPs submitted at once (async) to
#      bench/cmd/throttlesink, an SMTP server that takes 50 messages/s
#      across connections (token bucket, burst 10) and answers SES's
#      "454 4.7.0 Throttling failure" above it; the time until it has
#      accepted all of them and the throttling replies it sent, for
#      authmail with `smtp { rate 50/1s }`, authmail without a rate
#      (adaptive backoff from the replies), and authmail from commit
#      THROTTLE_BEFORE (before send-rate caps: a throttled message waits
#      retry_backoff, 30 s doubling), capped at THROTTLE_CAP seconds.
#
# It also checks that every accepted message reached smtp-sink (phases 1-3)
# and that the queue still holds every message in phase 4, and reports
# Caddy's error log lines: a throughput number is only worth something if
# nothing was lost. Builds whose authmail has per-key or per-recipient
# rate limits get them turned off in the generated Caddyfile.
#
# Needs root for apt-get (wrk, postfix's smtp-sink) and for smtp-sink -u.
# Takes about 14 minutes with the defaults on 2 cores (phases 0-7 about 8,
# phase 8 about 6 with its two builds).
#
# Usage (from the repository root):  bash bench/run.sh
#                                    PHASES=throttle bash bench/run.sh
#
# Environment overrides (defaults in brackets):
#   PHASES [main throttle]  what to run: main (phases 0-7), throttle
#                      (phase 8; needs neither wrk, postfix nor Redis)
#   DURATION [10s]     wrk duration of each measured run (phase 1)
#   WARMUP [2s]        wrk warm-up before each measured run
#   CONNS [64]         wrk connections (phase 1)
#   THREADS [2]        wrk threads
#   N [20000]          messages per end-to-end run (phase 2)
#   REPS [3]           end-to-end runs per sender in phase 2 (median reported)
#   N_DELAY [2000]     messages per end-to-end run through the delay proxy
#   DELAY [5ms]        delay added by the proxy in each direction
#   N_QUEUE [100000]   messages queued for the RSS measurement
#   SUBMIT_CONC [32]   concurrent HTTP requests of the Go load generator
#   SMTP_CONNS [4]     authmail `connections` and go-mail goroutines
#   N_POSTFIX [10000]  messages through the Postfix relay (phase 6)
#   N_SYNC [300]       synchronous requests, one at a time (phase 7)
#   N_THROTTLE [1000]  OTPs submitted at once to the throttled server (phase 8)
#   THROTTLE_RATE [50] THROTTLE_BURST [10]  its messages/s and bucket size
#   THROTTLE_CAP [300] seconds phase 8 waits for each sender's deliveries
#   THROTTLE_BEFORE [c2d6652]  the commit before send-rate caps (phase 8's
#                      third sender; built from a git worktree of it)
#   GOMAIL_WITHOUT_NOOP [0]  1 gives the go-mail baseline mail.WithoutNoop()
#                      (default options send NOOP and RSET with every message;
#                      authmail sends neither)
#   REV []             build Caddy from this commit (git archive) instead of
#                      the working tree; the bench tools always come from
#                      the working tree
#   KEEP [0]           1 keeps the work directory (logs, storage)
#   STORAGE_ROOT []    put every instance's authmail storage in a new
#                      directory under this one (e.g. the mount point of a
#                      different file system) instead of the work directory
#   RESULTS_FILE []    also write the results table to this file
set -euo pipefail

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
N=${N:-20000}
REPS=${REPS:-3}
N_DELAY=${N_DELAY:-2000}
DELAY=${DELAY:-5ms}
N_QUEUE=${N_QUEUE:-100000}
SUBMIT_CONC=${SUBMIT_CONC:-32}
SMTP_CONNS=${SMTP_CONNS:-4}
GOMAIL_WITHOUT_NOOP=${GOMAIL_WITHOUT_NOOP:-0}
N_POSTFIX=${N_POSTFIX:-10000}
N_SYNC=${N_SYNC:-300}
PHASES=${PHASES:-main throttle}
N_THROTTLE=${N_THROTTLE:-1000}
THROTTLE_RATE=${THROTTLE_RATE:-50}
THROTTLE_BURST=${THROTTLE_BURST:-10}
THROTTLE_CAP=${THROTTLE_CAP:-300}
THROTTLE_BEFORE=${THROTTLE_BEFORE:-c2d6652}
KEEP=${KEEP:-0}
REV=${REV:-}
RESULTS_FILE=${RESULTS_FILE:-}

KEY=bench-key-0123456789abcdef
BODY='{"to":"user@example.com","code":"123456"}'

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUN_MAIN=0 RUN_THROTTLE=0
for ph in $PHASES; do
	case $ph in
	main) RUN_MAIN=1 ;;
	throttle) RUN_THROTTLE=1 ;;
	*)
		echo "PHASES: unknown phase '$ph' (main, throttle)" >&2
		exit 2
		;;
	esac
done

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

# --- dependencies -----------------------------------------------------------

apt_updated=0
apt_install() {
	command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
	[ "$(id -u)" = 0 ] || die "not root; install $* by hand (apt-get install $*)"
	if [ "$apt_updated" = 0 ]; then
		apt-get update -qq >&2
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

for c in go curl awk sed grep sort ss; do
	command -v "$c" >/dev/null || die "$c is required"
done
[ "$RUN_THROTTLE" = 0 ] || command -v git >/dev/null || die "phase 8 needs git (git worktree of $THROTTLE_BEFORE)"
if [ "$RUN_MAIN" = 1 ]; then
if ! command -v wrk >/dev/null; then
	log "installing wrk"
	apt_install wrk
fi
SMTP_SINK=$(command -v smtp-sink || true)
[ -n "$SMTP_SINK" ] || SMTP_SINK=/usr/sbin/smtp-sink
if [ ! -x "$SMTP_SINK" ]; then
	log "installing postfix (for smtp-sink; the postfix daemon is not started)"
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	apt_install postfix
fi
[ -x "$SMTP_SINK" ] || die "smtp-sink not found after installing postfix"
command -v wrk >/dev/null || die "wrk not found after installing it"
if ! command -v redis-server >/dev/null; then
	log "installing redis-server (the daemon is started only for phase 5)"
	apt_install redis-server
	systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
id postfix >/dev/null 2>&1 || die "user postfix missing (smtp-sink -u postfix)"
fi

# --- work directory, process bookkeeping, cleanup ---------------------------

WORK=$(mktemp -d /tmp/authmail-bench.XXXXXX)
chmod 755 "$WORK" # smtp-sink runs as postfix and must reach its dump dir
BIN=$WORK/bin
mkdir -p "$BIN"
STORAGE_BASE=$WORK
if [ -n "${STORAGE_ROOT:-}" ]; then
	STORAGE_BASE=$(mktemp -d "$STORAGE_ROOT/authmail-bench.XXXXXX")
fi

PIDS=()
BEFORE_SRC= # the git worktree phase 8 builds THROTTLE_BEFORE from
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -n "$BEFORE_SRC" ]; then
		git -C "$REPO" worktree remove --force "$BEFORE_SRC" 2>/dev/null || true
		git -C "$REPO" worktree prune 2>/dev/null || true
	fi
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		# give Caddy its drain time, then insist
		for _ in $(seq 1 150); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
		log "work directory kept: $WORK"
		[ "$STORAGE_BASE" = "$WORK" ] || log "storage kept: $STORAGE_BASE"
	else
		rm -rf "$WORK"
		[ "$STORAGE_BASE" = "$WORK" ] || rm -rf "$STORAGE_BASE"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# stop PID: terminate one process we started and forget it
stop() {
	local pid=$1 keep=() p
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 300); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	for p in "${PIDS[@]}"; do
		[ "$p" = "$pid" ] || keep+=("$p")
	done
	PIDS=("${keep[@]}")
}

# --- ports -----------------------------------------------------------------

USED_PORTS=" 2019 2999 8080 9080 9443 "
port_busy() {
	ss -Htan "( sport = :$1 )" 2>/dev/null | grep -q . && return 0
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
	return 1
}
# free_port [preferred]: a port nobody listens on, below the ephemeral range
free_port() {
	local p=${1:-}
	for _ in $(seq 1 200); do
		if [ -n "$p" ] && [[ $USED_PORTS != *" $p "* ]] && ! port_busy "$p"; then
			USED_PORTS="$USED_PORTS$p "
			echo "$p"
			return
		fi
		p=$((20000 + RANDOM % 12000))
	done
	die "no free port found"
}

wait_port() {
	local port=$1 what=$2
	for _ in $(seq 1 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
		sleep 0.1
	done
	die "$what did not listen on port $port"
}

ADMIN_PORT=$(free_port 12019)
HTTP_PORT=$(free_port 18080)
HTTPS_PORT=$(free_port 18443)
SINK_PORT=$(free_port 12525)
PROXY_PORT=$(free_port 12526)
CLOSED_PORT=$(free_port 12527) # nothing ever listens here
REDIS_PORT=$(free_port 16379)
PF_PORT=$(free_port 12528)
TLS_SINK_PORT=$(free_port 12529)
THROTTLE_PORT=$(free_port 12530)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "ports: admin $ADMIN_PORT, http $HTTP_PORT, smtp-sink $SINK_PORT, delay proxy $PROXY_PORT, closed $CLOSED_PORT, throttlesink $THROTTLE_PORT"
log "work directory: $WORK"

# --- build -----------------------------------------------------------------

if [ -n "$REV" ]; then
	command -v git >/dev/null || die "REV needs git"
	BUILT_FROM="commit $(git -C "$REPO" rev-parse --short "$REV")"
	log "building caddy (with authmail) from $BUILT_FROM, and the bench tools"
	mkdir -p "$WORK/src"
	git -C "$REPO" archive "$REV" | tar -x -C "$WORK/src"
	(cd "$WORK/src" && go build -o "$BIN/caddy" ./cmd/caddy)
else
	BUILT_FROM="the working tree"
	if command -v git >/dev/null && git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
		BUILT_FROM="the working tree at $(git -C "$REPO" rev-parse --short HEAD)"
		if [ -n "$(git -C "$REPO" status --porcelain -- . ':!bench' ':!docs' 2>/dev/null)" ]; then
			BUILT_FROM="$BUILT_FROM with uncommitted changes"
		fi
	fi
	log "building caddy (with authmail) from $BUILT_FROM, and the bench tools"
	(cd "$REPO" && go build -o "$BIN/caddy" ./cmd/caddy)
fi
(cd "$REPO" && go build -o "$BIN/" ./bench/cmd/loadgen ./bench/cmd/gomailbench ./bench/cmd/delayproxy ./bench/cmd/tlssink ./bench/cmd/storeprobe ./bench/cmd/rttprobe ./bench/cmd/throttlesink)
if [ "$RUN_THROTTLE" = 1 ]; then
	# phase 8's third sender: the same build of a git worktree of the
	# commit before send-rate caps, removed again right after
	BEFORE_REV=$(git -C "$REPO" rev-parse --short "$THROTTLE_BEFORE^{commit}") || die "THROTTLE_BEFORE $THROTTLE_BEFORE is no commit"
	log "building caddy (with authmail) from commit $BEFORE_REV for phase 8"
	BEFORE_SRC=$WORK/src-$BEFORE_REV
	git -C "$REPO" worktree add --detach "$BEFORE_SRC" "$BEFORE_REV" >/dev/null 2>&1 || die "git worktree add $BEFORE_SRC $BEFORE_REV failed"
	(cd "$BEFORE_SRC" && go build -o "$BIN/caddy-$BEFORE_REV" ./cmd/caddy)
	git -C "$REPO" worktree remove --force "$BEFORE_SRC"
	BEFORE_SRC=
fi

# --- helpers ---------------------------------------------------------------

# kv KEY < line: the value of KEY=value in a line of key=value pairs
kv() { tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }
# fmt_num X [decimals]
fmt_num() { awk -v x="$1" -v d="${2:-0}" 'BEGIN { printf "%.*f", d, x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f%%", 100 * a / b; else print "n/a" }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }
# cpu_ticks PID [user]: the CPU time a process has used (user+system, or
# user only), in clock ticks
cpu_ticks() {
	awk -v only="${2:-}" '{ print (only == "user") ? $14 : $14 + $15 }' "/proc/$1/stat"
}
CLK_TCK=$(getconf CLK_TCK)
# us_per_msg SECONDS: microseconds per message of phase 2's N*REPS
us_per_msg() { awk -v s="$1" -v n="$((N * REPS))" 'BEGIN { printf "%.0f", s * 1e6 / n }'; }
ticks_s() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { print t / hz }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# authmail_block SMTP_PORT STORAGE [delivery options...]: the handler config.
# STORAGE is a directory for file_system, or "redis" for the Redis server of
# phase 5; SMTP_OPTS holds the lines of the smtp block.
RATE_OFF=0
SMTP_OPTS=$'\t\t\t\ttls none'
authmail_block() {
	local smtp_port=$1 storage=$2 key_block="" limits="" delivery="" storage_line
	shift 2
	for opt in "$@"; do
		delivery+=$'\t\t\t\t'"$opt"$'\n'
	done
	if [ "$RATE_OFF" = 1 ]; then
		key_block=$' {\n\t\t\t\trate off\n\t\t\t}'
		limits=$'\t\t\trecipient_rate off\n'
	fi
	if [ "$storage" = redis ]; then
		storage_line=$'storage redis {\n\t\t\t\taddress 127.0.0.1:'"$REDIS_PORT"$'\n\t\t\t\tkey_prefix bench\n\t\t\t}'
	else
		storage_line="storage file_system $storage"
	fi
	cat <<EOF
		authmail {
			smtp 127.0.0.1:$smtp_port {
$SMTP_OPTS
				connections $SMTP_CONNS
			}
			from bench@example.com "Bench"
			key bench $KEY$key_block
$limits			$storage_line
			delivery {
$delivery			}
		}
EOF
}

# Builds with per-key and per-recipient rate limits (on by default) get
# them turned off: the benchmark sends every message to one recipient
# with one key, as fast as it can.
# adapts CADDY_BIN [delivery options...]: whether that build takes the
# authmail block with the current RATE_OFF and SMTP_OPTS
adapts() {
	local bin=$1
	shift
	{
		echo "http://127.0.0.1:1 {"
		authmail_block 1 "$WORK/probe-storage" "$@"
		echo "}"
	} >"$WORK/probe.Caddyfile"
	"$bin" adapt --config "$WORK/probe.Caddyfile" --adapter caddyfile >/dev/null 2>"$WORK/probe.err"
}
RATE_OFF=1
if adapts "$BIN/caddy"; then
	log "this build has rate limits: the bench config turns them off (key rate off, recipient_rate off)"
else
	RATE_OFF=0
fi

SINK_PID=
SINK_OUT=$WORK/sink.out
start_sink() { # start_sink [extra smtp-sink args...]
	"$SMTP_SINK" -u postfix "$@" "127.0.0.1:$SINK_PORT" 1024 >"$SINK_OUT" 2>"$WORK/sink.err" &
	SINK_PID=$!
	PIDS+=("$SINK_PID")
	wait_port "$SINK_PORT" smtp-sink
}

CADDY_PID=
CADDY_N=0
# start_caddy NAME SMTP_PORT [delivery options...]: a fresh Caddy process
# with its own storage, config and data directories (the binary is
# CADDY_BIN, default the one built above)
start_caddy() {
	local name=$1 smtp_port=$2
	shift 2
	local dir=$WORK/$name
	local storage=$STORAGE_BASE/$name/storage
	[ "${STORAGE_KIND:-file}" = redis ] && storage=redis
	mkdir -p "$dir/data" "$dir/config"
	cat >"$dir/Caddyfile" <<EOF
{
	admin localhost:$ADMIN_PORT
	http_port $HTTP_PORT
	https_port $HTTPS_PORT
	persist_config off
	log {
		level ERROR
	}
}

http://127.0.0.1:$HTTP_PORT {
	handle /authmail/* {
$(authmail_block "$smtp_port" "$storage" "$@")
	}
	handle {
		respond "ok" 200
	}
}
EOF
	XDG_DATA_HOME=$dir/data XDG_CONFIG_HOME=$dir/config HOME=$dir \
		"${CADDY_BIN:-$BIN/caddy}" run --config "$dir/Caddyfile" --adapter caddyfile >"$dir/caddy.log" 2>&1 &
	CADDY_PID=$!
	PIDS+=("$CADDY_PID")
	CADDY_DIR=$dir
	CADDY_STORAGE=$storage
	CADDY_N=$((CADDY_N + 1))
	for _ in $(seq 1 100); do
		if curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/authmail/health" 2>/dev/null; then
			return 0
		fi
		kill -0 "$CADDY_PID" 2>/dev/null || break
		sleep 0.1
	done
	cat "$dir/caddy.log" >&2
	die "caddy ($name) did not start"
}

# metric NAME [LABEL]: from the admin /metrics endpoint, the sum of every
# series of NAME whose labels contain LABEL (e.g. result="transient")
metric() {
	curl -fsS "http://localhost:$ADMIN_PORT/metrics" | awk -v m="$1" -v l="${2:-}" '
		/^#/ { next }
		{ name = $1; sub(/\{.*/, "", name) }
		name == m && index($1, l) > 0 { sum += $2 }
		END { printf "%.0f\n", sum }'
}

# wait_queue_empty TIMEOUT_S: until authmail's queue_depth gauge is 0
wait_queue_empty() {
	local t0=$SECONDS d
	while :; do
		d=$(metric caddy_authmail_queue_depth)
		[ "$d" = 0 ] && return 0
		if [ $((SECONDS - t0)) -ge "$1" ]; then
			log "WARNING: queue still holds $d messages after $1 s"
			return 1
		fi
		sleep 0.5
	done
}

caddy_errors() { # caddy_errors: error lines in the current Caddy's log
	grep -c '"level":"error"' "$CADDY_DIR/caddy.log" || true
}

# error_summary: "count× message" for each distinct error message in the
# current Caddy's log, separated by "; "
error_summary() {
	grep '"level":"error"' "$CADDY_DIR/caddy.log" 2>/dev/null |
		sed -n 's/.*"msg":"\([^"]*\)".*/\1/p' | sort | uniq -c | sort -rn |
		awk '{ n = $1; $1 = ""; sub(/^ /, ""); printf "%s%d× %s", (NR > 1 ? "; " : ""), n, $0 }' || true
}

# sink_count: messages smtp-sink has received so far (its last -c record)
sink_count() {
	tail -c 300 "$SINK_OUT" | tr '\r' '\n' | sed -n 's/.*mesg=\([0-9][0-9]*\).*/\1/p' | tail -1
}

PROBLEMS=()
P1_BAD=0
P2_BAD=0
P3_BAD=0
problem() {
	log "PROBLEM: $*"
	PROBLEMS+=("$*")
}

post() { # post PATH [curl args...]: one authenticated OTP request
	local path=$1
	shift
	curl -sS -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
		-d "$BODY" "$@" "http://127.0.0.1:$HTTP_PORT$path"
}

vm_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# --- the wrk script ----------------------------------------------------------

cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.headers["Prefer"] = "respond-async"

done = function(summary, latency, requests)
	io.write(string.format(
		"WRK requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
		summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
		summary.errors.read, summary.errors.write, summary.errors.timeout,
		latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
EOF

# run_wrk PATH DURATION: prints the WRK summary line
run_wrk() {
	wrk -t "$THREADS" -c "$CONNS" -d "$2" --timeout 10s -s "$WORK/post.lua" "http://127.0.0.1:$HTTP_PORT$1" >"$WORK/wrk.out" 2>&1 ||
		{
			cat "$WORK/wrk.out" >&2
			die "wrk failed"
		}
	grep '^WRK ' "$WORK/wrk.out"
}

GM_FLAGS=()
GM_LABEL="go-mail (default options)"
if [ "$GOMAIL_WITHOUT_NOOP" = 1 ]; then
	GM_FLAGS=(-without-noop)
	GM_LABEL="go-mail (WithoutNoop)"
fi

if [ "$RUN_MAIN" = 1 ]; then
# ============================================================================
# Phase 0: size of an authmail OTP message as sent (for the go-mail baseline)
# ============================================================================

log "phase 0: capturing one authmail OTP message to size the go-mail baseline"
mkdir -p "$WORK/dump"
chmod 777 "$WORK/dump"
start_sink -d "$WORK/dump/%M."
start_caddy caddy-loopback "$SINK_PORT"
first=$(post /authmail/send/otp)
case $first in
*'"status":"sent"'*) ;;
*) die "a synchronous send did not succeed: $first" ;;
esac
for _ in $(seq 1 50); do
	SAMPLE=$(find "$WORK/dump" -type f | head -1)
	[ -n "$SAMPLE" ] && [ -s "$SAMPLE" ] && break
	sleep 0.1
done
[ -n "$SAMPLE" ] || die "smtp-sink dumped no message"
[ "$(metric caddy_authmail_messages_accepted_total)" -ge 1 ] ||
	die "authmail's metrics (caddy_authmail_messages_accepted_total) are missing from http://localhost:$ADMIN_PORT/metrics"
stop "$SINK_PID"
# from here on, one smtp-sink counts every message (-c writes its counters
# to $SINK_OUT); the senders wait until it has counted all of theirs
start_sink -c

# ============================================================================
# Phase 1: async accept vs respond (wrk)
# ============================================================================

log "phase 1: wrk -t$THREADS -c$CONNS -d$DURATION (after a $WARMUP warm-up), respond vs authmail"
P1_SINK0=$(sink_count)
P1_ACC0=$(metric caddy_authmail_messages_accepted_total)
run_wrk /respond "$WARMUP" >/dev/null
R_LINE=$(run_wrk /respond "$DURATION")
log "respond:  $R_LINE"

run_wrk /authmail/send/otp "$WARMUP" >/dev/null
wait_queue_empty 300 || true
ACC_BEFORE=$(metric caddy_authmail_messages_accepted_total)
A_LINE=$(run_wrk /authmail/send/otp "$DURATION")
ACC_AFTER=$(metric caddy_authmail_messages_accepted_total)
log "authmail: $A_LINE"
P1_ACCEPTED=$((ACC_AFTER - ACC_BEFORE))
t0=$SECONDS
wait_queue_empty 600 || true
P1_DRAIN_S=$((SECONDS - t0))
log "phase 1: $P1_ACCEPTED messages accepted during the measured run; queue drained $P1_DRAIN_S s after wrk ended"
P1_SINK1=$(sink_count)
P1_ACC1=$(metric caddy_authmail_messages_accepted_total)
P1_ALL_ACCEPTED=$((P1_ACC1 - P1_ACC0))
P1_DELIVERED=$((${P1_SINK1:-0} - ${P1_SINK0:-0}))
if [ "$P1_DELIVERED" != "$P1_ALL_ACCEPTED" ]; then
	P1_BAD=1
	problem "phase 1: authmail accepted $P1_ALL_ACCEPTED messages (warm-up included) but smtp-sink received $P1_DELIVERED after the queue looked empty; Caddy errors: $(error_summary)"
fi

rps() { # rps WRK_LINE
	local req dur
	req=$(kv requests <<<"$1")
	dur=$(kv duration_us <<<"$1")
	awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }'
}
ms() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; }
R_RPS=$(rps "$R_LINE")
A_RPS=$(rps "$A_LINE")
R_P50=$(ms "$(kv p50_us <<<"$R_LINE")")
R_P99=$(ms "$(kv p99_us <<<"$R_LINE")")
A_P50=$(ms "$(kv p50_us <<<"$A_LINE")")
A_P99=$(ms "$(kv p99_us <<<"$A_LINE")")
A_ERR=$(($(kv status_errors <<<"$A_LINE") + $(kv connect_errors <<<"$A_LINE") + $(kv read_errors <<<"$A_LINE") + $(kv timeouts <<<"$A_LINE")))
R_ERR=$(($(kv status_errors <<<"$R_LINE") + $(kv connect_errors <<<"$R_LINE") + $(kv read_errors <<<"$R_LINE") + $(kv timeouts <<<"$R_LINE")))

# ============================================================================
# Phase 2: end-to-end delivery on loopback
# ============================================================================

log "phase 2: end-to-end, $N messages per run, $SMTP_CONNS SMTP connections, $REPS runs each"
GM_RATES=()
AM_RATES=()
AM_SUBMIT=()
GM_SIZE=
# CPU time per process over the runs, in clock ticks (Caddy and smtp-sink,
# from /proc) and seconds (the clients report their own)
GM_CLIENT_S=0 GM_SINK_T=0 AM_CLIENT_S=0 AM_CADDY_T=0 AM_CADDY_UT=0 AM_SINK_T=0
for rep in $(seq 1 "$REPS"); do
	s0=$(cpu_ticks "$SINK_PID")
	line=$("$BIN/gomailbench" -addr "127.0.0.1:$SINK_PORT" -n "$N" -conns "$SMTP_CONNS" -sample "$SAMPLE" "${GM_FLAGS[@]}" -sink-counter "$SINK_OUT")
	s1=$(cpu_ticks "$SINK_PID")
	log "run $rep go-mail:  $line"
	[ "$(kv failed <<<"$line")" = 0 ] || log "WARNING: go-mail send failures"
	GM_RATES+=("$(kv e2e_rate <<<"$line")")
	GM_SIZE=$(kv size <<<"$line")
	MSG_SIZE=$(kv target_size <<<"$line")
	GM_CLIENT_S=$(awk -v a="$GM_CLIENT_S" -v b="$(kv cpu_s <<<"$line")" 'BEGIN { print a + b }')
	GM_SINK_T=$((GM_SINK_T + s1 - s0))

	s0=$(cpu_ticks "$SINK_PID") c0=$(cpu_ticks "$CADDY_PID") cu0=$(cpu_ticks "$CADDY_PID" user)
	line=$("$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n "$N" -c "$SUBMIT_CONC" -key "$KEY" -async -sink-counter "$SINK_OUT" -sink-timeout 180s)
	log "run $rep authmail: $line"
	[ "$(kv accepted <<<"$line")" = "$N" ] || P2_BAD=1
	[ "$(kv delivered <<<"$line")" = "$(kv accepted <<<"$line")" ] || P2_BAD=1
	[ "$(kv accepted <<<"$line")" = "$N" ] || problem "phase 2 run $rep: only $(kv accepted <<<"$line") of $N requests were accepted"
	[ "$(kv delivered <<<"$line")" = "$(kv accepted <<<"$line")" ] || problem "phase 2 run $rep: smtp-sink received $(kv delivered <<<"$line") of $(kv accepted <<<"$line") accepted messages within the timeout"
	AM_RATES+=("$(kv e2e_rate <<<"$line")")
	AM_SUBMIT+=("$(kv submit_rps <<<"$line")")
	wait_queue_empty 120 || true
	# Caddy's work on these messages ends with their last state writes
	# and the removal of their batches, shortly after the last delivery
	sleep 1
	s1=$(cpu_ticks "$SINK_PID") c1=$(cpu_ticks "$CADDY_PID") cu1=$(cpu_ticks "$CADDY_PID" user)
	AM_CLIENT_S=$(awk -v a="$AM_CLIENT_S" -v b="$(kv cpu_s <<<"$line")" 'BEGIN { print a + b }')
	AM_SINK_T=$((AM_SINK_T + s1 - s0)) AM_CADDY_T=$((AM_CADDY_T + c1 - c0)) AM_CADDY_UT=$((AM_CADDY_UT + cu1 - cu0))
done
GM_RATE=$(median "${GM_RATES[@]}")
AM_RATE=$(median "${AM_RATES[@]}")
AM_SUBMIT_RATE=$(median "${AM_SUBMIT[@]}")
GM_CLIENT_US=$(us_per_msg "$GM_CLIENT_S")
GM_SINK_US=$(us_per_msg "$(ticks_s "$GM_SINK_T")")
AM_CLIENT_US=$(us_per_msg "$AM_CLIENT_S")
AM_CADDY_US=$(us_per_msg "$(ticks_s "$AM_CADDY_T")")
AM_CADDY_USER_US=$(us_per_msg "$(ticks_s "$AM_CADDY_UT")")
AM_SINK_US=$(us_per_msg "$(ticks_s "$AM_SINK_T")")
GM_ALL_US=$((GM_CLIENT_US + GM_SINK_US))
AM_ALL_US=$((AM_CLIENT_US + AM_CADDY_US + AM_SINK_US))
# the CPU all processes may spend per message for authmail to deliver at
# 80% of go-mail's median rate, if the machine's cores were the only limit
CPU_BUDGET_US=$(awk -v c="$(nproc)" -v r="$GM_RATE" 'BEGIN { printf "%.0f", c * 1e6 / (0.8 * r) }')
P2_ERRORS=$(caddy_errors)
P2_ERROR_SUMMARY=$(error_summary)
stop "$CADDY_PID"

# ============================================================================
# Phase 3: end-to-end through the delay proxy
# ============================================================================

log "phase 3: end-to-end through a $DELAY-each-way proxy, $N_DELAY messages"
"$BIN/delayproxy" -listen "127.0.0.1:$PROXY_PORT" -target "127.0.0.1:$SINK_PORT" -delay "$DELAY" 2>"$WORK/delayproxy.log" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_port "$PROXY_PORT" delayproxy
start_caddy caddy-delay "$PROXY_PORT"

line=$("$BIN/gomailbench" -addr "127.0.0.1:$PROXY_PORT" -n "$N_DELAY" -conns "$SMTP_CONNS" -sample "$SAMPLE" "${GM_FLAGS[@]}" -sink-counter "$SINK_OUT")
log "go-mail:  $line"
GMD_RATE=$(kv e2e_rate <<<"$line")
line=$("$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n "$N_DELAY" -c "$SUBMIT_CONC" -key "$KEY" -async -sink-counter "$SINK_OUT" -sink-timeout 180s)
log "authmail: $line"
AMD_RATE=$(kv e2e_rate <<<"$line")
[ "$(kv delivered <<<"$line")" = "$N_DELAY" ] || P3_BAD=1
[ "$(kv delivered <<<"$line")" = "$N_DELAY" ] || problem "phase 3: smtp-sink received $(kv delivered <<<"$line") of $N_DELAY messages"
wait_queue_empty 120 || true
P3_ERRORS=$(caddy_errors)
P3_ERROR_SUMMARY=$(error_summary)
stop "$CADDY_PID"
stop "$PROXY_PID"
stop "$SINK_PID"

# ============================================================================
# Phase 1b: async accept with the SMTP server unreachable (no delivery work
# competing for the CPU beyond one fast-failing attempt per message)
# ============================================================================

log "phase 1b: wrk against authmail with SMTP unreachable (retries 1 h away)"
start_caddy caddy-accept "$CLOSED_PORT" "retry_backoff 1h" "max_backoff 1h" "max_queued 1000000"
run_wrk /authmail/send/otp "$WARMUP" >/dev/null
U_LINE=$(run_wrk /authmail/send/otp "$DURATION")
log "authmail (SMTP unreachable): $U_LINE"
U_RPS=$(rps "$U_LINE")
U_P50=$(ms "$(kv p50_us <<<"$U_LINE")")
U_P99=$(ms "$(kv p99_us <<<"$U_LINE")")
U_ERR=$(($(kv status_errors <<<"$U_LINE") + $(kv connect_errors <<<"$U_LINE") + $(kv read_errors <<<"$U_LINE") + $(kv timeouts <<<"$U_LINE")))
P1B_ERRORS=$(caddy_errors)
P1B_ERROR_SUMMARY=$(error_summary)
stop "$CADDY_PID"

# ============================================================================
# Phase 4: RSS with N_QUEUE messages queued
# ============================================================================

log "phase 4: RSS with $N_QUEUE messages queued (SMTP at the closed port $CLOSED_PORT)"
port_busy "$CLOSED_PORT" && die "port $CLOSED_PORT is no longer closed"
start_caddy caddy-queue "$CLOSED_PORT" "wait 10s" "retry_backoff 1h" "max_backoff 1h" "max_queued $((N_QUEUE + 1000))"
RSS_IDLE_KB=$(vm_kb "$CADDY_PID" VmRSS)
line=$("$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n "$N_QUEUE" -c "$SUBMIT_CONC" -key "$KEY" -async -progress)
log "authmail: $line"
Q_ACCEPTED=$(kv accepted <<<"$line")
Q_SUBMIT_RATE=$(kv submit_rps <<<"$line")
Q_P50=$(kv p50_ms <<<"$line")
Q_P99=$(kv p99_ms <<<"$line")
# wait until every message had its (failing) first attempt
t0=$SECONDS
last_tried=-1
last_change=$SECONDS
while :; do
	tried=$(metric caddy_authmail_delivery_attempts_total 'result="transient"')
	[ "$tried" -ge "$Q_ACCEPTED" ] && break
	if [ "$tried" != "$last_tried" ]; then
		last_tried=$tried
		last_change=$SECONDS
	fi
	if [ $((SECONDS - t0)) -ge 300 ] || [ $((SECONDS - last_change)) -ge 20 ]; then
		problem "phase 4: only $tried of $Q_ACCEPTED first delivery attempts happened ($((SECONDS - t0)) s after the last submission; no progress for $((SECONDS - last_change)) s)"
		break
	fi
	sleep 1
done
Q_ATTEMPT_WAIT=$((SECONDS - t0))
sleep 5
Q_DEPTH=$(metric caddy_authmail_queue_depth)
RSS_KB=$(vm_kb "$CADDY_PID" VmRSS)
HWM_KB=$(vm_kb "$CADDY_PID" VmHWM)
HEAP_INUSE=$(metric go_memstats_heap_inuse_bytes)
STORAGE_KB=$(du -sk "$CADDY_STORAGE" | awk '{ print $1 }')
STORAGE_APPARENT_KB=$(du -sk --apparent-size "$CADDY_STORAGE" | awk '{ print $1 }')
STORAGE_FILES=$(find "$CADDY_STORAGE" -type f | wc -l)
P4_ERRORS=$(caddy_errors)
P4_ERROR_SUMMARY=$(error_summary)
if [ "$Q_DEPTH" != "$Q_ACCEPTED" ]; then
	problem "phase 4: $Q_ACCEPTED messages accepted but queue_depth is $Q_DEPTH, so the RSS below is NOT the RSS with $N_QUEUE queued; Caddy errors: $P4_ERROR_SUMMARY"
fi
log "phase 4: queue_depth $Q_DEPTH, VmRSS $RSS_KB kB, VmHWM $HWM_KB kB, storage $STORAGE_KB kB in $STORAGE_FILES files"
stop "$CADDY_PID"

# ============================================================================
# Phase 5: phases 1 and 2 with the outbox on Redis
# ============================================================================

start_sink -c # phases 5 and 6 deliver to it
P5_BAD=0 P5_ERRORS=- P5_ERROR_SUMMARY="" RD_RPS=n/a RD_P50=n/a RD_P99=n/a RD_ERR=n/a RD_E2E=0
if ! "$BIN/caddy" list-modules 2>/dev/null | grep -qx caddy.storage.redis; then
	log "phase 5 skipped: this build has no caddy.storage.redis module"
else
log "phase 5: the outbox on Redis (appendonly yes, appendfsync always): async accept and end-to-end"
mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly yes --appendfsync always \
	--dir "$WORK/redis" --daemonize no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" redis-server
STORAGE_KIND=redis start_caddy caddy-redis "$SINK_PORT"
P5_SINK0=$(sink_count)
P5_ACC0=$(metric caddy_authmail_messages_accepted_total)
run_wrk /authmail/send/otp "$WARMUP" >/dev/null
wait_queue_empty 300 || true
RD_LINE=$(run_wrk /authmail/send/otp "$DURATION")
log "authmail on Redis: $RD_LINE"
wait_queue_empty 600 || true
RD_RPS=$(rps "$RD_LINE")
RD_P50=$(ms "$(kv p50_us <<<"$RD_LINE")")
RD_P99=$(ms "$(kv p99_us <<<"$RD_LINE")")
RD_ERR=$(($(kv status_errors <<<"$RD_LINE") + $(kv connect_errors <<<"$RD_LINE") + $(kv read_errors <<<"$RD_LINE") + $(kv timeouts <<<"$RD_LINE")))
line=$("$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n "$N" -c "$SUBMIT_CONC" -key "$KEY" -async -sink-counter "$SINK_OUT" -sink-timeout 300s)
log "authmail on Redis, end to end: $line"
RD_E2E=$(kv e2e_rate <<<"$line")
wait_queue_empty 120 || true
P5_ALL=$(($(metric caddy_authmail_messages_accepted_total) - P5_ACC0))
P5_DELIVERED=$(($(sink_count) - P5_SINK0))
if [ "$P5_DELIVERED" != "$P5_ALL" ]; then
	P5_BAD=1
	problem "phase 5: authmail on Redis accepted $P5_ALL messages but smtp-sink received $P5_DELIVERED; Caddy errors: $(error_summary)"
fi
P5_ERRORS=$(caddy_errors)
P5_ERROR_SUMMARY=$(error_summary)
stop "$CADDY_PID"
stop "$REDIS_PID"
fi

# ============================================================================
# Phase 6: Postfix as a local durable relay
# ============================================================================

log "phase 6: Postfix relay (smtp-source -s 32 -> postfix smtpd -> smtp-sink via relayhost), $N_POSTFIX messages"
PF=$WORK/postfix
mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
chown postfix "$PF/data"
cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.localdomain
mydestination =
local_recipient_maps =
relayhost = [127.0.0.1]:$SINK_PORT
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_destination_concurrency_limit = $SMTP_CONNS
smtp_initial_destination_concurrency = $SMTP_CONNS
smtp_connection_cache_destinations = [127.0.0.1]:$SINK_PORT
smtp_tls_security_level = none
maillog_file_prefixes = $PF
maillog_file = $PF/maillog
default_process_limit = 100
smtpd_client_connection_count_limit = 0
EOF
# no chroot, only the services a relay needs
cat >"$PF/etc/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
EOF
postfix -c "$PF/etc" check >"$PF/check.log" 2>&1 || die "postfix check failed (see $PF/maillog)"
postfix -c "$PF/etc" start >"$PF/start.log" 2>&1 || die "postfix did not start (see $PF/maillog)"
wait_port "$PF_PORT" "postfix smtpd"
PF_BODY=$((${MSG_SIZE:-3000} > 300 ? ${MSG_SIZE:-3000} - 200 : 100))
wait_sink() { # wait_sink COUNT TIMEOUT_S: until smtp-sink counted COUNT
	local t0=$SECONDS
	while [ "$(sink_count)" -lt "$1" ]; do
		[ $((SECONDS - t0)) -ge "$2" ] && return 1
		sleep 0.05
	done
}
PF_W0=$(sink_count)
smtp-source -s 8 -m 200 -l "$PF_BODY" -f bench@example.com -t user@example.com "127.0.0.1:$PF_PORT" # warm-up
wait_sink "$((PF_W0 + 200))" 60 || problem "phase 6: the Postfix warm-up did not arrive"
PF_SINK0=$(sink_count)
t0=$(date +%s.%N)
smtp-source -s 32 -m "$N_POSTFIX" -l "$PF_BODY" -f bench@example.com -t user@example.com "127.0.0.1:$PF_PORT"
t1=$(date +%s.%N)
P6_BAD=0
wait_sink "$((PF_SINK0 + N_POSTFIX))" 600 || {
	P6_BAD=1
	problem "phase 6: smtp-sink received $(($(sink_count) - PF_SINK0)) of $N_POSTFIX messages through Postfix"
}
t2=$(date +%s.%N)
PF_ACCEPT=$(awk -v n="$N_POSTFIX" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
PF_E2E=$(awk -v n="$N_POSTFIX" -v a="$t0" -v b="$t2" 'BEGIN { printf "%.0f", n / (b - a) }')
log "postfix: accepted $PF_ACCEPT msgs/s, end to end $PF_E2E msgs/s"
postfix -c "$PF/etc" stop >/dev/null 2>&1 || true
stop "$SINK_PID"

# ============================================================================
# Phase 7: synchronous sends through the delay proxy, STARTTLS and AUTH
# ============================================================================

log "phase 7: synchronous /send/otp through a $DELAY-each-way proxy to a STARTTLS+AUTH server, $N_SYNC requests one at a time"
TLS_PASS=bench-smtp-pass-$RANDOM$RANDOM
"$BIN/tlssink" -addr "127.0.0.1:$TLS_SINK_PORT" -ca "$WORK/tlssink-ca.pem" -user bench -pass "$TLS_PASS" >"$WORK/tlssink.log" 2>&1 &
PIDS+=("$!")
TLS_SINK_PID=$!
wait_port "$TLS_SINK_PORT" tlssink
"$BIN/delayproxy" -listen "127.0.0.1:$PROXY_PORT" -target "127.0.0.1:$TLS_SINK_PORT" -delay "$DELAY" 2>"$WORK/delayproxy7.log" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_port "$PROXY_PORT" delayproxy
SMTP_OPTS=$'\t\t\t\tusername bench\n\t\t\t\tpassword '"$TLS_PASS"$'\n\t\t\t\tca '"$WORK/tlssink-ca.pem"
start_caddy caddy-sync "$PROXY_PORT"
SMTP_OPTS=$'\t\t\t\ttls none'
# warm-up: the first request dials, STARTTLS and AUTH; then the connection is pooled
"$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n 5 -c 1 -key "$KEY" -async=false >/dev/null
line=$("$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n "$N_SYNC" -c 1 -key "$KEY" -async=false)
log "authmail sync: $line"
SY_P50=$(kv p50_ms <<<"$line")
SY_P99=$(kv p99_ms <<<"$line")
SY_OK=$(kv accepted <<<"$line")
[ "$SY_OK" = "$N_SYNC" ] || problem "phase 7: only $SY_OK of $N_SYNC synchronous sends answered 200"
P7_ERRORS=$(caddy_errors)
P7_ERROR_SUMMARY=$(error_summary)
stop "$CADDY_PID"
# one SMTP round trip through the proxy as a client sees it (NOOP after
# EHLO): the proxy's own forwarding adds to its 2 x DELAY
rtt=$("$BIN/rttprobe" -addr "127.0.0.1:$PROXY_PORT" -n 200)
RTT_P50=$(kv p50_ms <<<"$rtt")
stop "$PROXY_PID"
stop "$TLS_SINK_PID"
probe=$("$BIN/storeprobe" -dir "$STORAGE_BASE/storeprobe" -n 200 -size 3000)
STORE_P50=$(kv p50_ms <<<"$probe")
DELAY_MS=$(awk -v d="$DELAY" 'BEGIN { sub(/ms$/, "", d); print d + 0 }')
SY_FLOOR=$(awk -v r="$RTT_P50" -v s="$STORE_P50" 'BEGIN { printf "%.2f", 2 * r + s }')
log "phase 7: p50 $SY_P50 ms, p99 $SY_P99 ms; floor $SY_FLOOR ms (2 measured round trips through the proxy, p50 $RTT_P50 ms each for a $((2 * ${DELAY_MS%.*})) ms delay, + one durable write, p50 $STORE_P50 ms)"
fi # RUN_MAIN

# ============================================================================
# Phase 8: a throttled provider
# ============================================================================

TH_ROWS=()
TH_PROBLEMS=()
th_problem() {
	problem "$@"
	TH_PROBLEMS+=("$*")
}
if [ "$RUN_THROTTLE" = 1 ]; then
log "phase 8: $N_THROTTLE OTPs at once to a server that takes $THROTTLE_RATE messages/s (burst $THROTTLE_BURST) and answers 454 above it; each sender gets $THROTTLE_CAP s after the submissions"
TH_IDEAL=$(awk -v n="$N_THROTTLE" -v r="$THROTTLE_RATE" 'BEGIN { printf "%.0f", n / r }')
# throttled_count FILE: the throttling replies throttlesink has sent so far
throttled_count() {
	tail -c 300 "$1" | tr '\r' '\n' | sed -n 's/.*throttled=\([0-9][0-9]*\).*/\1/p' | tail -1
}
# throttle_row LABEL NAME CADDY_BIN [SMTP_LINE]: one sender, a fresh
# throttlesink and a fresh Caddy; adds a row to TH_ROWS
throttle_row() {
	local label=$1 name=$2 bin=$3 counter=$WORK/$2.counter
	local saved_opts=$SMTP_OPTS saved_rate_off=$RATE_OFF line accepted delivered e2e throttled took final sink_pid
	SMTP_OPTS=$'\t\t\t\ttls none'
	[ -z "${4:-}" ] || SMTP_OPTS+=$'\n\t\t\t\t'"$4"
	RATE_OFF=1
	adapts "$bin" || RATE_OFF=0
	if ! adapts "$bin"; then
		log "phase 8: $label skipped, the build does not take its config: $(tail -1 "$WORK/probe.err")"
		TH_ROWS+=("| $label | n/a: the build does not take this config | | | | |")
		SMTP_OPTS=$saved_opts RATE_OFF=$saved_rate_off
		return
	fi
	"$BIN/throttlesink" -addr "127.0.0.1:$THROTTLE_PORT" -rate "$THROTTLE_RATE" -burst "$THROTTLE_BURST" -counter "$counter" >"$WORK/$name-sink.log" 2>&1 &
	sink_pid=$!
	PIDS+=("$sink_pid")
	wait_port "$THROTTLE_PORT" throttlesink
	CADDY_BIN=$bin start_caddy "$name" "$THROTTLE_PORT"
	line=$("$BIN/loadgen" -url "http://127.0.0.1:$HTTP_PORT/authmail/send/otp" -n "$N_THROTTLE" -c "$SUBMIT_CONC" -key "$KEY" -async -sink-counter "$counter" -sink-timeout "${THROTTLE_CAP}s" 2>>"$WORK/$name-loadgen.err")
	throttled=$(throttled_count "$counter")
	log "phase 8, $name: $line throttled=$throttled"
	accepted=$(kv accepted <<<"$line")
	delivered=$(kv delivered <<<"$line")
	e2e=$(kv e2e_s <<<"$line")
	[ "$accepted" = "$N_THROTTLE" ] || th_problem "phase 8 ($name): only $accepted of $N_THROTTLE requests were accepted"
	if [ "$delivered" -ge "$accepted" ] && [ -z "$(kv e2e_error <<<"$line")" ]; then
		took="$(fmt_num "$e2e" 1) s"
		TH_RATIO=$(awk -v a="$e2e" -v b="$TH_IDEAL" 'BEGIN { printf "%.2f×", a / b }')
		# nothing may arrive twice: with the queue empty the server has
		# exactly the accepted messages
		wait_queue_empty 60 || th_problem "phase 8 ($name): the queue did not empty after every message had arrived"
		sleep 1
		final=$(kv mesg < <(tail -c 300 "$counter" | tr '\r' '\n' | grep mesg= | tail -1))
		[ "$final" = "$accepted" ] || th_problem "phase 8 ($name): the server accepted $final messages for $accepted requests"
	else
		took="> $THROTTLE_CAP s"
		TH_RATIO="> $(awk -v a="$THROTTLE_CAP" -v b="$TH_IDEAL" 'BEGIN { printf "%.0f×", a / b }')"
	fi
	[ "$(caddy_errors)" = 0 ] || log "phase 8 ($name): Caddy logged errors: $(error_summary)"
	TH_ROWS+=("| $label | $delivered of $accepted | $took | $throttled | $TH_IDEAL s | $TH_RATIO |")
	stop "$CADDY_PID"
	stop "$sink_pid"
	SMTP_OPTS=$saved_opts RATE_OFF=$saved_rate_off
}
throttle_row "authmail, \`smtp { rate $THROTTLE_RATE/1s }\`" throttle-rate "$BIN/caddy" "rate $THROTTLE_RATE/1s"
throttle_row "authmail, no \`rate\` (slows down on throttling replies)" throttle-adaptive "$BIN/caddy"
throttle_row "authmail at $BEFORE_REV, before send-rate caps (a throttled message waits \`retry_backoff\`, default 30 s doubling)" throttle-before "$BIN/caddy-$BEFORE_REV"
fi # RUN_THROTTLE

# ============================================================================
# Results
# ============================================================================

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
verdict() { # verdict VALUE THRESHOLD [INVALID]
	if [ "${3:-0}" = 1 ]; then
		echo "**invalid**: accepted messages were lost (see Integrity problems)"
	elif ge "$1" "$2"; then
		echo "met"
	else
		echo "**not met**"
	fi
}
bad() { [ "$1" = 1 ] && echo " (**invalid**: messages lost)" || true; }

RESULTS=$(
	cat <<EOF
## Results

Caddy built from $BUILT_FROM$([ "$RATE_OFF" = 1 ] && echo "; rate limits turned off in the bench config").
Machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r), $(go version | awk '{ print $3 }'); $(date -u +%Y-%m-%dT%H:%MZ).
Load average (1/5/15 min) at start: $LOAD_START; at end: $LOAD_END.
Outbox storage: $(findmnt -n -o FSTYPE,SOURCE,OPTIONS --target "$STORAGE_BASE" | awk '{ print $1 " on " $2 " (" $3 ")" }').
EOF
)

if [ "$RUN_MAIN" = 1 ]; then
ACC_RATIO=$(awk -v a="$A_RPS" -v r="$R_RPS" 'BEGIN { print (r > 0 ? a / r : 0) }')
E2E_RATIO=$(awk -v a="$AM_RATE" -v g="$GM_RATE" 'BEGIN { print (g > 0 ? a / g : 0) }')
DLY_RATIO=$(awk -v a="$AMD_RATE" -v g="$GMD_RATE" 'BEGIN { print (g > 0 ? a / g : 0) }')
RSS_MB=$(mb "$RSS_KB")
if [ "$Q_DEPTH" != "$Q_ACCEPTED" ]; then
	RSS_VERDICT="**invalid**: only $Q_DEPTH of $Q_ACCEPTED messages were still queued"
elif awk -v m="$RSS_MB" 'BEGIN { exit !(m < 150) }'; then
	RSS_VERDICT=met
else
	RSS_VERDICT="**not met**"
fi

RESULTS+=$'\n'$(
	cat <<EOF
Message: authmail OTP, $MSG_SIZE bytes on the wire; go-mail baseline message $GM_SIZE bytes.

### 1. Async accept (wrk -t$THREADS -c$CONNS -d$DURATION, POST with the OTP body, after a $WARMUP warm-up)

| Endpoint | Requests/s | p50 | p99 | Errors |
| --- | ---: | ---: | ---: | ---: |
| Caddy \`respond "ok" 200\` | $R_RPS | $R_P50 ms | $R_P99 ms | $R_ERR |
| authmail \`/send/otp\`, \`Prefer: respond-async\` (202) | $A_RPS | $A_P50 ms | $A_P99 ms | $A_ERR |
| **authmail / respond** | **$(ratio "$A_RPS" "$R_RPS")** | | | |
| authmail, SMTP unreachable (separate instance; one fast-failing attempt per message, no delivery) | $U_RPS | $U_P50 ms | $U_P99 ms | $U_ERR |
| authmail (SMTP unreachable) / respond | $(ratio "$U_RPS" "$R_RPS") | | | |

Messages accepted in the measured authmail run: $P1_ACCEPTED, delivered to smtp-sink meanwhile; the queue drained $P1_DRAIN_S s after wrk stopped. Phase 1 in all (warm-up included): $P1_ALL_ACCEPTED accepted, $P1_DELIVERED received by smtp-sink.

### 2–3. End-to-end delivery to smtp-sink ($SMTP_CONNS SMTP connections)

| Path | Messages | $GM_LABEL msgs/s | authmail msgs/s | authmail / go-mail |
| --- | ---: | ---: | ---: | ---: |
| loopback (median of $REPS) | $N | $(fmt_num "$GM_RATE") | $(fmt_num "$AM_RATE")$(bad "$P2_BAD") | **$(ratio "$AM_RATE" "$GM_RATE")** |
| +$DELAY each way (delay proxy) | $N_DELAY | $(fmt_num "$GMD_RATE") | $(fmt_num "$AMD_RATE")$(bad "$P3_BAD") | **$(ratio "$AMD_RATE" "$GMD_RATE")** |

Loopback runs: go-mail $(printf '%s ' "${GM_RATES[@]}")msgs/s; authmail $(printf '%s ' "${AM_RATES[@]}")msgs/s (submission alone: $(printf '%s ' "${AM_SUBMIT[@]}")requests/s with $SUBMIT_CONC concurrent requests).

CPU time per delivered message on loopback, over all $REPS runs of each (Caddy and smtp-sink from \`/proc/<pid>/stat\`, user plus system time; the two clients from \`getrusage\`, counted until their last message was handed over):

| Process | go-mail runs | authmail runs |
| --- | ---: | ---: |
| sender: go-mail's client / the HTTP load generator | ${GM_CLIENT_US} µs | ${AM_CLIENT_US} µs |
| Caddy with authmail (of which user time) | | ${AM_CADDY_US} µs (${AM_CADDY_USER_US} µs) |
| smtp-sink | ${GM_SINK_US} µs | ${AM_SINK_US} µs |
| **all processes** | **${GM_ALL_US} µs** | **${AM_ALL_US} µs** |

Delivering at 80% of go-mail's median rate on these $(nproc) cores leaves at most $(nproc) × 1 s ÷ (0.8 × $(fmt_num "$GM_RATE") msgs/s) = **${CPU_BUDGET_US} µs** of CPU per message for all processes together, if the cores were the only limit; authmail's runs used ${AM_ALL_US} µs.

### 4. Memory with $N_QUEUE messages queued

| Measure | Value |
| --- | ---: |
| messages accepted / queue_depth | $Q_ACCEPTED / $Q_DEPTH |
| time until every message had its first (failing) attempt | $Q_ATTEMPT_WAIT s after the last submission |
| submission rate ($SUBMIT_CONC concurrent, Go load generator) | $(fmt_num "$Q_SUBMIT_RATE") requests/s, p50 $Q_P50 ms, p99 $Q_P99 ms |
| VmRSS right after start | $(mb "$RSS_IDLE_KB") MB |
| **VmRSS with the queue** | **$RSS_MB MB** |
| VmHWM (peak RSS) | $(mb "$HWM_KB") MB |
| Go heap in use | $(awk -v b="$HEAP_INUSE" 'BEGIN { printf "%.1f", b / 1048576 }') MB |
| storage on disk (du) | $(mb "$STORAGE_KB") MB ($(mb "$STORAGE_APPARENT_KB") MB apparent) in $STORAGE_FILES files |

### 5. The outbox on Redis (redis-server $(redis-server --version | awk '{ print $3 }' | sed 's/v=//'), appendonly yes, appendfsync always)

| Measure | file_system (phases 1–2) | Redis | Redis / file_system |
| --- | ---: | ---: | ---: |
| async accept, requests/s (p50, p99) | $A_RPS ($A_P50 ms, $A_P99 ms) | $RD_RPS ($RD_P50 ms, $RD_P99 ms; $RD_ERR errors) | $(ratio "$RD_RPS" "$A_RPS") |
| end-to-end on loopback, msgs/s | $(fmt_num "$AM_RATE") | $(fmt_num "$RD_E2E")$(bad "$P5_BAD") | **$(ratio "$RD_E2E" "$AM_RATE")** |

### 6. Postfix as a local durable relay ($N_POSTFIX messages of $PF_BODY bytes, smtp-source -s 32 → smtpd → queue on the same disk → smtp-sink through relayhost, $SMTP_CONNS delivery connections)

| Measure | Postfix relay | authmail (phase 2) | authmail / Postfix |
| --- | ---: | ---: | ---: |
| accepted, msgs/s | $PF_ACCEPT | $(fmt_num "$AM_SUBMIT_RATE") (submission, while delivering) | $(ratio "$AM_SUBMIT_RATE" "$PF_ACCEPT") |
| end to end, msgs/s | $PF_E2E$(bad "$P6_BAD") | $(fmt_num "$AM_RATE") | **$(ratio "$AM_RATE" "$PF_E2E")** |

### 7. Synchronous sends (default mode) through +$DELAY each way, STARTTLS and AUTH PLAIN, pooled connection, one request at a time

| Measure | Value |
| --- | ---: |
| p50 time to the 200 | **$SY_P50 ms** |
| p99 | $SY_P99 ms |
| floor: two SMTP round trips through the proxy (NOOP p50 $RTT_P50 ms each, $DELAY each way) + one durable write (file storage Store p50 $STORE_P50 ms) | $SY_FLOOR ms |
| p50 / floor | $(ratio "$SY_P50" "$SY_FLOOR") |

Error lines in Caddy's logs (level ERROR; transient delivery failures log at WARN and are not counted):

| Instance | Error lines | Messages |
| --- | ---: | --- |
| loopback (phases 0–2) | $P2_ERRORS | ${P2_ERROR_SUMMARY:-} |
| delay proxy (phase 3) | $P3_ERRORS | ${P3_ERROR_SUMMARY:-} |
| SMTP unreachable, accept (phase 1b) | $P1B_ERRORS | ${P1B_ERROR_SUMMARY:-} |
| SMTP unreachable, $N_QUEUE queued (phase 4) | $P4_ERRORS | ${P4_ERROR_SUMMARY:-} |
| Redis (phase 5) | $P5_ERRORS | ${P5_ERROR_SUMMARY:-} |
| synchronous, STARTTLS+AUTH (phase 7) | $P7_ERRORS | ${P7_ERROR_SUMMARY:-} |

Integrity problems: $(if [ ${#PROBLEMS[@]} = 0 ]; then echo "none (every accepted message reached smtp-sink; the queue held every message in phase 4)."; else printf '\n\n'; printf -- '- %s\n' "${PROBLEMS[@]}"; fi)

### Targets

| Target | Measured | Verdict |
| --- | ---: | --- |
| async accept >= 25% of respond's requests/s | $(ratio "$A_RPS" "$R_RPS") | $(verdict "$ACC_RATIO" 0.25)$([ "$P1_BAD" = 1 ] && echo " (messages were lost after acceptance)") |
| end-to-end delivery >= 80% of raw go-mail (loopback) | $(ratio "$AM_RATE" "$GM_RATE") | $(verdict "$E2E_RATIO" 0.80 "$P2_BAD") |
| end-to-end delivery >= 80% of raw go-mail (10 ms RTT) | $(ratio "$AMD_RATE" "$GMD_RATE") | $(verdict "$DLY_RATIO" 0.80 "$P3_BAD") |
| RSS < 150 MB with $N_QUEUE queued | $RSS_MB MB | $RSS_VERDICT |
| end-to-end on Redis >= 50% of file_system | $(ratio "$RD_E2E" "$AM_RATE") | $(verdict "$(awk -v a="$RD_E2E" -v b="$AM_RATE" 'BEGIN { print (b > 0 ? a / b : 0) }')" 0.50 "$P5_BAD") |
| end-to-end >= 4× the Postfix relay | $(awk -v a="$AM_RATE" -v b="$PF_E2E" 'BEGIN { printf "%.2f×", (b > 0 ? a / b : 0) }') | $(verdict "$(awk -v a="$AM_RATE" -v b="$PF_E2E" 'BEGIN { print (b > 0 ? a / b : 0) }')" 4 "$P2_BAD") |
| synchronous p50 within 25% of its floor | $(ratio "$SY_P50" "$SY_FLOOR") | $(verdict "$(awk -v a="$SY_P50" -v b="$SY_FLOOR" 'BEGIN { print (a > 0 ? 1.25 * b / a : 0) }')" 1) |
EOF
)
fi # RUN_MAIN

if [ "$RUN_THROTTLE" = 1 ]; then
RESULTS+=$'\n\n'$(
	cat <<EOF
### 8. A throttled provider ($N_THROTTLE OTPs submitted at once with \`Prefer: respond-async\`, $SMTP_CONNS SMTP connections; the server takes $THROTTLE_RATE messages/s across connections, burst $THROTTLE_BURST, and answers \`454 4.7.0 Throttling failure: Maximum sending rate exceeded\` above it)

| Sender | Delivered | Time until the server had accepted all | Throttling replies | Ideal ($N_THROTTLE ÷ $THROTTLE_RATE/s) | Time / ideal |
| --- | ---: | ---: | ---: | ---: | ---: |
$(printf '%s\n' "${TH_ROWS[@]}")

Times run from the first submission; a sender that had not delivered every message $THROTTLE_CAP s after the last submission is stopped there. Integrity problems: $(if [ ${#TH_PROBLEMS[@]} = 0 ]; then echo "none (every message arrived once, or the sender was stopped at the cap)."; else printf '\n\n'; printf -- '- %s\n' "${TH_PROBLEMS[@]}"; fi)
EOF
)
fi

echo
echo "$RESULTS"
if [ -n "$RESULTS_FILE" ]; then
	echo "$RESULTS" >"$RESULTS_FILE"
fi
