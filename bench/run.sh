#!/usr/bin/env bash
# bench/run.sh: throughput, latency and memory of redfuse against Redis used directly,
# redfuse with its cache off, twemproxy (nutcracker) and rcproxy, measured in one run.
#
# Usage:
#   bench/run.sh                                  # full run (about 10 minutes on 2 cores)
#   ROUNDS=1 REQUESTS_SCALE=0.1 bench/run.sh      # smoke test (a minute or two)
#   TARGETS="direct redfuse" WORKLOADS="get_p16 hot_p16" bench/run.sh
#
# What it does, in order:
#  1. Builds redfuse with `cargo build --release` (unless REDFUSE_BIN is set) and installs
#     rcproxy with `cargo install --locked clia-rcproxy --root target/rcproxy` when it is not
#     there yet; a target that cannot be had is skipped with a printed note.
#  2. Starts one redis-server and, in front of it, every target on loopback:
#       direct           redis-server itself
#       redfuse          redfuse, default configuration ([cache] enabled = true, 64 MiB)
#       redfuse-nocache  redfuse with `[cache] enabled = false` in its --config file
#       twemproxy        nutcracker, one pool with this one server
#       rcproxy          rcproxy, cache_type = "redis" (its twemproxy-like standalone mode)
#     and records each redfuse's RSS right after start-up (idle, cache empty).
#  3. Prefills KEYSPACE keys key:%012d with DATA_SIZE-byte values (what redis-benchmark's
#     key:__rand_int__ names with -r), the one hot key `key:__rand_int__` (what it names
#     without -r), and MIX_KEYSPACE keys mix:%012d with MIX_VALUE_SIZE-byte values; then
#     reads every key:* through each redfuse so that the cache starts warm.
#  4. ROUNDS rounds. In each round every workload runs on every target, back to back, the
#     target order rotated by one place per round, so that slow drift of the machine (other
#     builds, thermal) hits every target alike. Each figure reported is the median over the
#     rounds, with the min-max spread. Workloads (WORKLOADS picks a subset):
#       get_p1   GET unpipelined, random keys (-r KEYSPACE)
#       set_p1   SET unpipelined, random keys, DATA_SIZE-byte values
#       get_p16  GET -P 16, random keys
#       hot_p16  GET -P 16, one hot key (redis-benchmark without -r)
#       mix      90/10 GET/SET, MIX_VALUE_SIZE-byte values, -P MIX_PIPELINE: see below
#       mget10   MGET of 10 random keys, -P MGET_PIPELINE
#  5. Peak RSS (VmHWM from /proc/<pid>/status) of every server after the rounds.
#  6. Memory: a fresh redfuse (default config) is started: its RSS idle; then MEM_FILL_KEYS
#     distinct keys (more than the 64 MiB cap holds) are read through it; its RSS full, next
#     to the cache's own accounting (redfuse_cache_bytes on the admin port's /metrics). The
#     cache's memory as RSS shows it is RSS(full) - RSS(idle), RSS(full) read MEM_SETTLE
#     seconds after the fill: redfuse hands what the allocator holds free back to the OS
#     once a second, and one second after the fill RSS still holds (or not, from run to
#     run) what the fill's traffic allocated and freed (that reading is shown too).
#  7. Breaker open: redfuse (cache on) is started afresh and every key:* is read through it
#     so that the cache holds them, redis-server is stopped, a few GETs make the breaker trip, and /ready on
#     the admin port is polled until it says "breaker":"open". Then GET -P 16 and GET -P 1
#     over the same random keys run against redfuse, answered from its cache, and are
#     compared with direct Redis GET measured in the rounds above (same run, Redis still up).
#     The cache hit share during these runs is taken from /metrics and reported.
#  8. Prints the tables and the targets of issue 9 with PASS/FAIL, and writes RESULTS_FILE.
#
# The 90/10 mix. redis-benchmark runs one command per process, so the mix is two processes
# started together against the same target: MIX_READ_CLIENTS clients doing GET and
# MIX_WRITE_CLIENTS clients doing SET (45 and 5 of 50 by default), with the requests split
# 90/10 too, so that each client does the same number of requests and both processes end
# about together. The mix's rate is all requests of both divided by the longer of the two
# durations (each process's requests / its own requests per second): when one ends early the
# other's lone tail counts at its own pace instead of inflating a sum of rates. p50/p99 are
# those of the GETs. The keys (mix:*) are not the GET workloads' key:*, so the 1 KB writes
# do not change what the other workloads read; they are prefilled so that every GET hits.
#
# Environment (defaults in brackets):
#   REDFUSE_BIN       redfuse binary; if unset: `cargo build --release` here and use
#                     ${CARGO_TARGET_DIR:-<repo>/target}/release/redfuse
#   REDFUSE_ARGS      extra redfuse flags for every redfuse started, word-split [none]
#   RCPROXY_BIN       rcproxy binary [<repo>/target/rcproxy/bin/rcproxy, installed if missing]
#   RCPROXY_INSTALL   0: never run cargo install for rcproxy [1]
#   RCPROXY_THREADS   rcproxy worker threads [1, like redfuse's default and nutcracker]
#   TARGETS           subset of "direct redfuse redfuse-nocache twemproxy rcproxy" [all]
#   WORKLOADS         subset of "get_p1 set_p1 get_p16 hot_p16 mix mget10" [all]
#   ROUNDS            rounds, median reported [5]
#   REQUESTS_SCALE    multiplies every request count below, e.g. 0.1 for a smoke test [1]
#   N_P1              requests, unpipelined GET and SET [200000]
#   N_P16             requests, GET -P 16 random keys and the breaker-open GET -P 16 [1000000]
#   N_HOT             requests, GET -P 16 one hot key [1000000]
#   N_MIX             requests, 90/10 mix, both processes together [200000]
#   N_MGET            requests, MGET of 10 keys [200000]
#   CLIENTS           redis-benchmark -c [50]
#   MIX_READ_CLIENTS / MIX_WRITE_CLIENTS   clients of the mix [90% / 10% of CLIENTS]
#   MIX_PIPELINE      -P of the mix [1]
#   MGET_PIPELINE     -P of MGET [1]
#   DATA_SIZE         value size of key:* and set_p1 [64]
#   MIX_VALUE_SIZE    value size of mix:* [1024]
#   KEYSPACE          random key range of key:* (-r) [100000]
#   MIX_KEYSPACE      random key range of mix:* [100000]
#   MEM_FILL_KEYS     distinct keys read through the memory-test redfuse [250000]
#   MEM_SETTLE        seconds after that fill its RSS is read for the accounting [10]
#   WARMUP_N          warm-up requests per target before the rounds [20000]
#   BREAKER           0: skip the breaker-open phase [1]
#   BREAKER_ROUNDS    rounds of the breaker-open runs [ROUNDS]
#   BREAKER_TIMEOUT   seconds allowed for the breaker to open [60]
#   MEMORY            0: skip the memory phase [1]
#   BENCH_TIMEOUT     seconds allowed per redis-benchmark run [300]
#   STARTUP_TIMEOUT   seconds allowed for a server to answer PING [30]
#   STRICT            1: exit 1 when a target is missed [0]
#   RESULTS_FILE      where the Markdown report goes [bench/results.md]
#   KEEP_WORKDIR      1: keep the temp dir with logs and raw figures [0; kept on error]
#
# The targets themselves are not configurable: they are issue 9's and are never lowered.
#
# Exit status: 0 when every run completed (and, with STRICT=1, every target was met);
# 1 when a run failed or a server crashed; 2 on a setup error. Only loopback and ports free
# at run time are used; every process started here is stopped on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

