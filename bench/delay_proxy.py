#!/usr/bin/env python3
"""TCP forwarder that adds a fixed one-way delay (and optionally a rate cap) in each
direction. Used by compare.sh's slow-src section, because the kernel here may lack
sch_netem. Runs inside the benchmark's own network namespace, on 127.0.0.1 only.

  delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS [RATE_MBIT]

Data is pipelined: a chunk read at time t is written at t + delay, so the link has
the given latency without the proxy itself limiting throughput (RTT = 2 * DELAY_MS).
"""
import asyncio
import sys
import time

HOST = "127.0.0.1"


async def pump(reader, writer, delay, rate_bps):
    q = asyncio.Queue()

    async def rx():
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    break
                q.put_nowait((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        q.put_nowait((time.monotonic() + delay, None))

    async def tx():
        free_at = 0.0
        try:
            while True:
                due, data = await q.get()
                if rate_bps and data:
                    free_at = max(free_at, due) + len(data) * 8.0 / rate_bps
                    due = free_at
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    await asyncio.gather(rx(), tx())


async def handle(creader, cwriter, target, delay, rate_bps):
    try:
        sreader, swriter = await asyncio.open_connection(HOST, target)
    except OSError:
        cwriter.close()
        return
    await asyncio.gather(pump(creader, swriter, delay, rate_bps),
                         pump(sreader, cwriter, delay, rate_bps))
    for w in (cwriter, swriter):
        try:
            w.close()
        except OSError:
            pass


async def main():
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    delay = float(sys.argv[3]) / 1000.0
    rate_bps = float(sys.argv[4]) * 1e6 if len(sys.argv) > 4 and sys.argv[4] else 0.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, target, delay, rate_bps), HOST, listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
