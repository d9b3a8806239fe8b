#!/usr/bin/env bash
# bench/profile.sh: where redfuse spends its time under one redis-benchmark workload.
#
# Usage:
#   bench/profile.sh              # GET -P 16, one hot key (redis-benchmark without -r)
#   bench/profile.sh random       # GET -P 16 over KEYSPACE random keys
#   CACHE=off bench/profile.sh    # same with `[cache] enabled = false`
#   TEST=set PIPELINE=1 N=200000 bench/profile.sh random  # unpipelined SETs (any redis-benchmark -t test)
#   OPEN=1 bench/profile.sh random  # Redis stopped once the cache is warm: reads served by the open breaker
#   COMMAND='MGET key:__rand_int__ key:__rand_int__' bench/profile.sh random  # any command line instead of TEST
#   PERF_RECORD=0 bench/profile.sh  # counts only, no call-graph profile
#   BEFORE='-t set -P 1 -n 200000' PAUSE=5 bench/profile.sh random  # what bench/run.sh's round
#       order does: SETs through redfuse (redis-benchmark arguments), 5 s, then the GETs
#
# Starts a redis-server and one redfuse (release build, built here unless REDFUSE_BIN is
# set) on free loopback ports, prefills KEYSPACE keys and the hot key, reads them all through
# redfuse once (warm cache), then runs redis-benchmark under `perf stat` attached to redfuse
# and prints, per client request: redfuse CPU time, sendto/recvfrom syscalls, context
# switches, the GETs Redis actually executed (INFO commandstats) and the reads that
# single-flight shared (redfuse_singleflight_shared_total). With PERF_RECORD=1 (default) a
# second run is recorded with `perf record --call-graph dwarf` and the top symbols are
# printed; the perf.data file is kept in the work dir for `perf report -i`.
#
# Environment: REDFUSE_BIN, CACHE [on], TEST [get], COMMAND, OPEN [0], N [1000000], PIPELINE [16], CLIENTS [50],
# KEYSPACE [100000], BEFORE, PAUSE [0], PERF_RECORD [1], PERF_FREQ [999], TOP [30], KEEP_WORKDIR [1].

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
MODE=${1:-hot}
CACHE=${CACHE:-on}
N=${N:-1000000}
PIPELINE=${PIPELINE:-16}
CLIENTS=${CLIENTS:-50}
KEYSPACE=${KEYSPACE:-100000}
TEST=${TEST:-get}
COMMAND=${COMMAND:-}
OPEN=${OPEN:-0}
BEFORE=${BEFORE:-}
PAUSE=${PAUSE:-0}
PERF_RECORD=${PERF_RECORD:-1}
PERF_FREQ=${PERF_FREQ:-999}
TOP=${TOP:-30}
KEEP_WORKDIR=${KEEP_WORKDIR:-1}

log() { printf '[profile %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

case $MODE in hot | random) ;; *) die "mode must be 'hot' or 'random', got '$MODE'" ;; esac
case $CACHE in on | off) ;; *) die "CACHE must be 'on' or 'off'" ;; esac
for tool in redis-server redis-cli redis-benchmark perf curl awk; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y redis-server redis-tools linux-perf curl)"
done

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/redfuse-profile.XXXXXX")
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $KEEP_WORKDIR == 1 ]]; then log "work dir (logs, perf.data) kept in $WORKDIR"; else rm -rf "$WORKDIR"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_pong() {
    local i
    for ((i = 0; i < 100; i++)); do
        [[ $(redis-cli -p "$1" ping 2>/dev/null) == PONG ]] && return 0
        sleep 0.1
    done
    return 1
}

if [[ -z ${REDFUSE_BIN:-} ]]; then
    log "building redfuse (cargo build --release)"
    (cd "$REPO_DIR" && cargo build --release) >&2 || die "cargo build --release failed"
    REDFUSE_BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/redfuse
fi
[[ -x $REDFUSE_BIN ]] || die "REDFUSE_BIN '$REDFUSE_BIN' is not executable"