ROUNDS=${ROUNDS:-5}
REQUESTS_SCALE=${REQUESTS_SCALE:-1}
N_P1=${N_P1:-200000}
N_P16=${N_P16:-1000000}
N_HOT=${N_HOT:-1000000}
N_MIX=${N_MIX:-200000}
N_MGET=${N_MGET:-200000}
CLIENTS=${CLIENTS:-50}
MIX_PIPELINE=${MIX_PIPELINE:-1}
MGET_PIPELINE=${MGET_PIPELINE:-1}
DATA_SIZE=${DATA_SIZE:-64}
MIX_VALUE_SIZE=${MIX_VALUE_SIZE:-1024}
KEYSPACE=${KEYSPACE:-100000}
MIX_KEYSPACE=${MIX_KEYSPACE:-100000}
MEM_FILL_KEYS=${MEM_FILL_KEYS:-250000}
WARMUP_N=${WARMUP_N:-20000}
BREAKER=${BREAKER:-1}
BREAKER_ROUNDS=${BREAKER_ROUNDS:-$ROUNDS}
BREAKER_TIMEOUT=${BREAKER_TIMEOUT:-60}
MEMORY=${MEMORY:-1}
MEM_SETTLE=${MEM_SETTLE:-10}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-30}
STRICT=${STRICT:-0}
RESULTS_FILE=${RESULTS_FILE:-$SCRIPT_DIR/results.md}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
ALL_TARGETS="direct redfuse redfuse-nocache twemproxy rcproxy"
ALL_WORKLOADS="get_p1 set_p1 get_p16 hot_p16 mix mget10"
TARGETS=${TARGETS:-$ALL_TARGETS}
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
REDFUSE_ARGS=${REDFUSE_ARGS:-}
RCPROXY_INSTALL=${RCPROXY_INSTALL:-1}
RCPROXY_THREADS=${RCPROXY_THREADS:-1}

# Issue 9's targets. Do not lower them.
readonly T_VS_TWEMPROXY=1.5     # GET -P 16 (random keys, hot key): redfuse >= 1.5x twemproxy
readonly T_VS_RCPROXY=1.0       # ... and >= 1.0x rcproxy
readonly T_CACHE_COST=0.90      # cache on >= 0.90x cache off (costs at most 10%)
readonly T_P1_VS_DIRECT=0.95    # unpipelined GET and SET: redfuse >= 0.95x direct
readonly T_BREAKER_VS_DIRECT=1.0 # breaker open, GET from the cache >= 1.0x direct Redis GET
readonly T_IDLE_RSS_MIB=15      # RSS of an idle, just started redfuse
readonly T_ACCOUNTING=0.20      # redfuse_cache_bytes within 20% of the RSS the cache takes

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in ROUNDS N_P1 N_P16 N_HOT N_MIX N_MGET CLIENTS MIX_PIPELINE MGET_PIPELINE DATA_SIZE \
    MIX_VALUE_SIZE KEYSPACE MIX_KEYSPACE MEM_FILL_KEYS MEM_SETTLE WARMUP_N BREAKER_ROUNDS BREAKER_TIMEOUT \
    BENCH_TIMEOUT STARTUP_TIMEOUT RCPROXY_THREADS; do
    is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
[[ $REQUESTS_SCALE =~ ^[0-9]*\.?[0-9]+$ ]] || die "REQUESTS_SCALE must be a positive number"
((ROUNDS >= 1)) || die "ROUNDS must be >= 1"
((BREAKER_ROUNDS >= 1)) || die "BREAKER_ROUNDS must be >= 1"
((CLIENTS >= 2)) || die "CLIENTS must be >= 2 (the mix needs a reader and a writer)"
((KEYSPACE >= 1 && MIX_KEYSPACE >= 1)) || die "KEYSPACE and MIX_KEYSPACE must be >= 1"

scaled() { # N * REQUESTS_SCALE, at least 1000
    awk -v n="$1" -v s="$REQUESTS_SCALE" 'BEGIN { v = int(n * s + 0.5); if (v < 1000) v = 1000; print v }'
}
N_P1=$(scaled "$N_P1")
N_P16=$(scaled "$N_P16")
N_HOT=$(scaled "$N_HOT")
N_MIX=$(scaled "$N_MIX")
N_MGET=$(scaled "$N_MGET")
WARMUP_N=$(scaled "$WARMUP_N")
MIX_READ_CLIENTS=${MIX_READ_CLIENTS:-$((CLIENTS * 9 / 10))}
MIX_WRITE_CLIENTS=${MIX_WRITE_CLIENTS:-$((CLIENTS - MIX_READ_CLIENTS))}
is_uint "$MIX_READ_CLIENTS" && is_uint "$MIX_WRITE_CLIENTS" && ((MIX_READ_CLIENTS >= 1 && MIX_WRITE_CLIENTS >= 1)) ||
    die "MIX_READ_CLIENTS and MIX_WRITE_CLIENTS must be >= 1"
N_MIX_GET=$((N_MIX * 9 / 10))
N_MIX_SET=$((N_MIX - N_MIX_GET))

for t in $TARGETS; do [[ " $ALL_TARGETS " == *" $t "* ]] || die "TARGETS: unknown target '$t'"; done
for w in $WORKLOADS; do [[ " $ALL_WORKLOADS " == *" $w "* ]] || die "WORKLOADS: unknown workload '$w'"; done
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
drop_target() {
    # shellcheck disable=SC2086 # split the list on purpose
    TARGETS=$(printf '%s\n' $TARGETS | grep -vx "$1" | tr '\n' ' ' || true)
}

for tool in redis-server redis-cli redis-benchmark timeout awk sort curl; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install redis-server redis-tools curl coreutils)"
done

NOTES=()
note() { log "NOTE: $*"; NOTES+=("$*"); }

if has_target twemproxy && ! command -v nutcracker >/dev/null; then
    note "twemproxy skipped: nutcracker is not installed (apt-get install -y nutcracker)"
    drop_target twemproxy
fi

# ---------------------------------------------------------------- processes --

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/redfuse-bench.XXXXXX")
declare -a PIDS=() BENCH_PIDS=()
declare -A PID_OF=() PORT_OF=() ADMIN_OF=() IDLE_RSS=() PEAK=()
FAILED=0
REDIS_STOPPED=0

stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
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
    local rc=$? i
    trap - EXIT INT TERM
    for i in "${BENCH_PIDS[@]}"; do stop_pid "$i"; done
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    if [[ $KEEP_WORKDIR == 1 || $rc -ne 0 ]]; then
        log "logs and raw figures (raw.tsv, *.csv) kept in $WORKDIR"
    else
        rm -rf "$WORKDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

