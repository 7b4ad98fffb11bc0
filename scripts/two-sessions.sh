#!/usr/bin/env bash
# Runs README.md's "Two Claude Code sessions in two minutes" for real, as a
# new user would: the command of the block after <!-- two-sessions:cluster -->
# (`go run ./cmd/broker dev`), then every line of the block after
# <!-- two-sessions:steps -->, one at a time, with two scratch HOME folders.
# The README is the only copy of the steps; this script rewrites nothing in
# them but:
#   /tmp/alice, /tmp/bob     the scratch HOMEs, in the work folder
#   cm1.…                    the invite the banner printed (and each join line
#                            must be one of the banner's lines)
#   go run ./cmd/broker dev  the same program built into the work folder, run
#                            with --data there and free ports
#   GOPATH                   the work folder's (environment only), so that the
#                            README's `go install` and PATH lines put and find
#                            claudemesh there; the module and build caches stay
#   a line ending in &       its output goes to a log named after the
#                            claudemesh command it runs (listen, mcp)
#   wait                     waits for each background job: each must exit 0
# A step's comment may say what it prints: `# → TEXT` (the step's own output)
# or `# listen → TEXT` (the log of the background `claudemesh listen`); more
# `→ TEXT` follow in order. The script fails when a step exits non-zero, when a
# text does not appear in order (in a log: within TWO_SESSIONS_WAIT seconds),
# or when an `install` did not register the six hooks and the MCP server.
# It stops every process it started, broker dev and its Postgres included.
#
# Environment: TWO_SESSIONS_WORK (work folder, kept; default: a temporary one,
# removed), TWO_SESSIONS_PORT (first of 9 consecutive free ports; default:
# random, retried when taken), TWO_SESSIONS_README (default README.md),
# TWO_SESSIONS_WAIT (seconds, default 30). `make test` runs it
# (internal/quickstart).
set -uo pipefail
shopt -u patsub_replacement 2>/dev/null || true # `&` in a replacement is literal
cd "$(dirname "$0")/.."
repo=$PWD
readme=${TWO_SESSIONS_README:-$repo/README.md}
wait_s=${TWO_SESSIONS_WAIT:-30}
step_timeout=120 # any one claudemesh process, background ones included

say() { printf 'two-sessions: %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  exit 1
}

# The README assumes a fresh machine: no claudemesh settings from the caller.
unset CLAUDEMESH_MESH CLAUDEMESH_BROKER_URLS CLAUDEMESH_CONFIG_DIR CLAUDEMESH_DEBUG GOBIN

own_work=""
if [ -n "${TWO_SESSIONS_WORK:-}" ]; then
  work=$TWO_SESSIONS_WORK
  mkdir -p "$work" || exit 1
else
  work=$(mktemp -d) || exit 1
  own_work=1
fi
work=$(cd "$work" && pwd)
[[ $work =~ ^[A-Za-z0-9/._-]+$ ]] || fail "work folder $work: keep its path to letters, digits and /._-"
# As root, broker dev runs Postgres as the postgres user, who must enter it.
chmod 755 "$work"
mkdir -p "$work/logs" "$work/bin"
# Every process started from here carries this mark (the test looks for
# leftovers by it).
export TWO_SESSIONS_RUN=$work

dev_pid=""
bg_pids=()
pg_dirs=("$work/data/pg")

