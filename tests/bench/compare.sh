#!/usr/bin/env bash
# Dispa against nginx and HAProxy on this machine, same upstream, same load, alternating runs.
#
#   tests/bench/compare.sh                 # every scenario, 3 rounds of 10 s each
#   tests/bench/compare.sh --smoke         # 1 round of 1 s each: checks the harness works
#   tests/bench/compare.sh --rounds 5 --duration 20 --scenarios small,big
#   tests/bench/compare.sh --hold DIR      # set everything up, write DIR/env, wait (profile.sh, ab.sh)
#   tests/bench/compare.sh --bare-peers    # nginx and HAProxy without the request fields below
#   tests/bench/compare.sh --no-pin        # serving threads not pinned to CPUs (see below)
#   tests/bench/compare.sh --raw FILE      # also keep every run's row (scenario, proxy, RPS, p50, p99, steal %)
#
# Equivalent settings: a Dispa agent always sends X-Forwarded-For, -Proto and -Host, an
# X-Request-Id and a traceparent upstream and returns the X-Request-Id to the client, so
# nginx and HAProxy are configured to do the same (the way an operator sets them up in front
# of an application); --bare-peers leaves them out, so the peers do less work than Dispa.
# Each proxy's two serving threads are pinned one to each CPU, as a Dispa agent does by default
# with one thread per CPU (--pin-workers auto): nginx with worker_cpu_affinity auto, HAProxy
# with cpu-map; --no-pin runs all three unpinned.
#
# Scenarios: small (HTTP/1.1, 20-byte response; the upstream is also measured directly once a
# round, the machine's speed that round), big (64 KiB response), h2 (HTTP/2 over TLS,
# h2load), tls-keepalive (HTTP/1.1 over TLS, kept-alive), tls-handshake (a new TLS connection
# per request), hosts (a fresh agent per measurement, with a 10-host or a 10,000-host route
# table), idle (10,000 idle keep-alive connections, agent RSS), plane
# (100, 1,000 and 2,000 agent streams, time to ACK).
#
# Needs nginx, haproxy, wrk, h2load and openssl (Debian: apt-get install nginx-light haproxy
# wrk nghttp2-client openssl), python3, and release builds of dispa, dispactl and plane_load
# (cargo build --release -p dispa-cli -p dispa-ctl -p dispa-tests --bins). Installs nothing.
# Every process it starts listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail

ROUNDS=3
DURATION=10
SMOKE=0
SCENARIOS="small,big,h2,tls-keepalive,tls-handshake,hosts,idle,plane"
HOLD=""
RAW=""
BARE_PEERS=0
PIN=1
CONNS=64
THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; ROUNDS=1; DURATION=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --scenarios) SCENARIOS="$2"; shift ;;
    --hold) HOLD="$2"; shift ;;
    --bare-peers) BARE_PEERS=1 ;;
    --no-pin) PIN=0 ;;
    --raw) RAW="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${DISPA_BIN_DIR:-$ROOT/target/release}"