declare -A HANDED_OUT=()
FREE_PORT=""
# Sets FREE_PORT to a loopback port nothing listens on, chosen by the kernel (bind to port
# 0) and not handed out before in this run. Not run in a subshell so HANDED_OUT keeps track.
free_port() {
    local p i
    FREE_PORT=""
    for ((i = 0; i < 100; i++)); do
        if command -v python3 >/dev/null; then
            p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || continue
        elif command -v perl >/dev/null; then
            p=$(perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen=>1, LocalAddr=>"127.0.0.1", LocalPort=>0)->sockport') || continue
        else
            p=$((20000 + RANDOM % 12000))
            (: </dev/tcp/127.0.0.1/"$p") 2>/dev/null && continue
        fi
        is_uint "$p" || continue
        [[ -n ${HANDED_OUT[$p]:-} ]] && continue
        HANDED_OUT[$p]=1
        FREE_PORT=$p
        return 0
    done
    log "could not find a free port"
    return 1
}

# exit_status PID: sets EXIT_DESC to how a child that has exited ended (not in a subshell:
# only this shell can wait for its children).
EXIT_DESC=""
exit_status() {
    local rc=0
    wait "$1" 2>/dev/null || rc=$?
    if ((rc > 128 && rc < 160)); then
        EXIT_DESC="killed by signal $((rc - 128)) (SIG$(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
    else
        EXIT_DESC="exit status $rc"
    fi
}

# wait_ready NAME PID PORT: until PING through PORT answers PONG.
wait_ready() {
    local name=$1 pid=$2 port=$3 deadline=$((SECONDS + STARTUP_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            exit_status "$pid"
            log "$name (pid $pid) exited during startup, $EXIT_DESC; last log lines:"
            tail -n 20 "$WORKDIR/$name.log" >&2 || true
            return 1
        fi
        if [[ $(timeout 2 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null) == PONG ]]; then
            return 0
        fi
        sleep 0.1
    done
    log "$name (pid $pid) did not answer PING on 127.0.0.1:$port within ${STARTUP_TIMEOUT}s; last log lines:"
    tail -n 20 "$WORKDIR/$name.log" >&2 || true
    return 1
}

# rss_kb PID [FIELD]: VmRSS (or FIELD, e.g. VmHWM) in kB, or empty.
rss_kb() {
    awk -v f="${2:-VmRSS}:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || true
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# metric NAME [LABELS]: a value from a redfuse's /metrics (admin port of target $METRIC_OF).
metric() {
    local admin=${ADMIN_OF[$METRIC_OF]} name=$1 labels=${2:-} body
    body=$(curl -fsS --max-time 5 "http://127.0.0.1:$admin/metrics" 2>/dev/null) || body=""
    awk -v want="$name$labels" '$1 == want && !found { print $2; found = 1 }' <<<"$body"
}
METRIC_OF=redfuse

# start_server NAME: start it on a fresh port, retrying if the port was taken.
start_server() {
    local name=$1 attempt port pid cfg
    for attempt in 1 2 3; do
        free_port || return 1
        port=$FREE_PORT
        case $name in
        direct)
            redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
                --daemonize no --protected-mode yes --loglevel warning \
                --dir "$WORKDIR" >"$WORKDIR/direct.log" 2>&1 &
            ;;
        redfuse | redfuse-nocache | redfuse-mem)
            free_port || return 1
            ADMIN_OF[$name]=$FREE_PORT
            cfg="$WORKDIR/$name.toml"
            # Only the cache switch differs from the defaults; listen and upstream are flags.
            if [[ $name == redfuse-nocache ]]; then
                printf '[cache]\nenabled = false\n' >"$cfg"
            else
                printf '[cache]\nenabled = true\n' >"$cfg"
            fi
            # shellcheck disable=SC2086 # REDFUSE_ARGS is split on purpose
            "$REDFUSE_BIN" --config "$cfg" --listen "127.0.0.1:$port" \
                --upstream "127.0.0.1:${PORT_OF[direct]}" --admin-listen "127.0.0.1:${ADMIN_OF[$name]}" \
                --log-level warn $REDFUSE_ARGS >"$WORKDIR/$name.log" 2>&1 &
            ;;
        twemproxy)
            local stats
            free_port || return 1
            stats=$FREE_PORT
            cat >"$WORKDIR/nutcracker.yml" <<EOF
bench:
  listen: 127.0.0.1:$port
  hash: fnv1a_64
  distribution: ketama
  redis: true
  preconnect: true
  auto_eject_hosts: false
  server_connections: 1
  servers:
    - 127.0.0.1:${PORT_OF[direct]}:1
EOF
            nutcracker -t -c "$WORKDIR/nutcracker.yml" >"$WORKDIR/nutcracker-test.log" 2>&1 ||
                { cat "$WORKDIR/nutcracker-test.log" >&2; die "generated nutcracker config rejected"; }
            nutcracker -c "$WORKDIR/nutcracker.yml" -s "$stats" -a 127.0.0.1 \
                -o "$WORKDIR/twemproxy.log" -p "$WORKDIR/nutcracker.pid" >>"$WORKDIR/twemproxy.log" 2>&1 &
            ;;
        rcproxy)
            # Standalone (twemproxy-like) mode: cache_type "redis", servers as
            # "host:port:weight alias". ping_fail_limit = 0 turns ejection off, as
            # auto_eject_hosts: false does for nutcracker. It always serves metrics over HTTP.
            local metrics
            free_port || return 1
            metrics=$FREE_PORT
            mkdir -p "$WORKDIR/rcproxy-logs"
            cat >"$WORKDIR/rcproxy.toml" <<EOF
[log]
level = "libaster=warn"
ansi = false
stdout = false
directory = "$WORKDIR/rcproxy-logs"
file_name = "rcproxy.log"

[metrics]
port = $metrics

[[clusters]]
name = "bench"
listen_addr = "127.0.0.1:$port"
hash_tag = "{}"
thread = $RCPROXY_THREADS
cache_type = "redis"
servers = ["127.0.0.1:${PORT_OF[direct]}:1 redis1"]
read_timeout = 2000
write_timeout = 2000
ping_fail_limit = 0
ping_interval = 10000
auth = ""
EOF
            "$RCPROXY_BIN" "$WORKDIR/rcproxy.toml" >"$WORKDIR/rcproxy.log" 2>&1 &
            ;;
        esac
        pid=$!
        PIDS+=("$pid")
        if wait_ready "$name" "$pid" "$port"; then
            PID_OF[$name]=$pid
            PORT_OF[$name]=$port
            return 0
        fi
        stop_pid "$pid"
        # Retry only when the port was taken between choosing and binding it.
        grep -rqiE 'address already in use|addrinuse|os error 98|port in use' "$WORKDIR/$name.log" 2>/dev/null || return 1
        log "$name: port $port was taken (attempt $attempt), retrying on another"
    done
    return 1
}

# A SET then GET through the target must return what was written.
check_roundtrip() {
    local t=$1 port=${PORT_OF[$1]} key="redfuse-bench:probe:$1" val="v-$$-$RANDOM" got
    got=$(timeout 5 redis-cli -h 127.0.0.1 -p "$port" set "$key" "$val" 2>&1) || true
    [[ $got == OK ]] || { log "$t: SET probe answered '$got'"; return 1; }
    got=$(timeout 5 redis-cli -h 127.0.0.1 -p "$port" get "$key" 2>&1) || true
    [[ $got == "$val" ]] || { log "$t: GET probe answered '$got', expected '$val'"; return 1; }
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" del "$key" >/dev/null 2>&1 || true
}

