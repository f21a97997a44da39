#!/usr/bin/env bash
# How a proxy's threads take turns on the CPUs under load (docs/BENCHMARKS.md, twelfth pass).
#
#   tests/bench/turns.sh [--seconds S] URL PID...
#
# Loads URL with `wrk -t2 -c64` for S seconds (default 5) and prints, for every thread of each
# PID that ran meanwhile: its voluntary and involuntary context switches (/proc/TID/status),
# the time it ran and the time it waited to run (/proc/TID/schedstat), and the mean length of
# one turn on a CPU; then the whole machine's context switches per request (/proc/stat).
# Set up the proxies with `compare.sh --hold DIR` (nginx's workers are the children of
# DIR/env's NGX_MASTER, the agent is AGENT_PID).
set -euo pipefail

SECONDS_=5
[ "${1:-}" = "--seconds" ] && { SECONDS_="$2"; shift 2; }
[ $# -ge 2 ] || { echo "usage: turns.sh [--seconds S] URL PID..." >&2; exit 2; }
URL="$1"; shift
command -v wrk >/dev/null || { echo "turns.sh needs wrk (Debian: apt-get install wrk)" >&2; exit 2; }

# One line per thread: tid comm voluntary involuntary run_ns wait_ns turns
sample() {
  local pid task tid
  for pid in "$@"; do
    for task in /proc/"$pid"/task/*; do
      tid="${task##*/}"
      {
        printf '%s %s ' "$tid" "$(tr ' ' '_' < "$task/comm")"
        awk '/^voluntary_ctxt_switches/ {v = $2} /^nonvoluntary_ctxt_switches/ {n = $2}
             END {printf "%d %d ", v, n}' "$task/status"
        cat "$task/schedstat"
      } 2>/dev/null || true
    done
  done
}
ctxt() { awk '$1 == "ctxt" {print $2}' /proc/stat; }

before="$(sample "$@")"; c0="$(ctxt)"
out="$(wrk -t2 -c64 -d"${SECONDS_}s" --latency "$URL")"
after="$(sample "$@")"; c1="$(ctxt)"

rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
# wrk exits 0 when no connection succeeds; there is then nothing to divide by.
awk -v r="${rps:-0}" 'BEGIN {exit !(r > 0)}' || { echo "no requests served at $URL:" >&2; echo "$out" >&2; exit 1; }
p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
echo "$URL: ${rps} requests/s, p99 ${p99}"
printf '%-8s %-18s %11s %13s %9s %9s %9s %8s\n' tid thread voluntary involuntary "run ms" \
  "wait ms" turns "µs/turn"
join <(sort <<<"$before") <(sort <<<"$after") | awk '{
  v = $9 - $3; n = $10 - $4; run = ($11 - $5) / 1e6; wait = ($12 - $6) / 1e6; turns = $13 - $7
  if (turns > 0)
    printf "%-8s %-18s %11d %13d %9.0f %9.0f %9d %8.1f\n", $1, $2, v, n, run, wait, turns, run * 1000 / turns
}'
awk -v c=$((c1 - c0)) -v rps="$rps" -v s="$SECONDS_" \
  'BEGIN {printf "machine: %.3f context switches per request\n", c / (rps * s)}'
