#!/usr/bin/env python3
"""CPU time per request of a proxy, the upstream and wrk, over the middle 5 s of one
`wrk -t2 -c64 -d8s` run, read from /proc (every thread's utime + stime; requests counted at
wrk's mean rate), with the machine's idle and steal ticks over the same 5 s. Against
compare.sh's held setup (`--hold DIR`):

    . DIR/env
    UP_PID="$(pgrep -P "$(cat "$WORK/nginx-up.pid")")"     # the upstream's worker
    tests/bench/cpu_share.py 19083 dispa "$UP_PID" "$AGENT_PID"
    tests/bench/cpu_share.py 19081 nginx "$UP_PID" $(pgrep -P "$NGX_MASTER")

What "Tenth pass" in docs/BENCHMARKS.md reports.
"""
import glob
import os
import subprocess
import sys
import time


def ticks(pids):
    total = 0
    for pid in pids:
        for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
            try:
                fields = open(stat).read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a thread that ended meanwhile
            total += int(fields[11]) + int(fields[12])
    return total


def machine():
    cpu = open("/proc/stat").readline().split()
    return int(cpu[4]), int(cpu[8])  # idle, steal


def main():
    if len(sys.argv) < 5:
        sys.exit("usage: cpu_share.py PORT LABEL UPSTREAM_PID PROXY_PID...")
    port, label, upstream, pids = sys.argv[1], sys.argv[2], sys.argv[3:4], sys.argv[4:]
    wrk = subprocess.Popen(["wrk", "-t2", "-c64", "-d8s", "--latency",
                            f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    before = ticks(pids), ticks(upstream), ticks([wrk.pid]), *machine()
    start = time.time()
    time.sleep(5)
    after = ticks(pids), ticks(upstream), ticks([wrk.pid]), *machine()
    elapsed = time.time() - start
    out = wrk.communicate()[0].splitlines()
    rps = float(next(l for l in out if "Requests/sec" in l).split()[1])
    p99 = next(l for l in out if l.strip().startswith("99%")).split()[1]
    hz = os.sysconf("SC_CLK_TCK")
    per = lambda i: (after[i] - before[i]) / hz * 1e6 / (rps * elapsed)
    print(f"{label:8} rps {rps:8.0f} p99 {p99:>7}  proxy {per(0):5.1f}  upstream {per(1):5.1f}"
          f"  wrk {per(2):5.1f}  sum {per(0) + per(1) + per(2):5.1f} us/request"
          f"  idle {after[3] - before[3]} steal {after[4] - before[4]} ticks")


if __name__ == "__main__":
    main()
