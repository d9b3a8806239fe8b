#!/bin/sh
# A small, steady load for the docker compose demo (the `loadgen` service runs it in the redis
# image, which has redis-cli). Every round sends, through redfuse, 100 of each:
#   GET product:N            cacheable reads: served from the cache while Redis is down
#   LRANGE recs:N 0 9        reads of keys that do not exist: the `recs:*` miss reply is []
#   INCR ratelimit:client-N  fail-open rule `rate-limit`: answered :1 while Redis is down
#   INCR counter:views       fail-open rule `counters`: queued, replayed when Redis is back
#   SET session:N active     any other write: refused with an error while Redis is down
# then sleeps LOADGEN_PAUSE seconds (about 2,000 commands a second by default).
#
# Environment: LOADGEN_HOST (redfuse), LOADGEN_PORT (6380), LOADGEN_ROUNDS (0: forever),
# LOADGEN_PAUSE (0.2), LOADGEN_REPORT_EVERY (rounds between progress lines, 25).
set -u
host=${LOADGEN_HOST:-redfuse}
port=${LOADGEN_PORT:-6380}
rounds=${LOADGEN_ROUNDS:-0}
pause=${LOADGEN_PAUSE:-0.2}
every=${LOADGEN_REPORT_EVERY:-25}

cli() { redis-cli -h "$host" -p "$port" "$@"; }

tries=0
until cli PING >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 120 ]; then
        echo "loadgen: $host:$port does not answer PING after 120 s" >&2
        exit 1
    fi
    echo "loadgen: waiting for $host:$port"
    sleep 1
done

# The read keys are written once through redfuse; the first GETs then fill its cache.
i=1
while [ "$i" -le 100 ]; do
    echo "SET product:$i product-$i"
    i=$((i + 1))
done | cli >/dev/null
echo "loadgen: seeded product:1..100 through $host:$port"

round() {
    i=1
    while [ "$i" -le 100 ]; do
        echo "GET product:$i"
        echo "LRANGE recs:$i 0 9"
        echo "INCR ratelimit:client-$((i % 10))"
        echo "INCR counter:views"
        echo "SET session:$i active"
        i=$((i + 1))
    done
}

n=0
errors=0
while [ "$rounds" -eq 0 ] || [ "$n" -lt "$rounds" ]; do
    n=$((n + 1))
    # redis-cli reading commands from a pipe prints one reply per line; error replies start
    # with an error code (ERR, WRONGTYPE, ...) and do not stop it.
    e=$(round | cli 2>&1 | grep -c -E '^(ERR|WRONGTYPE|NOAUTH|LOADING|BUSY|\(error\))|Could not connect')
    errors=$((errors + e))
    if [ $((n % every)) -eq 0 ] || [ "$n" -eq "$rounds" ]; then
        echo "loadgen: round $n, $errors error replies since the last report"
        errors=0
    fi
    sleep "$pause"
done
