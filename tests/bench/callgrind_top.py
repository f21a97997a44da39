#!/usr/bin/env python3
"""Instructions per request from a callgrind dump, by function (exclusive cost).

    callgrind_top.py DUMP REQUESTS [TOP]

Reads the dump itself: callgrind_annotate 3.19 puts everything under `clone` for dumps taken
with `callgrind_control -d` from the LTO build. Needs the dump written with
`--compress-strings=no`. Also prints who reads the clock (std Instant/SystemTime) and calls memcpy.
"""
import collections
import sys


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    exclusive = collections.Counter()
    calls_to = collections.defaultdict(collections.Counter)  # callee -> caller -> calls
    fn = cfn = None
    pending_calls = None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                fn = line[3:]
            elif line.startswith("cfn="):
                cfn = line[4:]
            elif line.startswith("calls="):
                pending_calls = int(line[6:].split()[0])
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                if len(parts) < 2:
                    continue
                if pending_calls is not None:
                    # The cost line after `calls=` is the callee's inclusive cost: not ours.
                    calls_to[cfn][fn] += pending_calls
                    pending_calls = None
                else:
                    exclusive[fn] += int(parts[1])
    total = sum(exclusive.values())
    print(f"instructions per request: {total / requests:,.0f} ({requests} requests)")
    for name, cost in exclusive.most_common(top):
        print(f"{cost / requests:9,.0f} {100 * cost / total:5.1f}%  {name[:140]}")
    for callee in ("Timespec>::now", "__memcpy"):
        callers = collections.Counter()
        for name, by in calls_to.items():
            if name and callee in name:
                callers.update(by)
        n = sum(callers.values())
        print(f"\n{callee}: {n / requests:.1f} calls per request; most from:")
        for name, c in callers.most_common(5):
            print(f"  {c / requests:5.1f}  {name[:130]}")


if __name__ == "__main__":
    main()