missing=()
for tool in nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client openssl:openssl python3:python3; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool%%:*} (apt-get install ${tool##*:})")
done
for b in dispa dispactl plane_load; do
  [ -x "$BIN/$b" ] || missing+=("$BIN/$b (cargo build --release -p dispa-cli -p dispa-ctl -p dispa-tests --bins)")
done
if [ ${#missing[@]} -gt 0 ]; then
  printf 'missing:\n' >&2; printf '  %s\n' "${missing[@]}" >&2; exit 1
fi

WORK="$(mktemp -d /tmp/dispa-bench.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx-up.pid" ] && kill "$(cat "$WORK/nginx-up.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx-px.pid" ] && kill "$(cat "$WORK/nginx-px.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM
ulimit -n "$(ulimit -Hn)"

# Fixed high ports; fail early if one is taken.
UP=19080; NGX=19081; HAP=19082; DSP=19083; NGX_TLS=19443; HAP_TLS=19444; DSP_TLS=19445
PLANE=19090; ADMIN=19091
# The hosts scenario's agents (a fresh one per measurement) and the big table's plane.
DSP_HOSTS=19084; PLANE_HOSTS=19092; ADMIN_HOSTS=19093
for p in $UP $NGX $HAP $DSP $NGX_TLS $HAP_TLS $DSP_TLS $PLANE $ADMIN $DSP_HOSTS $PLANE_HOSTS $ADMIN_HOSTS; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "port $p is in use" >&2; exit 1; fi
done

has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
wait_port() { # port
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2; exit 1
}

# --- certificates (one self-signed certificate for every TLS listener) ---
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/haproxy.pem"

# --- the upstream: nginx answering 20 bytes at / and 64 KiB at /big ---
head -c 65536 /dev/zero | tr '\0' 'x' > "$WORK/big"
# nginx workers run as nobody: they must be able to read it.
chmod 755 "$WORK"; chmod 644 "$WORK/big"
mkdir -p "$WORK/up"
cat > "$WORK/nginx-up.conf" <<EOF
worker_processes 1;
pid $WORK/nginx-up.pid;
error_log $WORK/nginx-up.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP;
    location = / { return 200 "01234567890123456789"; }
    location = /big { alias $WORK/big; }
  }
}
EOF
nginx -c "$WORK/nginx-up.conf" -p "$WORK/up" -g 'daemon on;'
wait_port $UP

# --- nginx as the proxy: 2 workers, upstream keep-alive, no access log ---
mkdir -p "$WORK/px"
# The fields Dispa sets (see the top): the client's X-Request-Id or nginx's random one, a
# traceparent whose span id is part of it, the forwarded chain, scheme and host.
NGX_MAPS=""; NGX_FIELDS=""
if [ "$BARE_PEERS" = 0 ]; then
  NGX_MAPS='map $http_x_request_id $rid { "" $request_id; default $http_x_request_id; }
  map $request_id $span_id { "~^(?<s>[0-9a-f]{16})" $s; }'
  NGX_FIELDS='proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Request-Id $rid;
      proxy_set_header traceparent 00-$request_id-$span_id-01;
      add_header X-Request-Id $rid always;'
fi
# Worker i on CPU i for all three (nginx's auto, HAProxy's cpu-map, Dispa's flag), or none.
NGX_AFFINITY=""; HAP_AFFINITY=""; DSP_AFFINITY=(--pin-workers off)
if [ "$PIN" = 1 ]; then
  NGX_AFFINITY="worker_cpu_affinity auto;"
  HAP_AFFINITY="cpu-map auto:1/1-2 0-1"
  DSP_AFFINITY=(--pin-workers on)
fi
cat > "$WORK/nginx-px.conf" <<EOF
worker_processes 2;
$NGX_AFFINITY
pid $WORK/nginx-px.pid;
error_log $WORK/nginx-px.err warn;
worker_rlimit_nofile 65536;
events { worker_connections 9000; }
http {
  access_log off;
  keepalive_requests 1000000;
  # keepalive_requests here is the upstream side's: nginx 1.22 closes an upstream connection
  # after 1,000 requests by default, which Dispa and HAProxy do not.
  upstream app { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; }
  $NGX_MAPS
  server {
    listen 127.0.0.1:$NGX;
    listen 127.0.0.1:$NGX_TLS ssl http2;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    # nginx 1.22 offers only TLS 1.2 by default (1.23.4 added 1.3); the others offer 1.3.
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      $NGX_FIELDS
    }
  }
}
EOF
nginx -c "$WORK/nginx-px.conf" -p "$WORK/px" -g 'daemon on;'
wait_port $NGX

# --- HAProxy: 2 threads, connection reuse, no logging ---
HAP_FIELDS=""
if [ "$BARE_PEERS" = 0 ]; then
  HAP_FIELDS='option forwardfor
  unique-id-format %[uuid(4),regsub(-,,g)]
  http-request set-var(txn.rid) req.hdr(x-request-id)
  http-request set-var(txn.rid) unique-id if !{ var(txn.rid) -m found }
  http-request set-header X-Request-Id %[var(txn.rid)]
  http-request set-header traceparent 00-%[unique-id]-%[unique-id,bytes(0,16)]-01
  http-request set-header X-Forwarded-Proto https if { ssl_fc }
  http-request set-header X-Forwarded-Proto http if !{ ssl_fc }
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-response set-header X-Request-Id %[var(txn.rid)]'
fi
cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 9000
  $HAP_AFFINITY
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAP
  bind 127.0.0.1:$HAP_TLS ssl crt $WORK/haproxy.pem alpn h2,http/1.1
  $HAP_FIELDS
  default_backend app
backend app
  server up 127.0.0.1:$UP
EOF
# Each server in a session of its own, as nginx's daemon mode puts nginx: with the kernel's
# autogroup scheduling (kernel.sched_autogroup_enabled) CPU time is first shared fairly between
# sessions, so a proxy left in this script's session would share one share with wrk, while
# nginx has one of its own (before 2026-11-28 HAProxy and Dispa did share wrk's). Run from a
# script, setsid execs in place: $! is the server's pid.
setsid haproxy -f "$WORK/haproxy.cfg" -q &
PIDS+=($!); HAP_PID=$!
wait_port $HAP

# --- Dispa: a plane and one agent, the same route, applied with dispactl ---
setsid "$BIN/dispa" --log-level warn plane --data-dir "$WORK/plane" --listen 127.0.0.1:$PLANE \
  > "$WORK/plane.log" 2>&1 &
PIDS+=($!); PLANE_PID=$!
wait_port $PLANE
mkdir -p "$WORK/certs"
cp "$WORK/cert.pem" "$WORK/key.pem" "$WORK/certs/"
hosts_config() { # number of extra hosts
  cat <<EOF
[upstreams.app]
endpoints = ["127.0.0.1:$UP"]

[certificates.bench]
hosts = ["bench.test"]
cert_file = "certs/cert.pem"
key_file = "certs/key.pem"
default = true

[[routes]]
name = "all"
upstream = "app"
EOF
  for i in $(seq 1 "$1"); do
    printf '\n[[routes]]\nname = "h%d"\nhosts = ["h%d.example.com", "*.t%d.example.net"]\nupstream = "app"\n' "$i" "$i" "$i"
  done
}
apply_hosts() { # plane-port number-of-hosts
  hosts_config "$2" > "$WORK/routes-$2.toml"
  "$BIN/dispactl" --plane "http://127.0.0.1:$1" apply -f "$WORK/routes-$2.toml" >/dev/null
}
apply_hosts $PLANE 10
start_agent() { # id plane-port listen-port admin-port [more agent arguments]; sets STARTED_PID
  local id="$1" plane="$2" port="$3" admin="$4"; shift 4
  setsid "$BIN/dispa" --log-level warn agent --plane "http://127.0.0.1:$plane" --id "$id" \
    --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" "$@" \
    --cache-dir "$WORK/agent-$id" --traffic-log off "${DSP_AFFINITY[@]}" >> "$WORK/agent-$id.log" 2>&1 &
  PIDS+=($!); STARTED_PID=$!
  wait_port "$port"
  # Ready once it serves a snapshot from its plane.
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && return 0; sleep 0.05
  done
  echo "agent $id is not ready; its log:" >&2; cat "$WORK/agent-$id.log" >&2; exit 1
}
# Stops a server started above and forgets its number, so that the cleanup does not signal
# whatever process gets that number later. Fails if it had already exited.
stop_started() { # pid
  local p rc=0 keep=()
  kill "$1" 2>/dev/null || rc=1
  wait "$1" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  return $rc
}
start_main_agent() {
  start_agent bench $PLANE $DSP $ADMIN --listen-tls "127.0.0.1:$DSP_TLS"
  AGENT_PID=$STARTED_PID
}
start_main_agent

# The hosts scenario starts a fresh agent for every measurement, from the main plane (the
# 10-host table) or from a plane of its own (the 10,000-host table), warms it for one
# unmeasured second (the first requests fault in the table and fill the upstream pool),
# measures it and stops it. An agent kept per table carries the spread between two processes
# for the whole run (up to 6% a round, 2026-12-06); one agent given the tables in turn
# carries what each swap leaves in its heap (the big table 4-14% slower in every round of
# one run, 2026-12-07). A new process each time leaves neither; the rounds average the rest.
HOSTS_ON=""
RSS_HOSTS=0
# A host from the middle of the n-host table, so lookups hit the big map.
hosts_host() { echo "h$(($1 / 2)).example.com"; }
measure_table() { # n
  local plane=$PLANE pid rss
  [ "$1" = 10000 ] && plane=$PLANE_HOSTS
  # No cached snapshot: every agent gets its table from the plane, as the first one does.
  rm -rf "$WORK/agent-hosts-$1"
  start_agent "hosts-$1" "$plane" $DSP_HOSTS $ADMIN_HOSTS
  pid=$STARTED_PID
  wrk -t$THREADS -c$CONNS -d1s -H "Host: $(hosts_host "$1")" "http://127.0.0.1:$DSP_HOSTS/" >/dev/null 2>&1
  run_wrk hosts "dispa-$1-hosts" "http://127.0.0.1:$DSP_HOSTS/" -H "Host: $(hosts_host "$1")"
  if [ "$1" = 10000 ]; then
    rss="$(peak_rss "$pid")"; [ "$rss" -gt "$RSS_HOSTS" ] && RSS_HOSTS=$rss
  fi
  stop_started "$pid" || { echo "the $1-host agent stopped early; its log:" >&2; cat "$WORK/agent-hosts-$1.log" >&2; exit 1; }
}
if has hosts && [ -z "$HOLD" ]; then
  setsid "$BIN/dispa" --log-level warn plane --data-dir "$WORK/plane-hosts" --listen 127.0.0.1:$PLANE_HOSTS \
    > "$WORK/plane-hosts.log" 2>&1 &
  PIDS+=($!)
  wait_port $PLANE_HOSTS
  apply_hosts $PLANE_HOSTS 10000
  HOSTS_ON=1
fi

if [ -n "$HOLD" ]; then
  # For the other scripts: where everything listens, then wait to be stopped (INT or TERM).
  mkdir -p "$HOLD"
  printf 'WORK=%s\nUP=%s\nPLANE=%s\nNGX=%s\nAGENT_PID=%s\nNGX_MASTER=%s\n' \
    "$WORK" "$UP" "$PLANE" "$NGX" "$AGENT_PID" "$(cat "$WORK/nginx-px.pid")" > "$HOLD/env.tmp"
  mv "$HOLD/env.tmp" "$HOLD/env"
  echo "held: upstream :$UP, plane :$PLANE, agent :$DSP, nginx :$NGX, HAProxy :$HAP"
  sleep infinity &
  PIDS+=($!)
  wait $!
fi

# --- measuring ---
NGX_MASTER="$(cat "$WORK/nginx-px.pid")"
# Peak RSS (KiB) of a process and its children (nginx workers): VmHWM, the high-water mark.
peak_rss() { # pid
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
to_ms() { # "1.23ms" | "456.00us" | "1.2s" -> milliseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
# The machine is a VM: the hypervisor takes 0-10% of its CPU ("steal" in /proc/stat) in
# bursts, which moves a run's rate and tail more than the gaps being measured. Each run
# records the share it lost, so rounds can be read with it.
cpu_times() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9; exit }' /proc/stat; }
steal_since() { # "total steal" from cpu_times -> percent of the CPU time since taken by steal
  local now; now="$(cpu_times)"
  awk -v a="$1" -v b="$now" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; printf "%.1f", (t > 0 ? 100 * (y[2] - x[2]) / t : 0) }'
}
run_wrk() { # scenario name url [extra wrk args...]
  local scenario="$1" name="$2" url="$3"; shift 3
  local out rps p50 p99 before
  before="$(cpu_times)"
  out="$(wrk -t$THREADS -c$CONNS -d"${DURATION}s" --latency "$@" "$url" 2>&1)"
  rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
  p50="$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
  p99="$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
  if grep -q "Non-2xx" <<<"$out"; then
    echo "$name $scenario: errors: $(grep Non-2xx <<<"$out"); a sample: HTTP $(curl -sk -o /dev/null -w "%{http_code}" "$url" 2>&1)" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$name" "${rps:-0}" "${p50:-0}" "${p99:-0}" "$(steal_since "$before")" >> "$RESULTS"
}
run_h2load() { # scenario name url
  local out rps p50 p99 before
  before="$(cpu_times)"
  out="$(h2load -D "$DURATION" -c $CONNS -m 10 -t $THREADS "$3" 2>&1)"
  rps="$(awk '/^finished in/ {gsub(",", "", $4); print $4}' <<<"$out")"
  # h2load prints mean/sd per request; it has no percentiles: p50 column = mean, p99 = max.
  p50="$(to_ms "$(awk '/^time for request:/ {print $6}' <<<"$out")")"
  p99="$(to_ms "$(awk '/^time for request:/ {print $5}' <<<"$out")")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "${rps:-0}" "${p50:-0}" "${p99:-0}" "$(steal_since "$before")" >> "$RESULTS"
}
ALL_TARGETS="nginx haproxy dispa"
target_port() { case "$1" in nginx) echo $NGX ;; haproxy) echo $HAP ;; dispa) echo $DSP ;; esac; }
target_tls() { case "$1" in nginx) echo $NGX_TLS ;; haproxy) echo $HAP_TLS ;; dispa) echo $DSP_TLS ;; esac; }

