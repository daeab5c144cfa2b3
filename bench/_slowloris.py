"""A half-open-connection client for the node daemon's limits test and benchmark (not a benchmark
itself).

    python bench/_slowloris.py SOCKET_OR_HOST:PORT CONNECTIONS DURATION_S

Keeps CONNECTIONS connections open for DURATION_S seconds, each having sent the start of a
request line and then one more byte every second, never finishing it; a connection the server
closes is opened again a second later. Prints `ready` once every connection has been opened
once, and at the end one JSON line: how many were opened, how many the server closed, the most
held at once. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys
import time

TRICKLE_S = 1.0
REOPEN_S = 1.0


class Stats:
    def __init__(self) -> None:
        self.opened = 0
        self.closed_by_server = 0
        self.failed = 0
        self.open_now = 0
        self.most_open = 0


async def _connect(target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if target.startswith("/"):
        return await asyncio.open_unix_connection(target)
    host, _, port = target.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def hold(
    target: str, stats: Stats, until: float, opened: asyncio.Event, stop: asyncio.Event
) -> None:
    first = True
    while time.monotonic() < until and not stop.is_set():
        try:
            reader, writer = await _connect(target)
        except OSError:
            stats.failed += 1
            if first:
                first = False
                opened.set()
            await asyncio.sleep(REOPEN_S)
            continue
        stats.opened += 1
        stats.open_now += 1
        stats.most_open = max(stats.most_open, stats.open_now)
        if first:
            first = False
            opened.set()
        try:
            writer.write(b"GET /v1/gp")
            while time.monotonic() < until and not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(1024), TRICKLE_S)
                except TimeoutError:
                    writer.write(b"u")  # one more byte of a request line that never ends
                    await writer.drain()
                    continue
                if not data:
                    stats.closed_by_server += 1
                    break
        except OSError:
            stats.closed_by_server += 1
        finally:
            stats.open_now -= 1
            writer.close()
        await asyncio.sleep(REOPEN_S)


async def main(target: str, connections: int, duration_s: float) -> Stats:
    """Until DURATION_S has passed, or SIGTERM (then the counts are printed all the same)."""
    stats = Stats()
    until = time.monotonic() + duration_s
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    events = [asyncio.Event() for _ in range(connections)]
    tasks = []
    for event in events:
        tasks.append(asyncio.create_task(hold(target, stats, until, event, stop)))
        await asyncio.sleep(0)  # let it connect: a burst of 1,000 connects overruns the backlog
    for event in events:
        await event.wait()
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    return stats


if __name__ == "__main__":
    target, n, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 64)), hard))
    result = asyncio.run(main(target, n, duration))
    print(json.dumps(vars(result)), flush=True)
