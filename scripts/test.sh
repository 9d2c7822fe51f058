#!/usr/bin/env bash
# Runs every test: unit tests, integration tests against the real binary and a fake
# Taskcluster service, and the real Python Taskcluster client through the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --all-targets "$@"