# A new TLS connection per request: wrk with Connection: close.
for round in $(seq 1 "$ROUNDS"); do
  # The upstream without a proxy, once a round: how fast the machine is in that round (it
  # drifts by 2-3x over hours here), and what share of it each proxy keeps.
  has small && run_wrk small upstream-direct "http://127.0.0.1:$UP/"
  for t in $ALL_TARGETS; do
    has small && run_wrk small "$t" "http://127.0.0.1:$(target_port "$t")/"
    has big && run_wrk big "$t" "http://127.0.0.1:$(target_port "$t")/big"
    has tls-keepalive && run_wrk tls-keepalive "$t" "https://127.0.0.1:$(target_tls "$t")/"
    has tls-handshake && run_wrk tls-handshake "$t" "https://127.0.0.1:$(target_tls "$t")/" -H "Connection: close"
    has h2 && run_h2load h2 "$t" "https://127.0.0.1:$(target_tls "$t")/"
  done
  if [ -n "$HOSTS_ON" ]; then
    # Alternate which table goes first, so drift within a round does not favour one.
    order="10 10000"; [ $((round % 2)) -eq 0 ] && order="10000 10"
    for n in $order; do measure_table "$n"; done
  fi
done

[ -n "$RAW" ] && cp "$RESULTS" "$RAW"
RSS_NGX="$(peak_rss "$NGX_MASTER")"; RSS_HAP="$(peak_rss "$HAP_PID")"; RSS_DSP="$(peak_rss "$AGENT_PID")"

