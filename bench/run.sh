#!/usr/bin/env bash
# bench/run.sh: throughput and latency of redfuse against Redis used directly and
# against twemproxy (nutcracker), measured in one run on this machine.
#
# Usage:
#   bench/run.sh                      # build redfuse (release), run all targets
#   REDFUSE_BIN=/path/redfuse bench/run.sh
#   ROUNDS=1 N_P1=50000 N_P16=200000 bench/run.sh   # quick look
#   TARGETS="direct twemproxy" bench/run.sh    # skip redfuse (no build)
#
# Every target runs against one redis-server. For each round, for each pipeline
# depth, the targets run back to back (direct, redfuse, twemproxy) so that noise
# on a shared machine hits them alike. With ROUNDS > 1 each figure is the median
# over the rounds.
#
# Environment (defaults in brackets):
#   REDFUSE_BIN      redfuse binary; if unset: `cargo build --release` here and use
#                    ${CARGO_TARGET_DIR:-<repo>/target}/release/redfuse
#   REDFUSE_ARGS     extra redfuse flags, word-split, e.g. "--threads 1" [none];
#                    REDFUSE_* variables in the environment reach redfuse as usual
#   TARGETS          subset of "direct redfuse twemproxy" [all three]; twemproxy is
#                    dropped with a warning when nutcracker is not installed
#   ROUNDS           repetitions, median reported [3]
#   N_P1             requests per test, unpipelined [200000]
#   N_P16            requests per test, pipelined [1000000]
#   PIPELINES        pipeline depths to run [1 16]; N_P<depth> sets -n, falling back
#                    to N_P16 for any depth > 1
#   CLIENTS          redis-benchmark -c [50]
#   DATA_SIZE        redis-benchmark -d, value size in bytes [64]
#   KEYSPACE         redis-benchmark -r, random key range; prefilled first [100000]
#   WARMUP_N         warm-up requests per target before measuring [20000]
#   BENCH_TIMEOUT    seconds allowed per redis-benchmark run [300]
#   STARTUP_TIMEOUT  seconds allowed for a server to answer PING [30]
#   TARGET_P1_VS_DIRECT    pass mark, unpipelined redfuse/direct [0.9]
#   TARGET_PIPE_VS_TWEM    pass mark, pipelined redfuse/twemproxy [1.5]
#   TWEMPROXY_SERVER_CONNECTIONS  nutcracker server_connections [1]
#   STRICT           1: exit 1 when a pass mark is missed [0]
#   RESULTS_FILE     where the Markdown report goes [bench/results.md]
#   KEEP_WORKDIR     1: keep the temp dir with logs and raw CSV [0; kept on error]
#
# Exit status: 0 when every run completed (and, with STRICT=1, every pass mark
# was met); 1 when a run failed or a server crashed; 2 on a setup error.
# Only loopback and ports free at run time are used; every process started here
# is stopped on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

ROUNDS=${ROUNDS:-3}
N_P1=${N_P1:-200000}
N_P16=${N_P16:-1000000}
PIPELINES=${PIPELINES:-"1 16"}
CLIENTS=${CLIENTS:-50}
DATA_SIZE=${DATA_SIZE:-64}
KEYSPACE=${KEYSPACE:-100000}
WARMUP_N=${WARMUP_N:-20000}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-30}
TARGET_P1_VS_DIRECT=${TARGET_P1_VS_DIRECT:-0.9}
TARGET_PIPE_VS_TWEM=${TARGET_PIPE_VS_TWEM:-1.5}
TWEMPROXY_SERVER_CONNECTIONS=${TWEMPROXY_SERVER_CONNECTIONS:-1}
STRICT=${STRICT:-0}
RESULTS_FILE=${RESULTS_FILE:-$SCRIPT_DIR/results.md}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
TARGETS=${TARGETS:-"direct redfuse twemproxy"}
REDFUSE_ARGS=${REDFUSE_ARGS:-}
TESTS=(GET SET)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in ROUNDS N_P1 N_P16 CLIENTS DATA_SIZE KEYSPACE WARMUP_N BENCH_TIMEOUT STARTUP_TIMEOUT; do
    is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
