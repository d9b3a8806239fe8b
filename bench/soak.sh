#!/usr/bin/env bash
# bench/soak.sh: a mixed load through redfuse for DURATION seconds while faults are injected
# on a schedule; reports throughput, p99, errors by class, RSS over time (PNG) and the final
# write-queue and cache state.
#
# Usage:
#   bench/soak.sh                      # 10 minutes (DURATION=600)
#   DURATION=60 bench/soak.sh          # a short run: a fault every 12 s
#   FAULTS="kill stop" CLIENTS=100 DURATION=300 bench/soak.sh
#
# What runs, all on loopback, ephemeral ports:
#   redis-server (append-only file, appendfsync no: a SIGKILL loses no acknowledged write)
#     <- relay (bench/soak/loadgen.rs `relay`: pass | blackhole | delay MS)
#     <- redfuse (release build; default breaker, timeouts and probe; fail-open rules: a
#        `reply` rule for INCR sr:*, an `error` rule for SET sk:*, a `queue` rule for
#        RPUSH sq:*; the write queue journaled to a file)
#     <- loadgen `load` (bench/soak/loadgen.rs, compiled here with rustc -O): CLIENTS
#        threads, each on its own keys: GET (cached), SET, INCR, RPUSH of increasing
#        numbers, PING tokens; single commands and pipelines of 2-6. Each reply is checked
#        against its request (a value names its key, a PING echoes its token): anything
#        else counts as `wrong_reply`.
# Every FAULT_PERIOD seconds the next fault of FAULTS starts and lasts FAULT_HOLD seconds:
#   kill       SIGKILL redis-server, start it again on the same port and data
#   stop       SIGSTOP redis-server, then SIGCONT
#   blackhole  the relay accepts and reads but forwards nothing, either way
#   delay      the relay holds every reply chunk DELAY_MS
# After the load: the write queue must drain by itself, and every push redfuse acknowledged
# must be in Redis exactly once and in order (loadgen reads the lists directly).
#
# Output in OUT_DIR: report.md (the figures), soak.png (requests/s, latency p50/p99/max,
# errors/s by class, RSS of redfuse and Redis, faults shaded), timeline.csv (per second),
# rss.csv, faults.csv, summary.txt (loadgen's totals), write-queue.json, metrics.txt, logs.
#
# Environment (defaults in brackets):
#   DURATION      seconds of load [600]
#   CLIENTS       load threads [50]
#   THINK_MS      pause between a client's batches, ms [2]
#   FAULTS        fault kinds, cycled in order ["kill stop blackhole delay"]; "" for none
#   FAULT_PERIOD  seconds from one fault's start to the next [DURATION/5, at most 30]
#   FAULT_HOLD    seconds a fault lasts [5]
#   DELAY_MS      reply delay of the `delay` fault [300]
#   BOUND_MS      a reply slower than this counts as `over_bound` [6000: the default
#                 command timeout, 5000 ms, plus 1 s]
#   REDFUSE_BIN   redfuse binary [cargo build --release, target/release/redfuse]
#   EXTRA_CONFIG  TOML appended to redfuse's config file (e.g. "[breaker]\nopen_base_ms = 1000")
#   OUT_DIR       [target/soak/<UTC time>]
#   PLOT          0: no PNG [1]. The plot needs python3 with matplotlib; when it is missing
#                 this script runs `python3 -m pip install matplotlib` (PLOT_INSTALL=0: don't).
#
# Needs: redis-server, redis-cli, curl, rustc (the project's toolchain), python3.
# Runs on 2 cores: the load generator, redfuse and Redis share them, so the throughput is
# that of the whole loopback setup, not of redfuse alone.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-600}
CLIENTS=${CLIENTS:-50}
THINK_MS=${THINK_MS:-2}
FAULTS=${FAULTS-kill stop blackhole delay}
FAULT_HOLD=${FAULT_HOLD:-5}
DELAY_MS=${DELAY_MS:-300}
BOUND_MS=${BOUND_MS:-6000}
PLOT=${PLOT:-1}
PLOT_INSTALL=${PLOT_INSTALL:-1}
EXTRA_CONFIG=${EXTRA_CONFIG:-}
if [[ -z ${FAULT_PERIOD:-} ]]; then
    FAULT_PERIOD=$((DURATION / 5))
    ((FAULT_PERIOD > 30)) && FAULT_PERIOD=30
    ((FAULT_PERIOD < FAULT_HOLD + 3)) && FAULT_PERIOD=$((FAULT_HOLD + 3))