echo
echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $ROUNDS round(s) of ${DURATION}s, wrk -t$THREADS -c$CONNS"
echo "# nginx $(nginx -v 2>&1 | sed 's/.*\///'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), dispa $("$BIN/dispa" --version | awk '{print $2}')"
if [ "$BARE_PEERS" = 1 ]; then
  echo "# --bare-peers: nginx and HAProxy do not set the request id, traceparent and X-Forwarded-* fields Dispa sets"
else
  echo "# all three set X-Request-Id (request and response), traceparent and X-Forwarded-For/-Proto/-Host"
fi
if [ "$PIN" = 1 ]; then
  echo "# serving threads pinned, one CPU each (nginx worker_cpu_affinity auto, HAProxy cpu-map, dispa --pin-workers on)"
else
  echo "# --no-pin: no serving thread pinned to a CPU (dispa --pin-workers off)"
fi
python3 - "$RESULTS" "$RSS_NGX" "$RSS_HAP" "$RSS_DSP" "$RSS_HOSTS" <<'PY'
import sys, statistics, collections, math
STEAL_QUIET = 2.0
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rss = {"nginx": int(sys.argv[2]), "haproxy": int(sys.argv[3]), "dispa": int(sys.argv[4]),
       # The highest peak of the agents with the big table; none shown for the 10-host ones.
       "dispa-10000-hosts": int(sys.argv[5]), "dispa-10-hosts": 0}
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
def pooled(ratios):
    """Geometric mean of per-round ratios and its 95% interval (Student's t over the logs):
    how far a run pins a ratio down when single rounds scatter by tens of percent."""
    logs = [math.log(r) for r in ratios if r > 0]
    if len(logs) < 2:
        return None
    df = len(logs) - 1
    # Past the table, the value at the nearest tabled df below: a little wide, never narrow.
    t = T975[df - 1] if df <= len(T975) else (2.042 if df < 40 else 2.021 if df < 60 else 2.000 if df < 120 else 1.980)
    m, half = statistics.mean(logs), t * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(m):.3f} (95% interval {math.exp(m - half):.3f}-{math.exp(m + half):.3f})"
