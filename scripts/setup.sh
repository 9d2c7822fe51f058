#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine:
# cmake (Pingora's zlib-ng build), make (jemalloc's build) and the Python Taskcluster client
# (used by one test).
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v make >/dev/null 2>&1 || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c 'import taskcluster' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check taskcluster
fi
# Two unprivileged users for the caller-admission tests (they run clients under other uids).
if [ "$(id -u)" = 0 ]; then
  for u in tcp-admission-test tcp-admission-other; do
    id -u "$u" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$u"
  done
fi