fi
OUT_DIR=${OUT_DIR:-$ROOT/target/soak/$(date -u +%Y%m%dT%H%M%SZ)}

log() { printf '[soak %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

for v in DURATION CLIENTS THINK_MS FAULT_PERIOD FAULT_HOLD DELAY_MS BOUND_MS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
for tool in redis-server redis-cli curl rustc python3 awk; do
    command -v "$tool" >/dev/null || die "$tool not found (redis-server/redis-cli: apt-get install redis-server redis-tools)"
done

mkdir -p "$OUT_DIR"
log "output in $OUT_DIR"

if [[ $PLOT == 1 ]] && ! python3 -c 'import matplotlib' 2>/dev/null; then
    if [[ $PLOT_INSTALL == 1 ]]; then
        log "installing matplotlib for the plot (python3 -m pip install matplotlib)"
        python3 -m pip install --quiet matplotlib >&2 ||
            python3 -m pip install --quiet --break-system-packages matplotlib >&2 ||
            { log "matplotlib could not be installed: no PNG"; PLOT=0; }
    else
        log "matplotlib missing and PLOT_INSTALL=0: no PNG"
        PLOT=0
    fi
fi

if [[ -z ${REDFUSE_BIN:-} ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    REDFUSE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/redfuse
fi
[[ -x $REDFUSE_BIN ]] || die "no redfuse binary at $REDFUSE_BIN"

LOADGEN=$OUT_DIR/loadgen
rustc -O --edition 2021 "$ROOT/bench/soak/loadgen.rs" -o "$LOADGEN" || die "rustc loadgen.rs failed"

declare -a PIDS=()
REDIS_PID="" RF_PID="" RELAY_PID="" LOAD_PID="" SAMPLER_PID=""

stop_pid() {
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # invoked by trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$LOAD_PID"
    stop_pid "$SAMPLER_PID"
    stop_pid "$RF_PID"
    stop_pid "$RELAY_PID"
    stop_pid "$REDIS_PID"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ping() {
    local port=$1 what=$2 i
    for ((i = 0; i < 100; i++)); do
        [[ $(timeout 2 redis-cli -p "$port" ping 2>/dev/null) == PONG ]] && return 0
        sleep 0.1
    done
    die "$what on port $port does not answer PING"
}

REDIS_PORT=$(free_port)
# A fresh dataset and journal: an OUT_DIR used before would otherwise replay the last run's
# lists into this one's exactly-once check.
rm -rf "$OUT_DIR/redis" "$OUT_DIR/journal"
mkdir -p "$OUT_DIR/redis"
start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes \
        --appendfsync no --dir "$OUT_DIR/redis" --daemonize no --loglevel warning \
        >>"$OUT_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    echo "$REDIS_PID" >"$OUT_DIR/redis.pid"
    wait_ping "$REDIS_PORT" redis-server
}
start_redis

echo pass >"$OUT_DIR/relay.mode"
rm -f "$OUT_DIR/relay.port"
"$LOADGEN" relay --target "127.0.0.1:$REDIS_PORT" --control "$OUT_DIR/relay.mode" \
    --port-file "$OUT_DIR/relay.port" >"$OUT_DIR/relay.log" 2>&1 &
RELAY_PID=$!
for ((i = 0; i < 100; i++)); do [[ -s $OUT_DIR/relay.port ]] && break; sleep 0.05; done
RELAY_PORT=$(cat "$OUT_DIR/relay.port")

RF_PORT=$(free_port)
ADMIN_PORT=$(free_port)
cat >"$OUT_DIR/redfuse.toml" <<EOF
listen = "127.0.0.1:$RF_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
log_level = "warn"

[[upstreams]]
name = "main"
addr = "127.0.0.1:$RELAY_PORT"
role = "primary"

[fail_open]
[[fail_open.rules]]
name = "ratelimit"
commands = ["INCR"]
keys = ["sr:*"]
action = "reply"
reply = ":1"
[[fail_open.rules]]
name = "refuse"
commands = ["SET"]
keys = ["sk:*"]
action = "error"
message = "ERR soak: write refused"
[[fail_open.rules]]
name = "queue"
commands = ["RPUSH"]
keys = ["sq:*"]
action = "queue"
reply = ":0"

[write_queue]
journal_path = "$OUT_DIR/journal"
EOF
printf '%b\n' "$EXTRA_CONFIG" >>"$OUT_DIR/redfuse.toml"
"$REDFUSE_BIN" --config "$OUT_DIR/redfuse.toml" >"$OUT_DIR/redfuse.log" 2>&1 &
RF_PID=$!
wait_ping "$RF_PORT" redfuse

# RSS of redfuse and Redis once a second, seconds since the load began.
T0=$(date +%s.%N)
since() { awk -v t0="$T0" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - t0 }'; }
rss() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
(
    echo "t,redfuse_kib,redis_kib"
    while kill -0 "$RF_PID" 2>/dev/null; do
        rp=$(cat "$OUT_DIR/redis.pid" 2>/dev/null || true)
        echo "$(since),$(rss "$RF_PID"),${rp:+$(rss "$rp")}"
        sleep 1
    done
) >"$OUT_DIR/rss.csv" 2>/dev/null &
SAMPLER_PID=$!

log "load: $CLIENTS clients for ${DURATION}s; faults every ${FAULT_PERIOD}s for ${FAULT_HOLD}s: ${FAULTS:-none}"
"$LOADGEN" load --redfuse "127.0.0.1:$RF_PORT" --redis "127.0.0.1:$REDIS_PORT" \
    --admin "127.0.0.1:$ADMIN_PORT" --duration "$DURATION" --clients "$CLIENTS" \
    --think-ms "$THINK_MS" --bound-ms "$BOUND_MS" --out "$OUT_DIR" >"$OUT_DIR/loadgen.log" 2>&1 &
LOAD_PID=$!

# The schedule: the next fault every FAULT_PERIOD seconds, none within the last period/2.
echo "start,end,kind" >"$OUT_DIR/faults.csv"
read -r -a KINDS <<<"$FAULTS"
n=0
next=$FAULT_PERIOD
while ((${#KINDS[@]} > 0 && next + FAULT_PERIOD / 2 <= DURATION)); do
    while awk -v t="$(since)" -v n="$next" 'BEGIN { exit !(t < n) }'; do sleep 0.2; done
    kind=${KINDS[n % ${#KINDS[@]}]}
    start=$(since)
    log "fault $((n + 1)) at ${start}s: $kind for ${FAULT_HOLD}s"
    case $kind in
    kill)
        kill -KILL "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
        sleep "$FAULT_HOLD"
        start_redis
        ;;
    stop)
        kill -STOP "$REDIS_PID"
        sleep "$FAULT_HOLD"
        kill -CONT "$REDIS_PID"
        ;;
    blackhole)
        echo blackhole >"$OUT_DIR/relay.mode"
        sleep "$FAULT_HOLD"
        echo pass >"$OUT_DIR/relay.mode"
        ;;
    delay)
        echo "delay $DELAY_MS" >"$OUT_DIR/relay.mode"
        sleep "$FAULT_HOLD"
        echo pass >"$OUT_DIR/relay.mode"
        ;;
    *) die "unknown fault kind '$kind' (kill, stop, blackhole, delay)" ;;
    esac
    echo "$start,$(since),$kind" >>"$OUT_DIR/faults.csv"
    n=$((n + 1))
    next=$((next + FAULT_PERIOD))
done

LOAD_RC=0
wait "$LOAD_PID" || LOAD_RC=$?
LOAD_PID=""
((LOAD_RC == 0)) || { tail -20 "$OUT_DIR/loadgen.log" >&2; die "loadgen failed ($LOAD_RC)"; }

curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/write-queue" >"$OUT_DIR/write-queue.json" || true
curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT_DIR/metrics.txt" || true
curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/breakers" >"$OUT_DIR/breakers.json" || true
stop_pid "$SAMPLER_PID"
SAMPLER_PID=""

if [[ $PLOT == 1 ]]; then
    python3 "$ROOT/bench/soak/plot.py" "$OUT_DIR" >/dev/null || log "plot failed"
fi

metric() { awk -v w="$1" '$1 == w { print $2; exit }' "$OUT_DIR/metrics.txt"; }
metric_sum() { awk -v p="$1" 'index($1, p) == 1 { s += $2 } END { print s + 0 }' "$OUT_DIR/metrics.txt"; }
val() { awk -F= -v k="$1" '$1 == k { sub(/^[^=]*=/, ""); print; exit }' "$OUT_DIR/summary.txt"; }
rss_stats=$(awk -F, 'NR > 1 && $2 != "" { n++; if (n == 1) first = $2; last = $2; if ($2 > max) max = $2 }
    END { printf "start %.1f MiB, peak %.1f MiB, end %.1f MiB", first / 1024, max / 1024, last / 1024 }' "$OUT_DIR/rss.csv")
stalled=$(awk -F, 'NR > 1 && $2 == 0 { n++ } END { print n + 0 }' "$OUT_DIR/timeline.csv")
worst=$(awk -F, 'NR > 1 && $4 > m { m = $4; t = $1 } END { printf "%.1f ms (second %d)", m, t }' "$OUT_DIR/timeline.csv")

{
    echo "# redfuse soak, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg); redfuse $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') ($REDFUSE_BIN);"
    echo "$(redis-server --version | awk '{ print $1, $2, $3 }'); ${DURATION}s, $CLIENTS clients, think ${THINK_MS} ms;"
    echo "faults every ${FAULT_PERIOD}s for ${FAULT_HOLD}s: ${FAULTS:-none} (delay ${DELAY_MS} ms)."
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| requests answered | $(val requests) |"
    echo "| throughput | $(val throughput_rps) req/s |"
    echo "| latency (whole run) | $(val latency_ms) |"
    echo "| worst per-second p99 | $worst |"
    echo "| seconds in which no request was answered | $stalled |"
    for c in circuit_open timeout rule_refused queue_full replay_gate oom other_error wrong_reply conn_lost no_reply over_bound; do
        echo "| errors: $c | $(val "errors.$c") |"
    done
    echo "| pushes acknowledged / missing / lists out of order / refused but present | $(val pushes_acknowledged) / $(val pushes_missing) / $(val lists_out_of_order) / $(val refused_pushes_present) |"
    echo "| write queue drained after load | $(val queue_drained_after_s) s |"
    echo "| redfuse RSS | $rss_stats |"
    echo "| /write-queue at end | $(cat "$OUT_DIR/write-queue.json" 2>/dev/null) |"
    echo "| cache at end | $(metric redfuse_cache_bytes) bytes, $(metric redfuse_cache_entries) entries, $(metric redfuse_cache_evictions_total) evictions |"
    echo "| write queue totals | replayed $(metric redfuse_write_queue_replayed_total), rejected $(metric_sum redfuse_write_queue_rejected_total), dead-lettered $(metric_sum redfuse_write_queue_dead_lettered_total) |"
    echo "| breaker opens | $(awk 'index($1, "redfuse_breaker_transitions_total") == 1 && $1 ~ /to="open"/ { s += $2 } END { print s + 0 }' "$OUT_DIR/metrics.txt") |"
    echo
    echo "Faults (seconds since the load began):"
    echo
    awk -F, 'NR > 1 { printf "- %s %.1f-%.1f\n", $3, $1, $2 }' "$OUT_DIR/faults.csv"
    grep '^example:' "$OUT_DIR/summary.txt" | sed 's/^/- /' || true
    [[ -f $OUT_DIR/soak.png ]] && echo && echo "![soak]($OUT_DIR/soak.png)"
} >"$OUT_DIR/report.md"
cat "$OUT_DIR/report.md"