by = collections.defaultdict(list)
for scenario, name, rps, p50, p99, steal in rows:
    by[(scenario, name)].append((float(rps), float(p50), float(p99), float(steal)))
print(f"{'scenario':<14} {'proxy':<18} {'RPS (median)':>13} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS MiB':>13} {'steal %':>8}")
med = {}
for (scenario, name), runs in by.items():
    r, p50, p99, steal = (statistics.median(x[i] for x in runs) for i in range(4))
    med[(scenario, name)] = r
    mem = rss.get(name, rss.get(name.split("-")[0], 0)) / 1024
    shown = f"{mem:.1f}" if mem else "-"
    print(f"{scenario:<14} {name:<18} {r:>13,.0f} {p50:>8.2f} {p99:>8.2f} {shown:>13} {steal:>8.1f}")
print()
for scenario in sorted({s for s, _ in by}):
    d = med.get((scenario, "dispa"))
    if d is None:
        continue
    parts = [f"{d / med[(scenario, peer)]:.2f}x {peer}" for peer in ("nginx", "haproxy") if med.get((scenario, peer))]
    # Rounds run the proxies back to back, so each round's ratio is free of the machine's
    # drift between rounds: how often Dispa's RPS was at least each peer's and its p99 at most
    # (the issue's targets).
    rounds, steady, pooled_lines = [], [], []
    for peer in ("nginx", "haproxy"):
        pairs = list(zip(by[(scenario, "dispa")], by.get((scenario, peer), [])))
        if pairs:
            rate = pooled([x[0] / y[0] for x, y in pairs if y[0]])
            tail = pooled([x[2] / y[2] for x, y in pairs if y[2]])
            if rate and tail:
                pooled_lines.append(f"  vs {peer}, geometric mean of {len(pairs)} rounds: RPS {rate}, p99 {tail}")
            ahead = sum(x[0] >= y[0] for x, y in pairs)
            lower = sum(x[2] <= y[2] for x, y in pairs)
            paired = statistics.median(x[0] / y[0] for x, y in pairs if y[0])
            rounds.append(f"vs {peer}: {paired:.2f}x by the median round, RPS >= in {ahead}/{len(pairs)}, p99 <= in {lower}/{len(pairs)}")
            # The same, counting only rounds in which neither run lost more than STEAL_QUIET
            # percent of the CPU to the hypervisor.
            quiet = [(x, y) for x, y in pairs if max(x[3], y[3]) <= STEAL_QUIET]
            if quiet:
                q_ahead = sum(x[0] >= y[0] for x, y in quiet)
                q_lower = sum(x[2] <= y[2] for x, y in quiet)
                q_paired = statistics.median(x[0] / y[0] for x, y in quiet if y[0])
                steady.append(f"vs {peer}: {q_paired:.2f}x, RPS >= in {q_ahead}/{len(quiet)}, p99 <= in {q_lower}/{len(quiet)}")
    print(f"dispa / peers, {scenario}: {', '.join(parts)} ({'; '.join(rounds)})")
    for line in pooled_lines:
        print(line)
    if steady:
        print(f"  rounds with steal <= {STEAL_QUIET:g}% in both runs: {'; '.join(steady)}")