# resp_stream CMD PREFIX N [SIZE] [FROM]: RESP for CMD PREFIX%012d (FROM <= i < N), with a
# SIZE-byte value for SET.
resp_stream() {
    awk -v cmd="$1" -v pre="$2" -v n="$3" -v d="${4:-0}" -v from="${5:-0}" 'BEGIN {
        if (cmd == "SET") { v = sprintf("%*s", d, ""); gsub(/ /, "x", v) }
        for (i = from; i < n; i++) {
            k = sprintf("%s%012d", pre, i)
            if (cmd == "SET")
                printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
            else
                printf "*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(cmd), cmd, length(k), k
        }
    }'
}

# pipe_to TARGET LOGNAME: redis-cli --pipe of stdin to TARGET; fails on any error reply.
pipe_to() {
    local t=$1 logf="$WORKDIR/$2.log"
    if ! timeout 300 redis-cli -h 127.0.0.1 -p "${PORT_OF[$t]}" --pipe >"$logf" 2>&1; then
        cat "$logf" >&2
        return 1
    fi
    grep -q 'errors: 0,' "$logf" || { cat "$logf" >&2; return 1; }
}

# pipe_chunked TARGET LOGNAME CMD PREFIX N [SIZE]: like `resp_stream ... | pipe_to`, in chunks
# of PIPE_CHUNK commands, each answered before the next is sent. A proxy may refuse an
# unbounded pipeline (redfuse's bulkhead answers "overloaded" past max_inflight_per_upstream,
# 10000 by default), which is right for it and not what a fill is meant to measure.
PIPE_CHUNK=5000
pipe_chunked() {
    local t=$1 name=$2 cmd=$3 pre=$4 n=$5 size=${6:-0} from
    for ((from = 0; from < n; from += PIPE_CHUNK)); do
        resp_stream "$cmd" "$pre" "$((from + PIPE_CHUNK < n ? from + PIPE_CHUNK : n))" "$size" "$from" |
            pipe_to "$t" "$name" || return 1
    done
}

# ------------------------------------------------------------------- build --

