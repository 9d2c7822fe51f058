#!/usr/bin/env bash
# What keeping request bodies for replay costs (CPU, memory, failure latency), side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx >/dev/null 2>&1 || {
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nginx >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq nginx >/dev/null; fi
}
cargo build --release --bin taskcluster-proxy
exec python3 bench/replay.py "$@"