# gone PID SECONDS: whether PID ends within SECONDS.
gone() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# stop_postgres stops a Postgres that broker dev left in its data folder
# (only if killed): fast shutdown of the postmaster named in postmaster.pid
# when that process still serves this folder.
stop_postgres() {
  local d pid
  for d in "${pg_dirs[@]}"; do
    [ -f "$d/postmaster.pid" ] || continue
    pid=$(head -n 1 "$d/postmaster.pid")
    if [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$d" ]; then
      say "stopping the Postgres broker dev left running (PID $pid)"
      kill -INT "$pid" 2>/dev/null
      gone "$pid" 30 || kill -KILL "$pid" 2>/dev/null
      return 1
    fi
  done
  return 0
}

# running_jobs prints the job numbers of the steps' background jobs that
# still run (any process of theirs: `tail -f … | claudemesh mcp` too).
running_jobs() {
  jobs -r >"$work/jobs" 2>/dev/null
  sed -n 's/^\[\([0-9]*\)\].*/\1/p' "$work/jobs"
}

# jobs_end SECONDS: whether every background job ends within SECONDS.
jobs_end() {
  local i
  for ((i = 0; i < $1 * 10; i++)); do
    [ -z "$(running_jobs)" ] && return 0
    sleep 0.1
  done
  return 1
}

cleanup() {
  local rc=$? j
  trap - EXIT
  for j in $(running_jobs); do kill -TERM "%$j" 2>/dev/null; done
  if ! jobs_end 10; then
    for j in $(running_jobs); do kill -KILL "%$j" 2>/dev/null; done
  fi
  if [ -n "$dev_pid" ]; then
    kill -TERM "$dev_pid" 2>/dev/null
    if ! gone "$dev_pid" 60; then
      say "FAIL: broker dev did not stop within 60s of SIGTERM; killing it"
      kill -KILL "$dev_pid" 2>/dev/null
      rc=1
    fi
  fi
  if ! stop_postgres; then
    [ -n "$dev_pid" ] && say "FAIL: broker dev exited but left its Postgres running" && rc=1
  fi
  if [ -n "$own_work" ]; then rm -rf "$work"; fi
  for p in "${pg_dirs[@]:1}"; do rm -rf "$(dirname "$p")"; done
  [ $rc = 0 ] && say "PASS"
  exit $rc
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# block NAME prints the lines of the first ```sh fence after the
# <!-- two-sessions:NAME … --> line of the README.
block() {
  awk -v m="<!-- two-sessions:$1" 'index($0, m) == 1 { found = 1; next }
    found && /^```sh$/ { inside = 1; next }
    inside && /^```$/ { exit }
    inside { print }' "$readme"
}
cluster=$(block cluster)
[ "$cluster" = "go run ./cmd/broker dev" ] ||
  fail "the README's cluster block (after <!-- two-sessions:cluster) should be \`go run ./cmd/broker dev\`, it is: ${cluster:-nothing}"
steps=$(block steps)
[ -n "$steps" ] || fail "no steps block (after <!-- two-sessions:steps) in $readme"

# Caches stay where they are when GOPATH moves.
GOMODCACHE=$(go env GOMODCACHE) && GOCACHE=$(go env GOCACHE) || fail "go env"
export GOMODCACHE GOCACHE
say "building broker (what go run ./cmd/broker does) into $work/bin"
go build -o "$work/bin/broker" ./cmd/broker || fail "go build ./cmd/broker"

start_dev() {
  local try base
  for try in 1 2 3 4 5; do
    base=${TWO_SESSIONS_PORT:-}
    if [ -z "$base" ] || [ "$try" -gt 1 ]; then
      base=$((20000 + RANDOM % 11000)) # below Linux's ephemeral ports
    fi
    say "$ go run ./cmd/broker dev   (as: broker dev --data $work/data, ports $base-$((base + 8)))"
    LOG_LEVEL=warn "$work/bin/broker" dev --data "$work/data" --port "$base" --gossip-port $((base + 3)) \
      --lb-port $((base + 6)) --hook-port $((base + 7)) --pg-port $((base + 8)) \
      >"$work/dev.out" 2>"$work/dev.err" </dev/null &
    dev_pid=$!
    disown "$dev_pid" # not one of the steps' jobs: `wait` is not for it
    local i
    for ((i = 0; i < 1200; i++)); do
      grep -q '^Ctrl-C stops the cluster' "$work/dev.out" && break
      kill -0 "$dev_pid" 2>/dev/null || break
      sleep 0.1
    done
    local fb
    fb=$(sed -n 's/.*; using \(.*\) instead)$/\1/p' "$work/dev.out")
    [ -n "$fb" ] && pg_dirs+=("$fb")
    if grep -q '^Ctrl-C stops the cluster' "$work/dev.out"; then
      cat "$work/dev.out"
      return 0
    fi
    if ! kill -0 "$dev_pid" 2>/dev/null && grep -qi 'in use' "$work/dev.err"; then
      say "a port was taken; trying others"
      dev_pid=""
      continue
    fi
    cat "$work/dev.out" "$work/dev.err" >&2
    fail "broker dev did not print its banner within 120s"
  done
  fail "no free ports after 5 tries"
}
start_dev

token=$(sed -n 's/^  claudemesh join \(cm1\.[^ ]*\) --name alice$/\1/p' "$work/dev.out" | head -n 1)
[ -n "$token" ] || fail "the banner has no \`claudemesh join cm1.… --name alice\` line"

export GOPATH=$work/gopath
cm_bin=$GOPATH/bin/claudemesh

# claudemesh is the steps' claudemesh: the one the README's lines installed
# and put first on PATH, each run bounded in time. In a pipeline or a
# background job it replaces its subshell, so `kill %%` reaches it.
claudemesh() {
  local got
  got=$(type -P claudemesh)
  if [ "$got" != "$cm_bin" ]; then
    say "claudemesh is ${got:-not on PATH}, not $cm_bin (what the README's go install and PATH lines should give)"
    return 127
  fi
  if ((BASH_SUBSHELL > 0)); then
    exec timeout --foreground -k 5 "$step_timeout" "$got" "$@"
  fi
  timeout --foreground -k 5 "$step_timeout" "$got" "$@"
}

# find_after CONTENT OFFSET TEXT prints the offset just past the first TEXT
# at or after OFFSET, or fails.
find_after() {
  local rest=${1:$2}
  [[ $rest == *"$3"* ]] || return 1
  local pre=${rest%%"$3"*}
  echo $(($2 + ${#pre} + ${#3}))
}

# expect_output FILE TEXT...: the texts are in FILE, in order.
expect_output() {
  local file=$1 content off=0 t
  shift
  content=$(<"$file")
  for t in "$@"; do
    off=$(find_after "$content" "$off" "$t") || return 1
  done
}

declare -A log_off
# expect_log NAME TEXT...: the texts appear in the log of background job
# NAME, in order, each after what earlier steps found there.
expect_log() {
  local name=$1 log=$work/logs/$1.log t i new
  shift
  for t in "$@"; do
    for ((i = 0; ; i++)); do
      if new=$(find_after "$(<"$log")" "${log_off[$name]:-0}" "$t"); then
        log_off[$name]=$new
        break
      fi
      if ((i >= wait_s * 10)); then
        say "the $name log so far:"
        cat "$log" >&2
        return 1
      fi
      sleep 0.1
    done
  done
}

# check_install HOME: the hooks of the six events and the MCP server run
# the installed claudemesh.
check_install() {
  local home=$1 ev settings=$1/.claude/settings.json claude=$1/.claude.json
  [ -f "$settings" ] || fail "install wrote no $settings"
  for ev in SessionStart UserPromptSubmit PreToolUse PostToolUse Stop SessionEnd; do
    grep -q "\"$ev\"" "$settings" || fail "install registered no $ev hook in $settings"
  done
  [ "$(grep -cF "\"command\": \"$cm_bin hook\"" "$settings")" = 6 ] ||
    fail "$settings does not run \`$cm_bin hook\` for each of the six events: $(cat "$settings")"
  grep -qF "\"command\": \"$cm_bin\"" "$claude" && grep -qF '"mcp"' "$claude" ||
    fail "install registered no \`$cm_bin mcp\` MCP server in $claude"
}

n=0
while IFS= read -r -u 3 line; do
  n=$((n + 1))
  case $line in '' | '#'*) continue ;; esac
  cmd=$line comment=""
  if [[ $line == *'  # '* ]]; then
    cmd=${line%%  \# *}
    comment=${line#*  \# }
  fi
  cmd=${cmd%"${cmd##*[! ]}"}

  # What the step prints, per its comment.
  target="" texts=()
  case $comment in
  '→ '*) target=self rest=${comment#→ } ;;
  *' → '*)
    target=${comment%% → *} rest=${comment#* → }
    [[ $target =~ ^[a-z]+$ ]] || target=""
    ;;
  esac
  if [ -n "$target" ]; then
    while [[ $rest == *' → '* ]]; do
      texts+=("${rest%% → *}")
      rest=${rest#* → }
    done
    texts+=("$rest")
  fi

  if [[ $cmd == *'claudemesh join '* ]]; then
    j=${cmd#*claudemesh join }
    want="  claudemesh join ${j//cm1.…/$token}"
    grep -qxF -- "$want" "$work/dev.out" || fail "step $n: \`${want#  }\` is not one of the banner's join lines"
  fi
  run=${cmd//cm1.…/$token}
  run=${run//\/tmp\/alice/$work/alice}
  run=${run//\/tmp\/bob/$work/bob}
  say "step $n: \$ $cmd"

  if [ "$run" = wait ]; then
    for p in "${bg_pids[@]}"; do
      wait "$p"
      rc=$?
      [ $rc = 0 ] || fail "step $n: a background job (PID $p) exited with status $rc"
    done
    bg_pids=()
  elif [[ $run == *' &' ]]; then
    name=$(sed -n 's/.*claudemesh \([a-z]*\).*/\1/p' <<<"$run")
    [ -n "$name" ] || fail "step $n: a background step must run a claudemesh command"
    log=$work/logs/$name.log
    : >"$log"
    eval "${run% &}"' >>"$log" 2>&1 &'
    bg_pids+=("$!")
  else
    out=$work/logs/step-$n.out
    for ((try = 0; ; try++)); do
      eval "$run" >"$out" 2>&1 </dev/null
      rc=$?
      [ $rc = 0 ] || {
        cat "$out" >&2
        fail "step $n exited with status $rc"
      }
      [ "$target" != self ] && break
      expect_output "$out" "${texts[@]}" && break
      # peers shows what the node it reached has heard so far: ask again.
      if [[ $run == *'claudemesh peers'* ]] && ((try < wait_s * 4)); then
        sleep 0.25
        continue
      fi
      cat "$out" >&2
      fail "step $n did not print, in order: $(printf '«%s» ' "${texts[@]}")"
    done
    cat "$out"
  fi

  if [ -n "$target" ] && [ "$target" != self ]; then
    [ -f "$work/logs/$target.log" ] || fail "step $n: no background \`claudemesh $target\` is running"
    expect_log "$target" "${texts[@]}" ||
      fail "step $n: the background claudemesh $target did not print, in order within ${wait_s}s: $(printf '«%s» ' "${texts[@]}")"
  fi
  if [[ $run == *'claudemesh install'* && $run != *--print* ]]; then
    home=$(sed -n 's/^HOME=\([^ ]*\) .*/\1/p' <<<"$run")
    [ -n "$home" ] || fail "step $n: an install step must set HOME"
    check_install "$home"
  fi
done 3<<<"$steps"

jobs_end 10 || fail "background jobs still run after the last step: $(jobs -r)"
for log in "$work"/logs/*.log; do
  say "what the background claudemesh $(basename "$log" .log) printed:"
  cat "$log"
done
