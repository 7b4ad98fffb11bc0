#!/usr/bin/env bash
# Runs the whole test suite on a machine that has Go and the PostgreSQL
# server binaries. Tests start their own throwaway Postgres. A few tests run
# real tools, from these Debian packages:
#   chromium   (chromium)   - the status page is checked in a headless browser
#   haproxy    (haproxy)    - the compose load balancer config is run for real
#   promtool   (prometheus) - the alert rules and dashboard queries are checked
# As root, with apt-get, missing ones are installed for their programs only:
# the haproxy and prometheus services the packages bring are neither started
# nor left enabled. Otherwise the tests that need a missing tool are skipped,
# with a message, and this script says what to install before and after the
# run; in CI (CI=true) those tests fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test.sh: $*" >&2; }

# The system paths this script touches; TEST_SH_SYSROOT prefixes them for
# the test of this script (internal/deploycheck), which stubs the tools.
sysroot=${TEST_SH_SYSROOT:-}
policy=$sysroot/usr/sbin/policy-rc.d
booted=$sysroot/run/systemd/system # present when systemd runs
initd=$sysroot/etc/init.d

in_ci() { case "${CI:-}" in 1 | t | T | true | TRUE | True) return 0 ;; esac; return 1; }

# missing prints the package of each tool that is not installed.
missing() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || echo chromium
  command -v haproxy >/dev/null 2>&1 || echo haproxy
  command -v promtool >/dev/null 2>&1 || echo prometheus
}

# quiet_service leaves a service installed by this script disabled and
# stopped, whatever the init: systemd running (a host), systemctl without
# systemd running (a container: it edits the unit links offline), or
# sysvinit scripts.
quiet_service() {
  local svc=$1
  if command -v systemctl >/dev/null 2>&1; then
    if [ -d "$booted" ]; then
      systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
    else
      systemctl disable "$svc.service" >/dev/null 2>&1 || true
    fi
  fi
  if [ -x "$initd/$svc" ] && [ ! -d "$booted" ]; then
    if command -v update-rc.d >/dev/null 2>&1; then update-rc.d "$svc" disable >/dev/null 2>&1 || true; fi
    if "$initd/$svc" status >/dev/null 2>&1; then "$initd/$svc" stop >/dev/null 2>&1 || true; fi
  fi
  if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet "$svc.service" 2>/dev/null; then
    say "WARNING: could not disable $svc.service; disable it with: systemctl disable --now $svc"
  elif [ -d "$booted" ] && systemctl is-active --quiet "$svc.service" 2>/dev/null; then
    say "WARNING: $svc.service is running; stop it with: systemctl disable --now $svc"
  else
    say "$svc: installed for its program only (its service is disabled and not running)"
  fi
}

# install_tools installs packages without letting their maintainer scripts
# start a daemon (a policy-rc.d that denies every start, which both
# invoke-rc.d and deb-systemd-invoke obey), then disables the services.
install_tools() {
  local ours=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/test.sh: no service starts while it installs test tools\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    ours=1
    trap 'rm -f "$policy"' EXIT
  fi
  say "installing $* (Debian packages the tests use)…"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ -n "$ours" ]; then
    rm -f "$policy"
    trap - EXIT
  fi
  local p
  for p in "$@"; do
    case $p in haproxy | prometheus) quiet_service "$p" ;; esac
  done
}

mapfile -t need < <(missing)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  install_tools "${need[@]}"
  mapfile -t need < <(missing)
fi
if [ ${#need[@]} -gt 0 ]; then
  if in_ci; then
    say "missing ${need[*]}: in CI (CI=$CI) the tests that need them FAIL"
  else
    say "missing ${need[*]}: the tests that need them are SKIPPED; everything else runs"
  fi
  say "to run them too: sudo apt-get install ${need[*]}"
fi

go vet ./...
rc=0
go test -timeout 30m -count=1 "$@" ./... || rc=$?
if [ ${#need[@]} -gt 0 ] && ! in_ci; then
  say "reminder: tests needing ${need[*]} did not run (sudo apt-get install ${need[*]})"
fi
exit $rc
