#!/usr/bin/env bash
# Runs the issue-5 targets with meshbench against a private 3-node cluster
# and stores the JSON, text and plots in docs/bench/<date>-<commit>/.
#
#   docs/bench/run-targets.sh                 # every target
#   docs/bench/run-targets.sh rate conns      # some of them
#   SUFFIX=-run2 docs/bench/run-targets.sh    # a repeat, kept beside the first
#
# The broker is built from the committed HEAD (git archive, so uncommitted
# work in the tree is not measured); meshbench from the working tree. Each
# run waits until the machine is quiet (under a quarter of a core busy for
# 5 s) and is repeated, up to 4 times, while meshbench reports it as
# disturbed by other processes; a disturbed attempt is kept beside the
# result as <name>-disturbed<N>.{json,txt,png}.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

sha=$(git rev-parse --short HEAD)
out=docs/bench/$(date -u +%F)-$sha
suffix=${SUFFIX:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work"
(cd "$work" && go build -o "$work/broker" ./cmd/broker)
go build -o "$work/meshbench" ./cmd/meshbench
mkdir -p "$out"

busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
wait_quiet() {
	for _ in $(seq 1 180); do
		local a b
		a=$(busy_ticks); sleep 5; b=$(busy_ticks)
		(( b - a < 125 )) && return 0
	done
	echo "the machine never became quiet; measuring anyway" >&2
}

run() {
	local name=$1; shift
	local base="$out/$name$suffix"
	for attempt in 1 2 3 4; do
		wait_quiet
		"$work/meshbench" "$@" --spawn 3 --broker-bin "$work/broker" --git-sha "$sha" \
			--save "$base.json" >"$base.txt" 2>&1 || true
		echo "$name (attempt $attempt): $(grep '^host:' "$base.txt" || tail -1 "$base.txt")"
		grep -q '"disturbed' "$base.json" 2>/dev/null || break
		if (( attempt < 4 )); then
			for ext in json txt png; do
				[[ -e $base.$ext ]] && mv "$base.$ext" "$base-disturbed$attempt.$ext"
			done
		fi
	done
}

for target in "${@:-b10 b25 b50 b100 b1000 rate conns}"; do
	for t in $target; do
		case $t in
		b10) run burst-10x100 burst -n 10 -m 100 ;;
		b25) run burst-25x100 burst -n 25 -m 100 ;;
		b50) run burst-50x100 burst -n 50 -m 100 ;;
		b100) run burst-100x100 burst -n 100 -m 100 ;;
		b1000) run burst-100x1000 burst -n 100 -m 1000 --drain-timeout 600s --plot "$out/burst-100x1000$suffix.png" ;;
		rate) run rate-2000x60s rate -n 100 --rate 2000 --duration 60s --plot "$out/rate-2000x60s$suffix.png" ;;
		conns) run conns-10000 conns --nodes 1 --conns 10000 --plot "$out/conns-10000$suffix.png" ;;
		conns100) run conns-10000-meshes-of-100 conns --nodes 1 --conns 10000 --conns-per-mesh 100 ;;
		*) echo "unknown target $t (b10 b25 b50 b100 b1000 rate conns conns100)" >&2; exit 2 ;;
		esac
	done
done
