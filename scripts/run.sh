#!/usr/bin/env bash
# Runs redfuse on 127.0.0.1:6380. With no upstream configured (no --upstream, REDFUSE_UPSTREAM or
# --config), it makes sure a local redis-server answers on 127.0.0.1:6379 first, starting one if
# needed. Extra arguments go to redfuse.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
configured=no
for a in "$@"; do case "$a" in --upstream*|--config*) configured=yes ;; esac; done
[ -n "${REDFUSE_UPSTREAM:-}${REDFUSE_CONFIG:-}" ] && configured=yes
if [ "$configured" = no ] && ! redis-cli -p 6379 ping >/dev/null 2>&1; then
  echo "starting a local redis-server on 127.0.0.1:6379" >&2
  redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
cargo build --release --quiet
exec target/release/redfuse "$@"