RPORT=$(port)
FPORT=$(port)
APORT=$(port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --loglevel warning \
    --dir "$WORKDIR" >"$WORKDIR/redis.log" 2>&1 &
PIDS+=("$!")
wait_pong "$RPORT" || die "redis-server did not start"
printf '[cache]\nenabled = %s\n' "$([[ $CACHE == on ]] && echo true || echo false)" >"$WORKDIR/redfuse.toml"
"$REDFUSE_BIN" --config "$WORKDIR/redfuse.toml" --listen "127.0.0.1:$FPORT" --upstream "127.0.0.1:$RPORT" \
    --admin-listen "127.0.0.1:$APORT" --log-level warn >"$WORKDIR/redfuse.log" 2>&1 &
RF_PID=$!
PIDS+=("$RF_PID")
wait_pong "$FPORT" || die "redfuse did not start"

log "prefilling $KEYSPACE keys and the hot key, reading them through redfuse"
resp() { # CMD: SET or GET over key:%012d and key:__rand_int__
    awk -v cmd="$1" -v n="$KEYSPACE" 'BEGIN {
        v = sprintf("%64s", ""); gsub(/ /, "x", v)
        for (i = 0; i <= n; i++) {
            k = (i < n) ? sprintf("key:%012d", i) : "key:__rand_int__"
            if (cmd == "SET") printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$64\r\n%s\r\n", length(k), k, v
            else printf "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", length(k), k
        }
    }'
}
resp SET | redis-cli -p "$RPORT" --pipe >"$WORKDIR/prefill.log" 2>&1 || die "prefill failed"
resp GET | redis-cli -p "$FPORT" --pipe >"$WORKDIR/warm.log" 2>&1 || die "warm-up read failed"
before_run() { # BEFORE, through redfuse, then PAUSE: before each measured run
    [[ -n $BEFORE ]] || return 0
    local before
    read -r -a before <<<"$BEFORE"
    log "before: redis-benchmark -c $CLIENTS -r $KEYSPACE -d 64 ${before[*]}; then $PAUSE s"
    redis-benchmark -p "$FPORT" -c "$CLIENTS" -r "$KEYSPACE" -d 64 -q "${before[@]}" >"$WORKDIR/before.log" 2>&1 ||
        die "the BEFORE run failed: $(tail -n 3 "$WORKDIR/before.log")"
    sleep "$PAUSE"
}
if [[ $OPEN == 1 ]]; then
    log "stopping redis-server; waiting for the breaker to open"
    redis-cli -p "$RPORT" shutdown nosave >/dev/null 2>&1 || true
    for ((i = 0; i < 300; i++)); do
        redis-cli -p "$FPORT" get key:000000000000 >/dev/null 2>&1 || true
        [[ $(curl -fsS --max-time 5 "http://127.0.0.1:$APORT/ready" 2>/dev/null) == *'"breaker":"open"'* ]] && break
        sleep 0.2
    done
    [[ $(curl -fsS --max-time 5 "http://127.0.0.1:$APORT/ready" 2>/dev/null) == *'"breaker":"open"'* ]] ||
        die "the breaker did not open within 60 s"
fi

BENCH=(redis-benchmark -p "$FPORT" -c "$CLIENTS" -n "$N" -P "$PIPELINE" --csv)
[[ $MODE == random ]] && BENCH+=(-r "$KEYSPACE")
if [[ -n $COMMAND ]]; then
    read -r -a words <<<"$COMMAND"
    BENCH+=("${words[@]}")
else
    BENCH+=(-t "$TEST")
fi
metric() {
    local body
    body=$(curl -fsS --max-time 5 "http://127.0.0.1:$APORT/metrics" 2>/dev/null) || body=""
    awk -v want="$1" '$1 == want && !found { print $2; found = 1 }' <<<"$body"
}
upstream_gets() {
    redis-cli -p "$RPORT" info commandstats | tr -d '\r' | sed -n 's/^cmdstat_get:calls=\([0-9]*\).*/\1/p'
}

before_run
log "perf stat: ${BENCH[*]}"
[[ $OPEN == 1 ]] || redis-cli -p "$RPORT" config resetstat >/dev/null
shared0=$(metric redfuse_singleflight_shared_total)
perf stat -e task-clock,context-switches,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait \
    -p "$RF_PID" -o "$WORKDIR/perf-stat.txt" -- "${BENCH[@]}" >"$WORKDIR/bench.csv" 2>"$WORKDIR/bench.err" ||
    die "redis-benchmark under perf stat failed: $(tail -n 3 "$WORKDIR/bench.err")"
