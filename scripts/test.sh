#!/usr/bin/env bash
# Runs the whole test suite on a machine that has Go and the PostgreSQL
# server binaries. Tests start their own throwaway Postgres. The status-page
# test drives a real headless Chromium, installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium (headless browser for the status page test)…"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test.sh: the status page test needs Chromium: run 'sudo apt-get install chromium' and retry" >&2
    exit 1
  fi
fi

go vet ./...
exec go test -timeout 30m -count=1 "$@" ./...
