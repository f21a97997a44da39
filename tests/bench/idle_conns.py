#!/usr/bin/env python3
"""Hold N idle keep-alive connections to an agent and report its RSS.

    idle_conns.py HOST PORT N AGENT_PID

Each connection sends one request (keep-alive), reads the answer, then stays open and idle.
Prints the agent's RSS before and with all N open, and checks a new client is still served.
"""
import asyncio
import resource
import sys


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def one(host, port, opened):
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await r.readexactly(length)
    opened.append(w)


async def main():
    host, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
    before = rss_kib(pid)
    opened = []
    sem = asyncio.Semaphore(200)

    async def guarded():
        async with sem:
            await one(host, port, opened)

    await asyncio.gather(*(guarded() for _ in range(n)))
    await asyncio.sleep(1)
    held = rss_kib(pid)
    # Still serving while they are held.
    probe = []
    await one(host, port, probe)
    print(f"idle connections: {len(opened)} held open; agent RSS {before / 1024:.1f} MiB before, "
          f"{held / 1024:.1f} MiB with them ({(held - before) / max(len(opened), 1):.1f} KiB each); "
          f"a new client was served")
    for w in opened + probe:
        w.close()


asyncio.run(main())