if has_target redfuse || has_target redfuse-nocache || [[ $MEMORY == 1 ]]; then
    if [[ -z ${REDFUSE_BIN:-} ]]; then
        command -v cargo >/dev/null || die "cargo not found and REDFUSE_BIN not set"
        log "building redfuse (cargo build --release)"
        (cd "$REPO_DIR" && cargo build --release) >&2 || die "cargo build --release failed"
        REDFUSE_BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/redfuse
        [[ $REDFUSE_BIN == /* ]] || REDFUSE_BIN=$REPO_DIR/$REDFUSE_BIN
    fi
    [[ -x $REDFUSE_BIN ]] || die "REDFUSE_BIN '$REDFUSE_BIN' is not an executable file"
fi

if has_target rcproxy; then
    RCPROXY_BIN=${RCPROXY_BIN:-$REPO_DIR/target/rcproxy/bin/rcproxy}
    if [[ ! -x $RCPROXY_BIN && $RCPROXY_INSTALL == 1 ]] && command -v cargo >/dev/null; then
        log "installing rcproxy (cargo install --locked clia-rcproxy --root target/rcproxy)"
        (cd "$REPO_DIR" && cargo install --locked clia-rcproxy --root "$REPO_DIR/target/rcproxy") >&2 ||
            log "cargo install clia-rcproxy failed"
        RCPROXY_BIN=$REPO_DIR/target/rcproxy/bin/rcproxy
    fi
    if [[ ! -x $RCPROXY_BIN ]]; then
        note "rcproxy skipped: not installed and could not be installed (cargo install --locked clia-rcproxy --root target/rcproxy)"
        drop_target rcproxy
    fi
fi

ORDERED=()
for t in $ALL_TARGETS; do has_target "$t" && ORDERED+=("$t"); done
((${#ORDERED[@]} > 0)) || die "no targets left to run"
read -ra WL <<<"$WORKLOADS"

# ------------------------------------------------------------------ start --

start_server direct || die "redis-server did not start"
log "redis-server pid ${PID_OF[direct]} on 127.0.0.1:${PORT_OF[direct]}"
for t in "${ORDERED[@]}"; do
    [[ $t == direct ]] && continue
    if ! start_server "$t"; then
        if [[ $t == rcproxy ]]; then
            note "rcproxy skipped: it did not start (see its log)"
            drop_target rcproxy
            continue
        fi
        die "$t did not start (see $WORKDIR/$t.log)"
    fi
    log "$t pid ${PID_OF[$t]} on 127.0.0.1:${PORT_OF[$t]}"
    [[ $t == redfuse* ]] && IDLE_RSS[$t]=$(rss_kb "${PID_OF[$t]}")
done
ORDERED=()
for t in $ALL_TARGETS; do has_target "$t" && ORDERED+=("$t"); done
for t in "${ORDERED[@]}"; do
    check_roundtrip "$t" || die "$t failed the SET/GET round trip check"
done

log "prefilling $KEYSPACE keys of $DATA_SIZE bytes, the hot key, and $MIX_KEYSPACE mix keys of $MIX_VALUE_SIZE bytes"
{
    resp_stream SET key: "$KEYSPACE" "$DATA_SIZE"
    # redis-benchmark without -r reads the key literally named key:__rand_int__.
    awk -v d="$DATA_SIZE" 'BEGIN { v = sprintf("%*s", d, ""); gsub(/ /, "x", v)
        printf "*3\r\n$3\r\nSET\r\n$16\r\nkey:__rand_int__\r\n$%d\r\n%s\r\n", d, v }'
    resp_stream SET mix: "$MIX_KEYSPACE" "$MIX_VALUE_SIZE"
} | pipe_to direct prefill || die "prefill failed"

# Read every key:* (and the hot key) through each redfuse so that the cache-on one starts
# warm, as in steady state.
warm_cache() {
    local t=$1
    pipe_chunked "$t" "warm-$t" GET key: "$KEYSPACE" &&
        printf '*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n' | pipe_to "$t" "warm-$t"
}
for t in redfuse redfuse-nocache; do
    has_target "$t" || continue
    log "reading every key through $t"
    warm_cache "$t" || die "reading the keys through $t failed"
done

# -------------------------------------------------------------- benchmark --

RAW="$WORKDIR/raw.tsv" # round target workload rps p50 p99
: >"$RAW"
declare -A DEAD=()

# bench_start OUTFILE TARGET ARGS...: one redis-benchmark in the background.
bench_start() {
    local out=$1 t=$2
    shift 2
    timeout "$BENCH_TIMEOUT" redis-benchmark -h 127.0.0.1 -p "${PORT_OF[$t]}" --csv "$@" \
        >"$out" 2>"$out.err" </dev/null &
    BENCH_PIDS+=("$!")
}

servers_alive() { # TARGET
    kill -0 "${PID_OF[$1]}" 2>/dev/null || return 1
    ((REDIS_STOPPED)) || kill -0 "${PID_OF[direct]}" 2>/dev/null
}

# bench_wait TARGET: polls the redis-benchmark processes started, so that a signal reaches
# cleanup at once and a crashed server does not leave redis-benchmark spinning until
# BENCH_TIMEOUT (it retries refused connections forever). Returns the first non-zero exit
# status, 125 when a server died.
bench_wait() {
    local t=$1 rc=0 r pid alive
    while :; do
        alive=0
        for pid in "${BENCH_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        if ! servers_alive "$t"; then
            for pid in "${BENCH_PIDS[@]}"; do stop_pid "$pid"; done
            BENCH_PIDS=()
            return 125
        fi
        sleep 0.1
    done
    for pid in "${BENCH_PIDS[@]}"; do
        r=0
        wait "$pid" || r=$?
        ((rc == 0)) && rc=$r
    done
    BENCH_PIDS=()
    return "$rc"
}

# parse_csv FILE: "rps p50 p99" of redis-benchmark's first result row (any test name).
parse_csv() {
    [[ -f $1 ]] || return 1
    awk -F, '
        { for (i = 1; i <= NF; i++) gsub(/"/, "", $i) }
        $1 == "test" { for (i = 1; i <= NF; i++) col[$i] = i; next }
        ("rps" in col) && NF > 1 && $col["rps"] + 0 > 0 {
            p50 = ("p50_latency_ms" in col) ? $col["p50_latency_ms"] : "n/a"
            p99 = ("p99_latency_ms" in col) ? $col["p99_latency_ms"] : "n/a"
            print $col["rps"], p50, p99; found = 1; exit
        }
        END { exit !found }' "$1"
}

MGET_ARGS=(MGET)
for ((i = 0; i < 10; i++)); do MGET_ARGS+=("key:__rand_int__"); done
MIX_VALUE=$(awk -v d="$MIX_VALUE_SIZE" 'BEGIN { v = sprintf("%*s", d, ""); gsub(/ /, "x", v); print v }')

# run_workload ROUND TARGET WORKLOAD: one measurement, appended to RAW (FAIL on failure).
run_workload() {
    local r=$1 t=$2 w=$3 out="$WORKDIR/r$1-$2-$3" rc=0 line="" g s
    case $w in
    get_p1) bench_start "$out.csv" "$t" -t get -c "$CLIENTS" -n "$N_P1" -r "$KEYSPACE" -P 1 ;;
    set_p1) bench_start "$out.csv" "$t" -t set -c "$CLIENTS" -n "$N_P1" -r "$KEYSPACE" -d "$DATA_SIZE" -P 1 ;;
    get_p16 | breaker_p16) bench_start "$out.csv" "$t" -t get -c "$CLIENTS" -n "$N_P16" -r "$KEYSPACE" -P 16 ;;
    breaker_p1) bench_start "$out.csv" "$t" -t get -c "$CLIENTS" -n "$N_P1" -r "$KEYSPACE" -P 1 ;;
    hot_p16) bench_start "$out.csv" "$t" -t get -c "$CLIENTS" -n "$N_HOT" -P 16 ;;
    mget10) bench_start "$out.csv" "$t" -c "$CLIENTS" -n "$N_MGET" -r "$KEYSPACE" -P "$MGET_PIPELINE" "${MGET_ARGS[@]}" ;;
    mix)
        bench_start "$out.get.csv" "$t" -c "$MIX_READ_CLIENTS" -n "$N_MIX_GET" -r "$MIX_KEYSPACE" \
            -P "$MIX_PIPELINE" GET "mix:__rand_int__"
        bench_start "$out.set.csv" "$t" -c "$MIX_WRITE_CLIENTS" -n "$N_MIX_SET" -r "$MIX_KEYSPACE" \
            -P "$MIX_PIPELINE" SET "mix:__rand_int__" "$MIX_VALUE"
        ;;
    esac
    bench_wait "$t" || rc=$?
    if ((rc == 0)); then
        if [[ $w == mix ]]; then
            if g=$(parse_csv "$out.get.csv") && s=$(parse_csv "$out.set.csv"); then
                # All requests over the longer of the two durations (see the header).
                line=$(awk -v ng="$N_MIX_GET" -v ns="$N_MIX_SET" -v g="$g" -v s="$s" 'BEGIN {
                    split(g, a, " "); split(s, b, " ")
                    tg = ng / a[1]; ts = ns / b[1]; t = (tg > ts) ? tg : ts
                    printf "%.2f\t%s\t%s", (ng + ns) / t, a[2], a[3] }')
                printf '%s\t%s\tmix_set\t%s\n' "$r" "$t" "$(tr ' ' '\t' <<<"$s")" >>"$RAW"
            fi
        else
            line=$(parse_csv "$out.csv" | tr ' ' '\t') || line=""
        fi
    fi
    if [[ -n $line ]]; then
        printf '%s\t%s\t%s\t%s\n' "$r" "$t" "$w" "$line" >>"$RAW"
        log "round $r $w $t: $(cut -f1 <<<"$line" | awk '{ printf "%.0f", $1 }') req/s"
    else
        printf '%s\t%s\t%s\tFAIL\tFAIL\tFAIL\n' "$r" "$t" "$w" >>"$RAW"
        FAILED=1
        case $rc in
        125) log "round $r $w $t: server gone, redis-benchmark stopped" ;;
        124) log "round $r $w $t: redis-benchmark timed out after ${BENCH_TIMEOUT}s" ;;
        *) log "round $r $w $t: failed (exit $rc): $(cat "$out"*.err 2>/dev/null | tail -n 3 | tr '\n' ' ')" ;;
        esac
    fi
    if ! kill -0 "${PID_OF[$t]}" 2>/dev/null; then
        exit_status "${PID_OF[$t]}"
        log "$t (pid ${PID_OF[$t]}) DIED during round $r $w, $EXIT_DESC; last log lines:"
        tail -n 20 "$WORKDIR/$t.log" >&2 || true
        DEAD[$t]=1
        FAILED=1
        [[ $t == direct ]] && for x in "${ORDERED[@]}"; do DEAD[$x]=1; done
    fi
    return 0
}

for t in "${ORDERED[@]}"; do
    log "warming up $t"
    bench_start "$WORKDIR/warmup-$t.csv" "$t" -t get -c "$CLIENTS" -n "$WARMUP_N" -r "$KEYSPACE" -P 16
    bench_wait "$t" || log "WARNING: warm-up of $t failed: $(tail -n 2 "$WORKDIR/warmup-$t.csv.err" 2>/dev/null | tr '\n' ' ')"
done

NT=${#ORDERED[@]}
T_ROUNDS_START=$SECONDS
for ((r = 1; r <= ROUNDS; r++)); do
    # Rotate the target order by one place per round.
    order=()
    for ((i = 0; i < NT; i++)); do order+=("${ORDERED[(i + r - 1) % NT]}"); done
    log "round $r/$ROUNDS, target order: ${order[*]}"
    for w in "${WL[@]}"; do
        for t in "${order[@]}"; do
            if [[ -n ${DEAD[$t]:-} ]]; then
                printf '%s\t%s\t%s\tFAIL\tFAIL\tFAIL\n' "$r" "$t" "$w" >>"$RAW"
                continue
            fi
            run_workload "$r" "$t" "$w"
        done
    done
done
log "rounds took $((SECONDS - T_ROUNDS_START)) s"

# Peak memory of every server over the rounds.
for t in "${ORDERED[@]}"; do
    PEAK[$t]=$(rss_kb "${PID_OF[$t]}" VmHWM)
done
# The cache-on redfuse after the rounds (mixed sizes, churn, 50 clients' buffers), next to
# its accounting: the clean fill below isolates the cache, this shows it in use.
ROUNDS_RSS="" ROUNDS_CACHE_BYTES=""
if has_target redfuse && [[ -z ${DEAD[redfuse]:-} ]]; then
    ROUNDS_RSS=$(rss_kb "${PID_OF[redfuse]}")
    ROUNDS_CACHE_BYTES=$(metric redfuse_cache_bytes)
fi

# ------------------------------------------------------------------ memory --

MEM_IDLE="" MEM_EARLY="" MEM_FULL="" MEM_HWM="" MEM_BYTES="" MEM_ENTRIES="" MEM_EVICTIONS="" MEM_IDLE_BYTES=""
if [[ $MEMORY == 1 && -z ${DEAD[direct]:-} ]]; then
    log "memory: starting a fresh redfuse (default config, cache cap 64 MiB)"
    if start_server redfuse-mem; then
        sleep 1
        METRIC_OF=redfuse-mem
        MEM_IDLE=$(rss_kb "${PID_OF[redfuse-mem]}")
        MEM_IDLE_BYTES=$(metric redfuse_cache_bytes)
        log "memory: idle RSS $(mib "$MEM_IDLE") MiB; filling $MEM_FILL_KEYS distinct keys through it"
        if resp_stream SET fill: "$MEM_FILL_KEYS" "$DATA_SIZE" | pipe_to direct mem-prefill &&
            pipe_chunked redfuse-mem mem-fill GET fill: "$MEM_FILL_KEYS"; then
            sleep 1
            MEM_EARLY=$(rss_kb "${PID_OF[redfuse-mem]}")
            sleep $((MEM_SETTLE > 1 ? MEM_SETTLE - 1 : 0))
            MEM_FULL=$(rss_kb "${PID_OF[redfuse-mem]}")
            MEM_HWM=$(rss_kb "${PID_OF[redfuse-mem]}" VmHWM)
            MEM_BYTES=$(metric redfuse_cache_bytes)
            MEM_ENTRIES=$(metric redfuse_cache_entries)
            MEM_EVICTIONS=$(metric redfuse_cache_evictions_total)
            log "memory: full RSS $(mib "$MEM_FULL") MiB, redfuse_cache_bytes ${MEM_BYTES:-?}, entries ${MEM_ENTRIES:-?}, evictions ${MEM_EVICTIONS:-?}"
        else
            log "memory: filling the cache failed"
            FAILED=1
        fi
        METRIC_OF=redfuse
        stop_pid "${PID_OF[redfuse-mem]}"
    else
        log "memory: redfuse-mem did not start"
        FAILED=1
    fi
fi

# --------------------------------------------------------- breaker open --

BREAKER_DONE=0 BREAKER_HITS="" BREAKER_LOOKUPS="" BREAKER_STATES=""
if [[ $BREAKER == 1 ]] && has_target redfuse && [[ -z ${DEAD[redfuse]:-} && -z ${DEAD[direct]:-} ]]; then
    # A fresh redfuse with the same configuration: the rounds' one also holds the mix's
    # 1 KB replies and the write marks of the SET workloads (which a miss on a key written
    # less than max_stale_ms ago must respect), and they take room the key:* replies need.
    log "breaker: restarting redfuse (empty cache) and reading every key through it"
    stop_pid "${PID_OF[redfuse]}"
    if start_server redfuse && warm_cache redfuse; then
        entries=$(metric redfuse_cache_entries)
        log "breaker: cache holds ${entries:-?} entries; stopping redis-server"
        ((${entries:-0} >= KEYSPACE)) || note "breaker: the cache holds ${entries:-?} entries, fewer than the $KEYSPACE keys read"
        T_FILLED=$SECONDS
        REDIS_STOPPED=1
        stop_pid "${PID_OF[direct]}"
        for t in "${ORDERED[@]}"; do [[ $t == redfuse ]] || DEAD[$t]=1; done
        deadline=$((SECONDS + BREAKER_TIMEOUT))
        opened=0
        while ((SECONDS < deadline)); do
            # Reads that fail upstream are what trips the breaker (the probe alone may too).
            for i in 1 2 3 4 5; do
                timeout 5 redis-cli -h 127.0.0.1 -p "${PORT_OF[redfuse]}" get key:000000000000 >/dev/null 2>&1 || true
            done
            ready=$(curl -fsS --max-time 5 "http://127.0.0.1:${ADMIN_OF[redfuse]}/ready" 2>/dev/null || true)
            if [[ $ready == *'"breaker":"open"'* ]]; then
                opened=1
                break
            fi
            sleep 0.2
        done
        if ((opened)); then
            log "breaker: open after $((SECONDS - T_FILLED)) s; GET from the cache"
            got=$(timeout 5 redis-cli -h 127.0.0.1 -p "${PORT_OF[redfuse]}" get key:000000000001 2>&1 || true)
            [[ ${#got} == "$DATA_SIZE" ]] || note "breaker: GET key:000000000001 through redfuse answered '${got:0:40}' (expected the $DATA_SIZE-byte value)"
            h0=$(metric redfuse_cache_requests_total '{result="hit"}')
            m0=$(metric redfuse_cache_requests_total '{result="miss"}')
            s0=$(metric redfuse_cache_requests_total '{result="stale_hit"}')
            for ((r = 1; r <= BREAKER_ROUNDS; r++)); do
                for w in breaker_p16 breaker_p1; do
                    run_workload "$r" redfuse "$w"
                    state=$(curl -fsS --max-time 5 "http://127.0.0.1:${ADMIN_OF[redfuse]}/ready" 2>/dev/null || true)
                    state=$(sed -n 's/.*"breaker":"\([a-z_]*\)".*/\1/p' <<<"$state")
                    BREAKER_STATES+="${state:-?} "
                done
            done
            h1=$(metric redfuse_cache_requests_total '{result="hit"}')
            m1=$(metric redfuse_cache_requests_total '{result="miss"}')
            s1=$(metric redfuse_cache_requests_total '{result="stale_hit"}')
            BREAKER_HITS=$(awk -v a="${h1:-0}" -v b="${h0:-0}" 'BEGIN { printf "%d", a - b }')
            BREAKER_LOOKUPS=$(awk -v a="${h1:-0}" -v b="${h0:-0}" -v c="${m1:-0}" -v d="${m0:-0}" -v e="${s1:-0}" -v f="${s0:-0}" \
                'BEGIN { printf "%d", (a - b) + (c - d) + (e - f) }')
            BREAKER_DONE=1
            elapsed=$((SECONDS - T_FILLED))
            ((elapsed < 300)) || note "breaker: the runs ended ${elapsed}s after the fill, past max_stale_ms (300 s): late reads may have missed"
        else
            note "breaker: did not open within ${BREAKER_TIMEOUT}s after redis-server stopped"
            FAILED=1
        fi
    else
        log "breaker: reading the keys through redfuse failed"
        FAILED=1
    fi
fi

# ---------------------------------------------------------------- report --

# median TARGET WORKLOAD FIELD(4=rps 5=p50 6=p99): "FAIL" if any round failed.
median() {
    awk -F'\t' -v t="$1" -v w="$2" -v f="$3" '
        $2 == t && $3 == w { if ($f == "FAIL" || $f == "n/a") bad = $f; else v[n++] = $f }
        END {
            if (bad != "") { print bad; exit }
            if (n == 0) { print "n/a"; exit }
            for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] + 0 < v[i] + 0) { s = v[i]; v[i] = v[j]; v[j] = s }
            print (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2
        }' "$RAW"
}
# spread TARGET WORKLOAD: "min-max" requests/s over the rounds.
spread() {
    awk -F'\t' -v t="$1" -v w="$2" '
        $2 == t && $3 == w && $4 != "FAIL" {
            if (n++ == 0 || $4 + 0 < lo) lo = $4 + 0
            if (n == 1 || $4 + 0 > hi) hi = $4 + 0
        }
        END { if (n) printf "%.0f-%.0f", lo, hi; else printf "n/a" }' "$RAW"
}
isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
fmt_rps() { isnum "$1" && printf '%.0f' "$1" || printf '%s' "$1"; }
fmt_ms() { isnum "$1" && printf '%.3f' "$1" || printf '%s' "$1"; }
ratio() { # a/b to 2 places, or n/a
    if isnum "$1" && isnum "$2" && awk -v b="$2" 'BEGIN { exit !(b > 0) }'; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        printf 'n/a'
    fi
}
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }

