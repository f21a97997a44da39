#!/usr/bin/env bash
# Instructions per proxied small request, by function, counted with callgrind: a Dispa agent
# (or, with --nginx, the nginx proxy configured as in compare.sh, one worker) in front of
# compare.sh's upstream, warmed up 3 s, counters zeroed, then `wrk -t1 -c8` for 10 s.
#
#   tests/bench/profile.sh                          # target/release/dispa
#   tests/bench/profile.sh --bin /tmp/old/dispa     # another build (e.g. to compare two)
#   tests/bench/profile.sh --nginx                  # nginx, counted the same way
#   tests/bench/profile.sh --top 50 --keep /tmp/cg  # more functions; keep the dump
#
# Needs valgrind and what compare.sh needs. For lines, build with
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only and read the kept dump (it was written with
# --dump-line=yes). Counts move by about 1% between runs with how requests batch per wake-up.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DISPA="$ROOT/target/release/dispa"
TOP=30
NGINX=0
KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) DISPA="$2"; shift ;;
    --top) TOP="$2"; shift ;;
    --nginx) NGINX=1 ;;
    --keep) KEEP="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command -v valgrind >/dev/null || { echo "missing: valgrind (apt-get install valgrind)" >&2; exit 1; }

HELD="$(mktemp -d /tmp/dispa-profile.XXXXXX)"
PORT=19283
stop() {
  [ -n "${PROF_PID:-}" ] && kill "$PROF_PID" 2>/dev/null || true
  [ -n "${HOLD_PID:-}" ] && kill "$HOLD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$KEEP" ] || rm -rf "$HELD"
}
trap stop EXIT
trap 'exit 143' INT TERM

# shellcheck source=held.sh
. "$ROOT/tests/bench/held.sh"
start_held "$HELD"

DUMP="${KEEP:-$HELD}/callgrind.out"
mkdir -p "$(dirname "$DUMP")"
CG=(valgrind --tool=callgrind --callgrind-out-file="$DUMP" --compress-strings=no --dump-line=yes)
if [ "$NGINX" = 1 ]; then
  sed -e 's/^worker_processes 2;/worker_processes 1; master_process off; daemon off;/' \
    -e "s/listen 127.0.0.1:$NGX;/listen 127.0.0.1:$PORT;/" -e '/listen .*ssl/d' \
    -e '/ssl_/d' -e "s|^pid .*|pid $HELD/nginx-prof.pid;|" "$WORK/nginx-px.conf" > "$HELD/nginx.conf"
  mkdir -p "$HELD/nginx"
  "${CG[@]}" nginx -c "$HELD/nginx.conf" -p "$HELD/nginx" > "$HELD/prof.log" 2>&1 &
else
  "${CG[@]}" "$DISPA" --log-level warn agent --plane "http://127.0.0.1:$PLANE" --id profile \
    --listen "127.0.0.1:$PORT" --admin 127.0.0.1:19291 --cache-dir "$HELD/agent" \
    --traffic-log off > "$HELD/prof.log" 2>&1 &
fi
PROF_PID=$!
URL="http://127.0.0.1:$PORT/"
# Under valgrind start-up takes a while.
for _ in $(seq 1 600); do curl -sf -o /dev/null "$URL" && break; sleep 0.2; done
curl -sf -o /dev/null "$URL" || { cat "$HELD/prof.log" >&2; exit 1; }
wrk -t1 -c8 -d3s "$URL" > /dev/null
callgrind_control -z "$PROF_PID" > /dev/null 2>&1
requests="$(wrk -t1 -c8 -d10s "$URL" | awk '/requests in/ {print $1}')"
callgrind_control -d "$PROF_PID" > /dev/null 2>&1
kill "$PROF_PID"; wait "$PROF_PID" 2>/dev/null || true
PROF_PID=""
dump="$(ls -t "$DUMP".* | head -1)"
python3 "$ROOT/tests/bench/callgrind_top.py" "$dump" "$requests" "$TOP"
[ -z "$KEEP" ] || echo "dump: $dump"