((ROUNDS >= 1)) || die "ROUNDS must be >= 1"
for p in $PIPELINES; do is_uint "$p" && ((p >= 1)) || die "PIPELINES: bad depth '$p'"; done

for t in $TARGETS; do
    case $t in direct | redfuse | twemproxy) ;; *) die "TARGETS: unknown target '$t'" ;; esac
done
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

for tool in redis-server redis-cli redis-benchmark timeout awk sort; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install redis-server redis-tools coreutils)"
done

if has_target twemproxy && ! command -v nutcracker >/dev/null; then
    log "WARNING: nutcracker not installed (apt-get install -y nutcracker); skipping twemproxy"
    # shellcheck disable=SC2086 # split the list on purpose
    TARGETS=$(printf '%s\n' $TARGETS | grep -vx twemproxy | tr '\n' ' ')
fi
# Canonical order: direct, redfuse, twemproxy.
ORDERED=()
for t in direct redfuse twemproxy; do has_target "$t" && ORDERED+=("$t"); done
((${#ORDERED[@]} > 0)) || die "no targets left to run"

# ---------------------------------------------------------------- processes --

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/redfuse-bench.XXXXXX")
declare -a PIDS=()
declare -A PID_OF=() PORT_OF=()
BENCH_PID=""
FAILED=0

stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
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
    [[ -n $BENCH_PID ]] && stop_pid "$BENCH_PID"
    local i
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
# Sets FREE_PORT to a loopback port nothing listens on, chosen by the kernel
# (bind to port 0) and not handed out before in this run. Not run in a subshell
# so that HANDED_OUT keeps track.
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

# exit_status PID: sets EXIT_DESC to how a child that has exited ended (not in a
# subshell: only this shell can wait for its children).
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

# start_server NAME: start it on a fresh port, retrying if the port was taken.
start_server() {
    local name=$1 attempt port pid
    for attempt in 1 2 3; do
        free_port || return 1
        port=$FREE_PORT
        case $name in
        redis)
            redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
                --daemonize no --protected-mode yes --loglevel warning \
                --dir "$WORKDIR" >"$WORKDIR/redis.log" 2>&1 &
            ;;
        redfuse)
            local admin
            free_port || return 1
            admin=$FREE_PORT
            # shellcheck disable=SC2086 # REDFUSE_ARGS is split on purpose
            "$REDFUSE_BIN" --listen "127.0.0.1:$port" --upstream "127.0.0.1:${PORT_OF[direct]}" \
                --admin-listen "127.0.0.1:$admin" --log-level warn $REDFUSE_ARGS >"$WORKDIR/redfuse.log" 2>&1 &
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
  server_connections: $TWEMPROXY_SERVER_CONNECTIONS
  servers:
    - 127.0.0.1:${PORT_OF[direct]}:1
EOF
            nutcracker -t -c "$WORKDIR/nutcracker.yml" >"$WORKDIR/nutcracker-test.log" 2>&1 ||
                { cat "$WORKDIR/nutcracker-test.log" >&2; die "generated nutcracker config rejected"; }
            nutcracker -c "$WORKDIR/nutcracker.yml" -s "$stats" -a 127.0.0.1 \
                -o "$WORKDIR/twemproxy.log" -p "$WORKDIR/nutcracker.pid" >>"$WORKDIR/twemproxy.log" 2>&1 &
            ;;
        esac
        pid=$!
        PIDS+=("$pid")
        if wait_ready "$name" "$pid" "$port"; then
            PID_OF[$name]=$pid
            [[ $name == redis ]] && name=direct
            PORT_OF[$name]=$port
            return 0
        fi
        stop_pid "$pid"
        # Retry only when the port was taken between choosing and binding it.
        grep -qiE 'address already in use|addrinuse|os error 98' "$WORKDIR/$name.log" 2>/dev/null || return 1
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

# ------------------------------------------------------------------- build --

if has_target redfuse; then
    if [[ -z ${REDFUSE_BIN:-} ]]; then
        command -v cargo >/dev/null || die "cargo not found and REDFUSE_BIN not set"
        log "building redfuse (cargo build --release)"
        (cd "$REPO_DIR" && cargo build --release) >&2 || die "cargo build --release failed"
        REDFUSE_BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/redfuse
        [[ $REDFUSE_BIN == /* ]] || REDFUSE_BIN=$REPO_DIR/$REDFUSE_BIN
    fi
    [[ -x $REDFUSE_BIN ]] || die "REDFUSE_BIN '$REDFUSE_BIN' is not an executable file"
fi

# ------------------------------------------------------------------ start --

start_server redis || die "redis-server did not start"
log "redis-server pid ${PID_OF[redis]} on 127.0.0.1:${PORT_OF[direct]}"
for t in "${ORDERED[@]}"; do
    [[ $t == direct ]] && continue
    start_server "$t" || die "$t did not start (see $WORKDIR/$t.log)"
    log "$t pid ${PID_OF[$t]} on 127.0.0.1:${PORT_OF[$t]}"
done
for t in "${ORDERED[@]}"; do
    check_roundtrip "$t" || die "$t failed the SET/GET round trip check"
done

# Fill the key space so every GET hits, as on a warm cache (keys are formatted
# as redis-benchmark's key:__rand_int__, i.e. key:%012d).
log "prefilling $KEYSPACE keys of $DATA_SIZE bytes"
awk -v n="$KEYSPACE" -v d="$DATA_SIZE" 'BEGIN {
    v = sprintf("%*s", d, ""); gsub(/ /, "x", v)
    for (i = 0; i < n; i++) {
        k = sprintf("key:%012d", i)
        printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
    }
}' | timeout 120 redis-cli -h 127.0.0.1 -p "${PORT_OF[direct]}" --pipe >"$WORKDIR/prefill.log" 2>&1 ||
    { cat "$WORKDIR/prefill.log" >&2; die "prefill failed"; }

# -------------------------------------------------------------- benchmark --

RAW="$WORKDIR/raw.tsv" # round target pipeline test rps p50 p99
: >"$RAW"
declare -A DEAD=()

requests_for() {
    local p=$1 var="N_P$1"
    if ((p == 1)); then echo "$N_P1"; else echo "${!var:-$N_P16}"; fi
}

# run_bench OUTFILE TARGET N PIPELINE TESTS: redis-benchmark in the background,
# polled, so that a signal reaches cleanup at once and a crashed server does not
# leave redis-benchmark spinning until BENCH_TIMEOUT (it retries refused
# connections forever). Returns its exit status, 125 when the server died.
run_bench() {
    local out=$1 t=$2 n=$3 p=$4 tests=$5 rc=0
    local spid=${PID_OF[$t]:-${PID_OF[redis]}}
    kill -0 "$spid" 2>/dev/null || return 125
    timeout "$BENCH_TIMEOUT" redis-benchmark -h 127.0.0.1 -p "${PORT_OF[$t]}" -t "$tests" \
        -c "$CLIENTS" -n "$n" -r "$KEYSPACE" -d "$DATA_SIZE" -P "$p" --csv \
        >"$out" 2>"$out.err" </dev/null &
    BENCH_PID=$!
    while kill -0 "$BENCH_PID" 2>/dev/null; do
        if ! kill -0 "$spid" 2>/dev/null || ! kill -0 "${PID_OF[redis]}" 2>/dev/null; then
            stop_pid "$BENCH_PID"
            BENCH_PID=""
            return 125
        fi
        sleep 0.2
    done
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    return "$rc"
}

for t in "${ORDERED[@]}"; do
    log "warming up $t"
    run_bench "$WORKDIR/warmup-$t.csv" "$t" "$WARMUP_N" 16 get ||
        log "WARNING: warm-up of $t failed: $(tail -n 2 "$WORKDIR/warmup-$t.csv.err" 2>/dev/null | tr '\n' ' ')"
done

read -ra PIPE_LIST <<<"$PIPELINES"
for ((r = 1; r <= ROUNDS; r++)); do
    for p in "${PIPE_LIST[@]}"; do
        n=$(requests_for "$p")
        for t in "${ORDERED[@]}"; do
            if [[ -n ${DEAD[$t]:-} ]]; then
                for test in "${TESTS[@]}"; do printf '%s\t%s\t%s\t%s\tFAIL\tFAIL\tFAIL\n' "$r" "$t" "$p" "$test" >>"$RAW"; done
                continue
            fi
            out="$WORKDIR/r$r-P$p-$t.csv"
            log "round $r/$ROUNDS  P$p  $t  (-n $n)"
            rc=0
            run_bench "$out" "$t" "$n" "$p" get,set || rc=$?
            # Pick columns by header name; older redis-benchmark prints only test,rps.
            [[ -f $out ]] || : >"$out"
            parsed=$(awk -F, -v r="$r" -v t="$t" -v p="$p" '
                { for (i = 1; i <= NF; i++) gsub(/"/, "", $i) }
                $1 == "test" { for (i = 1; i <= NF; i++) col[$i] = i; next }
                ("rps" in col) && ($1 == "GET" || $1 == "SET") {
                    p50 = ("p50_latency_ms" in col) ? $col["p50_latency_ms"] : "n/a"
                    p99 = ("p99_latency_ms" in col) ? $col["p99_latency_ms"] : "n/a"
                    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r, t, p, $1, $col["rps"], p50, p99
                }' "$out")
            for test in "${TESTS[@]}"; do
                line=$(grep -P "\t$test\t" <<<"$parsed" || true)
                if ((rc == 0)) && [[ -n $line ]]; then
                    echo "$line" >>"$RAW"
                else
                    printf '%s\t%s\t%s\t%s\tFAIL\tFAIL\tFAIL\n' "$r" "$t" "$p" "$test" >>"$RAW"
                    FAILED=1
                fi
            done
            if ((rc != 0)); then
                if ((rc == 125)); then
                    log "$t P$p: server gone, redis-benchmark stopped"
                elif ((rc == 124)); then
                    log "$t P$p: redis-benchmark timed out after ${BENCH_TIMEOUT}s"
                else
                    log "$t P$p: redis-benchmark exited with $rc: $(tail -n 3 "$out.err" | tr '\n' ' ')"
                fi
            fi
            pid=${PID_OF[$t]:-${PID_OF[redis]}}
            if ! kill -0 "$pid" 2>/dev/null; then
                exit_status "$pid"
                log "$t (pid $pid) DIED during round $r P$p, $EXIT_DESC; last log lines:"
                tail -n 20 "$WORKDIR/$([[ $t == direct ]] && echo redis || echo "$t").log" >&2 || true
                DEAD[$t]=1
                FAILED=1
                [[ $t == direct ]] && for x in "${ORDERED[@]}"; do DEAD[$x]=1; done
            fi
        done
    done
done

# ---------------------------------------------------------------- memory --

rss_of() { # "VmRSS / VmHWM" of a live pid
    local pid=$1
    [[ -r /proc/$pid/status ]] || { echo "n/a (exited)"; return; }
    awk '/^VmRSS:/ { rss = $2 } /^VmHWM:/ { hwm = $2 }
         END { printf "%.1f MiB (peak %.1f MiB)", rss / 1024, hwm / 1024 }' "/proc/$pid/status"
}

# ---------------------------------------------------------------- report --

# median TARGET PIPELINE TEST FIELD(5=rps 6=p50 7=p99): "FAIL" if any round failed.
median() {
    awk -F'\t' -v t="$1" -v p="$2" -v x="$3" -v f="$4" '
        $2 == t && $3 == p && $4 == x { if ($f == "FAIL" || $f == "n/a") bad = $f; else v[n++] = $f }
        END {
            if (bad != "") { print bad; exit }
            if (n == 0) { print "n/a"; exit }
            for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] + 0 < v[i] + 0) { s = v[i]; v[i] = v[j]; v[j] = s }
            m = (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2
            print m
        }' "$RAW"
}
# spread TARGET PIPELINE TEST: "min-max" requests/s over the rounds.
spread() {
    awk -F'\t' -v t="$1" -v p="$2" -v x="$3" '
        $2 == t && $3 == p && $4 == x && $5 != "FAIL" {
            if (n++ == 0 || $5 + 0 < lo) lo = $5 + 0
            if (n == 1 || $5 + 0 > hi) hi = $5 + 0
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

redis_ver=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
nc_ver=$(command -v nutcracker >/dev/null && nutcracker -V 2>&1 | sed -n 's/.*nutcracker-\([0-9.]*\).*/\1/p' | head -n 1 || true)
rf_rev=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo "uncommitted")

REPORT="$WORKDIR/results.md"
MISSED=0
{
    echo "## redfuse benchmark"
    echo
    echo "$(date -u +'%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), load average before start $LOAD_BEFORE."
    echo "redis-server $redis_ver; redfuse $rf_rev${REDFUSE_ARGS:+ ($REDFUSE_ARGS)}; twemproxy ${nc_ver:-not installed}."
    echo "redis-benchmark -t get,set -c $CLIENTS -r $KEYSPACE -d $DATA_SIZE, -n $N_P1 unpipelined and $N_P16 pipelined;"
    echo "$ROUNDS round(s), each figure the median over rounds (min-max of requests/s shown); key space prefilled;"
    echo "client, proxy and Redis share the machine over loopback. Ratios are of median requests/s."
    echo
    echo "| mode | target | requests/s | p50 ms | p99 ms | requests/s min-max |"
    echo "|---|---|---:|---:|---:|---:|"
    for p in "${PIPE_LIST[@]}"; do
        for test in "${TESTS[@]}"; do
            for t in "${ORDERED[@]}"; do
                printf '| %s P%s | %s | %s | %s | %s | %s |\n' "$test" "$p" "$t" \
                    "$(fmt_rps "$(median "$t" "$p" "$test" 5)")" \
                    "$(fmt_ms "$(median "$t" "$p" "$test" 6)")" \
                    "$(fmt_ms "$(median "$t" "$p" "$test" 7)")" \
                    "$(spread "$t" "$p" "$test")"
            done
        done
    done
    echo
    echo "| mode | redfuse/direct | redfuse/twemproxy | pass mark | verdict |"
    echo "|---|---:|---:|---|---|"
    for p in "${PIPE_LIST[@]}"; do
        for test in "${TESTS[@]}"; do
            rf=$(median redfuse "$p" "$test" 5)
            d=$(median direct "$p" "$test" 5)
            tw=$(median twemproxy "$p" "$test" 5)
            r_d=$(ratio "$rf" "$d")
            r_t=$(ratio "$rf" "$tw")
            if ((p == 1)); then
                mark="redfuse >= ${TARGET_P1_VS_DIRECT}x direct"
                got=$r_d
                need=$TARGET_P1_VS_DIRECT
            else
                mark="redfuse >= ${TARGET_PIPE_VS_TWEM}x twemproxy"
                got=$r_t
                need=$TARGET_PIPE_VS_TWEM
            fi
            if [[ $rf == FAIL ]]; then
                verdict="FAIL (run failed)"
                MISSED=1
            elif [[ $got == n/a ]]; then
                verdict="not evaluated"
            elif ge "$got" "$need"; then
                verdict="PASS"
            else
                verdict="FAIL"
                MISSED=1
            fi
            [[ $r_d == n/a ]] || r_d="${r_d}x"
            [[ $r_t == n/a ]] || r_t="${r_t}x"
            printf '| %s P%s | %s | %s | %s | %s |\n' "$test" "$p" "$r_d" "$r_t" "$mark" "$verdict"
        done
    done
    echo
    if ((MISSED)); then
        echo "Verdict: **FAIL**: at least one pass mark missed."
    elif has_target redfuse; then
        echo "Verdict: **PASS** on every pass mark that could be evaluated."
    else
        echo "Verdict: not evaluated (redfuse not run)."
    fi
    echo
    echo "Memory after the run (VmRSS):"
    for t in "${ORDERED[@]}"; do
        [[ $t == direct ]] && name=redis || name=$t
        echo "- $name: $(rss_of "${PID_OF[$name]}")"
    done
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
