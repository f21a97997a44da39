#!/usr/bin/env bash
# Two agent builds side by side in front of compare.sh's upstream and plane, alternating
# fresh agents A B A B, each warmed up 1 s then loaded with `wrk -t2 -c64` for 5 s; prints
# each run's RPS, p99 and the agent's user and kernel CPU per request (from /proc), then the
# medians and how often B was ahead. What "What was tried" in docs/BENCHMARKS.md reports.
#
#   tests/bench/ab.sh OLD/dispa target/release/dispa            # 10 rounds, plain HTTP/1.1
#   tests/bench/ab.sh --rounds 6 --tls OLD/dispa NEW/dispa      # over TLS
#   tests/bench/ab.sh --h2 OLD/dispa NEW/dispa                  # HTTP/2 over TLS, as compare.sh's
#       h2 scenario (h2load -c64 -m10); h2load has no percentiles: p99 is its slowest request
#
# The machine drifts by more than most single changes: use 10 rounds or more, and callgrind
# (profile.sh) for instruction counts.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
ROUNDS=10
TLS=0
H2=0
BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift ;;
    --tls) TLS=1 ;;
    --h2) TLS=1; H2=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) BINS+=("$1") ;;
  esac
  shift
done
[ ${#BINS[@]} -eq 2 ] || { echo "usage: ab.sh [--rounds N] [--tls | --h2] BIN_A BIN_B" >&2; exit 2; }

HELD="$(mktemp -d /tmp/dispa-ab.XXXXXX)"
stop() {
  [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null || true
  [ -n "${HOLD_PID:-}" ] && kill "$HOLD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$HELD"
}
trap stop EXIT
trap 'exit 143' INT TERM

# shellcheck source=held.sh
. "$ROOT/tests/bench/held.sh"
start_held "$HELD"

PORT=19183; TLS_PORT=19545; ADMIN=19191
URL="http://127.0.0.1:$PORT/"; EXTRA=()
if [ "$TLS" = 1 ]; then URL="https://127.0.0.1:$TLS_PORT/"; EXTRA=(--listen-tls "127.0.0.1:$TLS_PORT"); fi
HZ="$(getconf CLK_TCK)"
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# CPU ticks of each serving thread, to see how the connections were spread over them.
thread_ticks() { for t in /proc/"$1"/task/*; do grep -qs '^dispa-proxy' "$t/comm" && awk '{print $14 + $15}' "$t/stat" 2>/dev/null; done || true; }
load() { # seconds: wrk, or h2load for --h2 (whose "requests:" line counts the done ones)
  if [ "$H2" = 1 ]; then h2load -D "$1" -c 64 -m 10 -t 2 "$URL" 2>&1; else wrk -t2 -c64 -d"$1"s --latency "$URL"; fi
}
run() { # label binary
  rm -rf "$HELD/agent"
  # A session of its own, as compare.sh starts every server (autogroup scheduling).
  setsid "$2" --log-level warn agent --plane "http://127.0.0.1:$PLANE" --id "ab-$1" \
    --listen "127.0.0.1:$PORT" "${EXTRA[@]}" --admin "127.0.0.1:$ADMIN" \
    --cache-dir "$HELD/agent" --traffic-log off > "$HELD/agent.log" 2>&1 &
  AGENT=$!
  for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break; sleep 0.05; done
  curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { cat "$HELD/agent.log" >&2; exit 1; }
  load 1 > /dev/null
  local u0 s0 u1 s1 out t0 t1 split
  read -r u0 s0 < <(ticks "$AGENT")
  t0="$(thread_ticks "$AGENT")"
  out="$(load 5)"
  read -r u1 s1 < <(ticks "$AGENT")
  t1="$(thread_ticks "$AGENT")"
  split="$(paste -d' ' <(echo "$t0") <(echo "$t1") | awk '{printf "%s%d", (NR > 1 ? "/" : ""), $2 - $1}')"
  kill "$AGENT"; wait "$AGENT" 2>/dev/null || true
  AGENT=""
  awk -v label="$1" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v hz="$HZ" -v spread="$split" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /[0-9]s$/) return v * 1000; return v + 0 }
    /requests in/ { n = $1 } /^Requests\/sec/ { rps = $2 }
    /^requests: / { n = $6 } /^finished in/ { rps = $4 + 0 }
    $1 == "time" && $3 == "request:" { p99 = ms($5) }
    $1 == "99%" { p99 = ms($2) }
    END { printf "%s rps=%.0f p99_ms=%.2f user_us=%.2f sys_us=%.2f threads=%s\n", label, rps, p99, du / hz / n * 1e6, ds / hz / n * 1e6, spread }' <<<"$out"
}
for r in $(seq 1 "$ROUNDS"); do
  run A "${BINS[0]}" | tee -a "$HELD/results"
  run B "${BINS[1]}" | tee -a "$HELD/results"
done
python3 - "$HELD/results" <<'PYEOF'
import statistics, sys
runs = {"A": [], "B": []}
for line in open(sys.argv[1]):
    label, *fields = line.split()
    kv = dict(f.split("=") for f in fields)
    runs[label].append((float(kv["rps"]), float(kv["user_us"]), float(kv["sys_us"]), float(kv["p99_ms"])))
for label, rs in runs.items():
    med = [statistics.median(r[i] for r in rs) for i in range(4)]
    print(f"{label} medians: {med[0]:,.0f} RPS, p99 {med[3]:.2f} ms, user {med[1]:.2f} us, kernel {med[2]:.2f} us per request")
pairs = list(zip(runs["A"], runs["B"]))
print(f"B ahead in RPS in {sum(b[0] > a[0] for a, b in pairs)} of {len(pairs)} rounds, "
      f"lower p99 in {sum(b[3] < a[3] for a, b in pairs)}, lower user time in {sum(b[1] < a[1] for a, b in pairs)}")
PYEOF