label() {
    case $1 in
    get_p1) echo "GET P1, random keys" ;;
    set_p1) echo "SET P1, random keys, ${DATA_SIZE} B" ;;
    get_p16) echo "GET P16, random keys" ;;
    hot_p16) echo "GET P16, one hot key" ;;
    mix) echo "90/10 GET/SET P${MIX_PIPELINE}, ${MIX_VALUE_SIZE} B" ;;
    mget10) echo "MGET 10 keys P${MGET_PIPELINE}" ;;
    breaker_p16) echo "GET P16, breaker open" ;;
    breaker_p1) echo "GET P1, breaker open" ;;
    esac
}

MISSED=0
VERDICT=""
# verdict GOT NEED [FAIL]: sets VERDICT to PASS / FAIL / not evaluated, and MISSED (not
# called in a subshell, so that MISSED sticks).
verdict() {
    if [[ ${3:-} == FAIL || $1 == FAIL ]]; then
        MISSED=1
        VERDICT="FAIL (run failed)"
    elif [[ $1 == n/a ]]; then
        VERDICT="not evaluated"
    elif ge "$1" "$2"; then
        VERDICT="PASS"
    else
        MISSED=1
        VERDICT="FAIL"
    fi
}
# target_row WHAT WORKLOAD A B NEED: ratio of median(A)/median(B) for WORKLOAD against NEED.
target_row() {
    local what=$1 w=$2 a=$3 b=$4 need=$5 ma mb r
    if ! has_target "$a" || ! has_target "$b"; then
        printf '| %s | n/a | >= %sx | not evaluated (%s not run) |\n' "$what" "$need" "$(has_target "$a" && echo "$b" || echo "$a")"
        return
    fi
    if [[ " ${WL[*]} " != *" $w "* && $w != breaker_* ]]; then
        printf '| %s | n/a | >= %sx | not evaluated (workload not run) |\n' "$what" "$need"
        return
    fi
    ma=$(median "$a" "$w" 4)
    mb=$(median "$b" "${6:-$w}" 4)
    r=$(ratio "$ma" "$mb")
    local anyfail=""
    [[ $ma == FAIL || $mb == FAIL ]] && anyfail=FAIL
    verdict "$r" "$need" "$anyfail"
    [[ $r == n/a ]] || r="${r}x"
    printf '| %s | %s | >= %sx | %s |\n' "$what" "$r" "$need" "$VERDICT"
}

