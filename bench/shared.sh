#!/usr/bin/env bash
# Shared mode (one proxy, many tasks) against single-task mode, in one run: throughput and
# latency with requests spread over 1,000 (and 10,000) registered tasks, memory per task,
# registration rate. Writes bench/shared-results.json and prints Markdown tables.
#   bench/shared.sh [--seconds 10] [--tasks 1000] [--many-tasks 0] [--rounds 2]
set -euo pipefail
cd "$(dirname "$0")/.."
# The same preparation as bench/run.sh (scripts/setup.sh, nginx/wrk/curl if missing, release
# build): run.sh does it all and then hands its arguments to driver.py, which stops at --help.
bash bench/run.sh --help >/dev/null
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/shared.py "$@"
