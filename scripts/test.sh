#!/usr/bin/env bash
# Installs redis-server/redis-tools if missing, then runs every test (unit and integration).
# Tests start their own redis-server processes on ephemeral ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --all-targets -- "$@"