direct = by.get(("small", "upstream-direct"))
if direct:
    shares = []
    for name in ("nginx", "haproxy", "dispa"):
        pairs = [x[0] / d[0] for d, x in zip(direct, by.get(("small", name), [])) if d[0]]
        if pairs:
            shares.append(f"{name} {statistics.median(pairs):.2f}")
    print(f"small, share of the upstream's direct rate (median round): {', '.join(shares)}")
a, b = med.get(("hosts", "dispa-10-hosts")), med.get(("hosts", "dispa-10000-hosts"))
if a and b:
    print(f"dispa 10,000 hosts / 10 hosts: {b / a:.3f} (medians)")
    # Each round measures a fresh agent with each table back to back: the ratio within a
    # round is not moved by the machine drifting between rounds, but a single round still
    # scatters by tens of percent, so it takes some 40 rounds to pin the cost within a few.
    pairs = [y[0] / x[0] for x, y in zip(by[("hosts", "dispa-10-hosts")], by[("hosts", "dispa-10000-hosts")]) if x[0]]
    print(f"dispa 10,000 hosts / 10 hosts per round: {', '.join(f'{r:.3f}' for r in pairs)}; median {statistics.median(pairs):.3f}")
    if (g := pooled(pairs)):
        print(f"dispa 10,000 hosts / 10 hosts, geometric mean of {len(pairs)} rounds: {g}")
PY

if has idle; then
  n=10000; [ "$SMOKE" = 1 ] && n=500
  # A fresh agent: the load before would otherwise count in its RSS.
  stop_started "$AGENT_PID"
  start_main_agent
  python3 "$ROOT/tests/bench/idle_conns.py" 127.0.0.1 $DSP "$n" "$AGENT_PID"
fi
if has plane; then
  # A fresh plane per fleet size, so each size's RSS is its own.
  fleets="100 1000 2000" versions=5; [ "$SMOKE" = 1 ] && fleets=50 versions=2
  for agents in $fleets; do
    "$BIN/plane_load" --dispa "$BIN/dispa" --agents "$agents" --versions "$versions"
  done
fi
