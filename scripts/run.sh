#!/usr/bin/env bash
# Builds and starts the proxy.
#
#   scripts/run.sh [proxy options]            uses TASKCLUSTER_ROOT_URL, TASKCLUSTER_CLIENT_ID,
#                                             TASKCLUSTER_ACCESS_TOKEN (and TASKCLUSTER_CERTIFICATE)
#   scripts/run.sh --offline [proxy options]  starts the test suite's fake Taskcluster service
#                                             and points the proxy at it (no network needed)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin taskcluster-proxy --example fake-taskcluster

if [ "${1:-}" = "--offline" ]; then
  shift
  info=$(mktemp)
  ./target/release/examples/fake-taskcluster >"$info" &
  fake=$!
  trap 'kill $fake 2>/dev/null' EXIT
  for _ in $(seq 100); do [ -s "$info" ] && break; sleep 0.1; done
  # The fake prints shell assignments: root URL and the credentials it accepts.
  set -a; . "$info"; set +a
  echo "fake Taskcluster at $TASKCLUSTER_ROOT_URL (clientId $TASKCLUSTER_CLIENT_ID)"
  echo "try: curl -s http://127.0.0.1:${PROXY_PORT:-8080}/api/auth/v1/test-authenticate-get/"
  ./target/release/taskcluster-proxy -i 127.0.0.1 -p "${PROXY_PORT:-8080}" "$@"
else
  exec ./target/release/taskcluster-proxy "$@"
fi
