#!/usr/bin/env bash
# Runs the whole test suite on a machine that has Go and the PostgreSQL
# server binaries. Tests start their own throwaway Postgres. A few tests run
# real tools, installed here from Debian packages when missing:
#   chromium   - the status page is checked in a headless browser
#   haproxy    - the compose load balancer config is run for real
#   prometheus - promtool checks the alert rules and dashboard queries
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${missing[*]} (Debian packages the tests use)…"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test.sh: the tests need these Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

go vet ./...
exec go test -timeout 30m -count=1 "$@" ./...