shared1=$(metric redfuse_singleflight_shared_total)
gets=$([[ $OPEN == 1 ]] && echo 0 || upstream_gets)
rps=$(awk -F, 'NR > 1 { gsub(/"/, ""); print $2; exit }' "$WORKDIR/bench.csv")
p50=$(awk -F, 'NR > 1 { gsub(/"/, ""); print $5; exit }' "$WORKDIR/bench.csv")
stat() { awk -v e="$1" '$2 == e { gsub(/,/, "", $1); print $1; exit }' "$WORKDIR/perf-stat.txt"; }
cpu_ms=$(stat msec)
[[ -n $cpu_ms ]] || cpu_ms=$(awk '/task-clock/ { gsub(/,/, "", $1); print $1; exit }' "$WORKDIR/perf-stat.txt")
per() { awk -v a="${1:-0}" -v n="$N" -v m="${2:-1}" 'BEGIN { printf "%.3f", a * m / n }'; }

echo
echo "redfuse under ${COMMAND:-${TEST^^}} -P $PIPELINE -c $CLIENTS, $([[ $MODE == hot ]] && echo "one hot key" || echo "$KEYSPACE random keys"), cache $CACHE, $N requests"
echo
echo "| figure | total | per client request |"
echo "|---|---:|---:|"
echo "| requests/s (redis-benchmark), p50 ms | ${rps:-?} | p50 ${p50:-?} |"
echo "| redfuse CPU (task-clock) | ${cpu_ms:-?} ms | $(per "$cpu_ms" 1000) us |"
for e in context-switches syscalls:sys_enter_sendto syscalls:sys_enter_recvfrom syscalls:sys_enter_epoll_wait; do
    v=$(stat "$e")
    echo "| $e | ${v:-?} | $(per "$v") |"
done
echo "| GETs Redis executed (INFO commandstats) | ${gets:-?} | $(per "$gets") |"
echo "| reads shared by single-flight | $((${shared1:-0} - ${shared0:-0})) | $(per "$((${shared1:-0} - ${shared0:-0}))") |"
echo

if [[ $PERF_RECORD == 1 ]]; then
    before_run
    log "perf record (call graphs, $PERF_FREQ Hz): ${BENCH[*]}"
    perf record -F "$PERF_FREQ" --call-graph dwarf,32768 -p "$RF_PID" -o "$WORKDIR/perf.data" -- \
        "${BENCH[@]}" >"$WORKDIR/bench-record.csv" 2>"$WORKDIR/perf-record.err" ||
        die "perf record failed: $(tail -n 3 "$WORKDIR/perf-record.err")"
    perf report -i "$WORKDIR/perf.data" --no-children --sort dso --stdio -g none >"$WORKDIR/by-dso.txt" 2>/dev/null || true
    perf report -i "$WORKDIR/perf.data" --no-children --sort symbol --stdio -g none >"$WORKDIR/self.txt" 2>/dev/null || true
    perf report -i "$WORKDIR/perf.data" --children --sort symbol --stdio -g none >"$WORKDIR/children.txt" 2>/dev/null || true
    echo "Samples by object:"
    awk '!/^#/ && NF && n++ < 5' "$WORKDIR/by-dso.txt"
    echo
    echo "Top $TOP symbols (self):"
    awk -v top="$TOP" '!/^#/ && NF && n++ < top { print substr($0, 1, 150) }' "$WORKDIR/self.txt"
    echo
    echo "Selected symbols (including callees):"
    awk '/write_replies::|Session::forward::|__x64_sys_sendto|__schedule *$|handle_softirqs|insert_inner|apply_fill|SingleFlight|LruCache|memcmp|conn::complete/ &&
         !/\(inlined\)/ { sym = $0; sub(/^[^]]*\] /, "", sym); sub(/ +$/, "", sym)
                            if (!seen[sym]++) print substr($0, 1, 150) }' "$WORKDIR/children.txt"
fi