redis_ver=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
nc_ver=$(command -v nutcracker >/dev/null && nutcracker -V 2>&1 | sed -n 's/.*nutcracker-\([0-9.]*\).*/\1/p' | head -n 1 || true)
rc_ver=""
if has_target rcproxy; then
    rc_ver=$(sed -n 's/^\[rcproxy-\([^]]*\)\].*/\1/p;T;q' "$WORKDIR/rcproxy.log" || true)
fi
rf_rev=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo "uncommitted")

REPORT="$WORKDIR/results.md"
{
    echo "## redfuse benchmark"
    echo
    echo "$(date -u +'%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), load average before start $LOAD_BEFORE."
    echo "redis-server $redis_ver; redfuse $rf_rev${REDFUSE_ARGS:+ ($REDFUSE_ARGS)}; twemproxy ${nc_ver:-not run}; rcproxy ${rc_ver:-not run}${rc_ver:+ ($RCPROXY_THREADS thread)}."
    echo "redis-benchmark -c $CLIENTS; $KEYSPACE keys of $DATA_SIZE B prefilled (every GET hits); requests per run: P1 $N_P1, GET P16 $N_P16, hot key $N_HOT, mix $N_MIX ($MIX_READ_CLIENTS GET + $MIX_WRITE_CLIENTS SET clients, $MIX_KEYSPACE keys), MGET $N_MGET."
    echo "$ROUNDS round(s), targets interleaved with the order rotated each round; each figure is the median over the rounds, min-max of requests/s shown."
    echo "Client, proxies and Redis share the machine over loopback. Ratios are of median requests/s within this run."
    echo
    echo "| workload | target | requests/s | vs direct | p50 ms | p99 ms | requests/s min-max |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for w in "${WL[@]}"; do
        d=$(median direct "$w" 4)
        for t in "${ORDERED[@]}"; do
            m=$(median "$t" "$w" 4)
            rd=$(ratio "$m" "$d")
            [[ $rd == n/a ]] || rd="${rd}x"
            printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$(label "$w")" "$t" "$(fmt_rps "$m")" "$rd" \
                "$(fmt_ms "$(median "$t" "$w" 5)")" "$(fmt_ms "$(median "$t" "$w" 6)")" "$(spread "$t" "$w")"
        done
    done
    if ((BREAKER_DONE)); then
        for w in breaker_p16 breaker_p1; do
            base=$([[ $w == breaker_p16 ]] && echo get_p16 || echo get_p1)
            m=$(median redfuse "$w" 4)
            rd=$(ratio "$m" "$(median direct "$base" 4)")
            [[ $rd == n/a ]] || rd="${rd}x"
            printf '| %s | redfuse (Redis stopped) | %s | %s | %s | %s | %s |\n' "$(label "$w")" "$(fmt_rps "$m")" "$rd" \
                "$(fmt_ms "$(median redfuse "$w" 5)")" "$(fmt_ms "$(median redfuse "$w" 6)")" "$(spread redfuse "$w")"
        done
    fi
    echo
    echo "Ratios between targets (medians):"
    echo
    echo "| workload | redfuse/twemproxy | redfuse/rcproxy | cache on/off | redfuse/direct |"
    echo "|---|---:|---:|---:|---:|"
    for w in "${WL[@]}"; do
        m=$(median redfuse "$w" 4)
        cells=()
        for b in twemproxy rcproxy redfuse-nocache direct; do
            x=$(ratio "$m" "$(median "$b" "$w" 4)")
            [[ $x == n/a ]] || x="${x}x"
            cells+=("$x")
        done
        printf '| %s | %s | %s | %s | %s |\n' "$(label "$w")" "${cells[@]}"
    done
    echo
    echo "### Targets (issue 9)"
    echo
    echo "| target | measured | needed | verdict |"
    echo "|---|---:|---:|---|"
    target_row "GET P16 random keys: redfuse vs twemproxy" get_p16 redfuse twemproxy "$T_VS_TWEMPROXY"
    target_row "GET P16 random keys: redfuse vs rcproxy" get_p16 redfuse rcproxy "$T_VS_RCPROXY"
    target_row "GET P16 one hot key: redfuse vs twemproxy" hot_p16 redfuse twemproxy "$T_VS_TWEMPROXY"
    target_row "GET P16 one hot key: redfuse vs rcproxy" hot_p16 redfuse rcproxy "$T_VS_RCPROXY"
    for w in get_p16 hot_p16 mix mget10; do
        target_row "cache on vs off, $(label "$w")" "$w" redfuse redfuse-nocache "$T_CACHE_COST"
    done
    target_row "GET P1: redfuse vs direct" get_p1 redfuse direct "$T_P1_VS_DIRECT"
    target_row "SET P1: redfuse vs direct" set_p1 redfuse direct "$T_P1_VS_DIRECT"
    if ((BREAKER_DONE)); then
        hit_ok=PASS
        if [[ -n $BREAKER_LOOKUPS ]] && ((BREAKER_LOOKUPS > 0)) &&
            ! awk -v h="$BREAKER_HITS" -v l="$BREAKER_LOOKUPS" 'BEGIN { exit !(h / l >= 0.99) }'; then
            hit_ok=FAIL
        fi
        if [[ $hit_ok == PASS ]]; then
            target_row "breaker open, GET P16 from the cache vs direct GET P16" breaker_p16 redfuse direct "$T_BREAKER_VS_DIRECT" get_p16
            target_row "breaker open, GET P1 from the cache vs direct GET P1" breaker_p1 redfuse direct "$T_BREAKER_VS_DIRECT" get_p1
        else
            MISSED=1
            printf '| breaker open, GET from the cache vs direct | n/a | >= %sx | FAIL (only %s of %s lookups hit) |\n' \
                "$T_BREAKER_VS_DIRECT" "$BREAKER_HITS" "$BREAKER_LOOKUPS"
        fi
    else
        printf '| breaker open, GET from the cache vs direct | n/a | >= %sx | not evaluated |\n' "$T_BREAKER_VS_DIRECT"
    fi
    if [[ -n $MEM_IDLE ]]; then
        if awk -v k="$MEM_IDLE" -v t="$T_IDLE_RSS_MIB" 'BEGIN { exit !(k / 1024 <= t) }'; then v=PASS; else v=FAIL; MISSED=1; fi
        printf '| redfuse idle RSS (just started) | %s MiB | <= %s MiB | %s |\n' "$(mib "$MEM_IDLE")" "$T_IDLE_RSS_MIB" "$v"
    else
        printf '| redfuse idle RSS (just started) | n/a | <= %s MiB | not evaluated |\n' "$T_IDLE_RSS_MIB"
    fi
    if [[ -n $MEM_FULL && -n $MEM_BYTES ]]; then
        delta=$(((MEM_FULL - MEM_IDLE) * 1024))
        acct=$(awk -v b="$MEM_BYTES" -v d="$delta" 'BEGIN { if (d > 0) printf "%.2f", b / d; else print "n/a" }')
        if [[ $acct == n/a ]] || ! awk -v e="${MEM_EVICTIONS:-0}" 'BEGIN { exit !(e > 0) }'; then
            v="not evaluated (cache did not reach its cap)"
        elif awk -v a="$acct" -v t="$T_ACCOUNTING" 'BEGIN { exit !(a >= 1 - t && a <= 1 + t) }'; then
            v=PASS
        else
            v=FAIL
            MISSED=1
        fi
        printf '| redfuse_cache_bytes / RSS the full cache takes | %s | %s-%s | %s |\n' "$acct" \
            "$(awk -v t="$T_ACCOUNTING" 'BEGIN { printf "%.2f", 1 - t }')" "$(awk -v t="$T_ACCOUNTING" 'BEGIN { printf "%.2f", 1 + t }')" "$v"
    else
        printf '| redfuse_cache_bytes / RSS the full cache takes | n/a | %s | not evaluated |\n' "within ${T_ACCOUNTING}"
    fi
    echo
    if ((MISSED)); then
        echo "Verdict: **FAIL**: at least one target missed."
    else
        echo "Verdict: **PASS** on every target that could be evaluated."
    fi
    echo
    echo "### Memory"
    echo
    echo "Peak RSS (VmHWM) of each server over the rounds:"
    echo
    for t in "${ORDERED[@]}"; do
        name=$t
        [[ $t == direct ]] && name="redis-server"
        idle=""
        [[ -n ${IDLE_RSS[$t]:-} ]] && idle=", $(mib "${IDLE_RSS[$t]}") MiB right after start"
        echo "- $name: $([[ -n ${PEAK[$t]:-} ]] && echo "$(mib "${PEAK[$t]}") MiB" || echo "n/a")$idle"
    done
    echo
    if [[ -n $ROUNDS_RSS ]]; then
        echo "redfuse (cache on) after the rounds: RSS $(mib "$ROUNDS_RSS") MiB, redfuse_cache_bytes ${ROUNDS_CACHE_BYTES:-n/a} ($(mib "$((${ROUNDS_CACHE_BYTES:-0} / 1024))") MiB)."
        echo
    fi
    if [[ -n $MEM_IDLE ]]; then
        echo "A fresh redfuse (default config, cache cap 64 MiB = 67108864 B), $MEM_FILL_KEYS distinct keys of $DATA_SIZE B read through it:"
        echo
        echo "| | RSS | redfuse_cache_bytes | entries | evictions |"
        echo "|---|---:|---:|---:|---:|"
        echo "| idle, just started | $(mib "$MEM_IDLE") MiB | ${MEM_IDLE_BYTES:-n/a} | 0 | 0 |"
        if [[ -n $MEM_FULL ]]; then
            echo "| 1 s after the fill | $(mib "$MEM_EARLY") MiB | | | |"
            echo "| ${MEM_SETTLE} s after the fill | $(mib "$MEM_FULL") MiB (peak $(mib "$MEM_HWM") MiB) | ${MEM_BYTES:-n/a} ($(mib "$(((${MEM_BYTES:-0}) / 1024))") MiB) | ${MEM_ENTRIES:-n/a} | ${MEM_EVICTIONS:-n/a} |"
            echo
            echo "The cache's memory as RSS shows it: RSS ${MEM_SETTLE} s after the fill - RSS idle = $(mib "$((MEM_FULL - MEM_IDLE))") MiB."
        fi
    fi
    if ((BREAKER_DONE)); then
        echo
        echo "Breaker open: redis-server stopped, cache filled with the $KEYSPACE keys; cache lookups during the runs: $BREAKER_HITS hits of $BREAKER_LOOKUPS; breaker state after each run: ${BREAKER_STATES% }."
    fi
    if ((${#NOTES[@]})); then
        echo
        echo "Notes:"
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
} >"$REPORT"

cat "$REPORT"
cp "$REPORT" "$RESULTS_FILE.tmp.$$" && mv "$RESULTS_FILE.tmp.$$" "$RESULTS_FILE"
log "report written to $RESULTS_FILE"

if ((FAILED)); then
    KEEP_WORKDIR=1
    log "some runs failed"
    exit 1
fi
if ((MISSED)) && [[ $STRICT == 1 ]]; then
    KEEP_WORKDIR=1
    exit 1
fi
exit 0
