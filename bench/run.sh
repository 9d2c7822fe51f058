#!/usr/bin/env bash
# Side-by-side benchmark of direct / nginx / taskcluster-proxy against one nginx upstream.
# Installs nginx and wrk from Debian if missing, builds the release binary, runs the driver.
#   bench/run.sh [--seconds 10] [--idle-conns 10000] [--threads 1] [--work-stealing]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --bin taskcluster-proxy
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/driver.py "$@"
