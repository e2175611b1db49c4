#!/usr/bin/env bash
# Installs the system packages the demo and the tests need (Debian), once.
set -euo pipefail
missing=()
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
# The fleet-mode tests start private Redis and PostgreSQL servers on loopback.
command -v redis-server >/dev/null || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"
