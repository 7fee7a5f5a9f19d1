#!/usr/bin/env python3
"""The "connections held at once through one agent" figure of bench/run.py (issue 28).

N clients connect through the public port to one echo backend behind one agent; each sends
a unique line and must get exactly that line back while all the others stay open. A
connection is held once it is answered and still open when the figure is read. The figure
is how many of N were held, and what one more held connection costs in resident memory
at either end of the tunnel, measured at the margin: the connections are opened in two
halves, and the RSS growth from the first half held to all held is divided by the
connections the second half added, leaving the fixed costs (the runtime, the tunnels'
buffers) out. It is measured in each process's first repetition only: later ones hold
their connections in memory the allocator kept from the first (it does not give it back)
and would look nearly free, so they report the first one's figure again. A build that
holds none of the second half shows no figure.

    python3 bench/held.py echo PORT   # the echo backend (run.py starts it this way)
"""

import asyncio
import os
import secrets
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

first_figures = {}  # pids -> the memory figures of their first repetition
OPENING = 300  # connections being opened (connect + line sent) at once
OPEN_TIMEOUT = 10.0  # for one connection's connect and send
OPEN_PHASE = 120.0  # for all N to be opened
STRAGGLERS = 20.0  # answers still awaited once all are opened (a tunnel may never answer some)


def start_echo(procs, port):
    """An asyncio echo server on 127.0.0.1:`port` in its own process (its own CPU and
    descriptors, inheriting the raised open-file limit)."""
    procs.start([sys.executable, os.path.abspath(__file__), "echo", str(port)])
    run.wait_port(port)


async def serve_echo(port):
    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


async def hold_many(port, count, on_half, on_held):
    """Opens `count` connections to `port`, each sending a unique line and awaiting its echo,
    in two halves. Calls `on_half(held, opened)`, then `on_held(held, opened)`, once every
    connection of the half (all, the second time) is answered or the stragglers' time is
    up, with all still open; returns what `on_held` returns."""
    opening = asyncio.Semaphore(OPENING)
    writers, answered, done = [], set(), set()  # done: opened or given up on
    salt = secrets.token_hex(6)

    async def one(i):
        line = f"held {i} {salt}\n".encode()
        try:
            async with opening:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), OPEN_TIMEOUT)
                writers.append(writer)
                writer.write(line)
                await asyncio.wait_for(writer.drain(), OPEN_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return
        finally:
            done.add(i)
        try:
            got = await reader.readexactly(len(line))
        except (OSError, asyncio.IncompleteReadError):
            return
        if got != line:
            run.log(f"connection {i} got {got[:60]!r} instead of its own line")
            return
        answered.add(i)
        try:  # held while nothing more comes: an end or stray bytes drop it
            await reader.read(1)
        except OSError:
            pass
        answered.discard(i)

    tasks = []
    try:
        for first, last, then in ((0, count // 2, on_half), (count // 2, count, on_held)):
            tasks += [asyncio.create_task(one(i)) for i in range(first, last)]
            deadline = time.time() + OPEN_PHASE
            while len(done) < last and time.time() < deadline:
                await asyncio.sleep(0.1)
            opened = len(writers)
            if opened < last:
                run.log(f"{opened} of {last} connections opened (the others failed or timed out)")
            deadline = time.time() + STRAGGLERS
            while len(answered) < opened and time.time() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # let lazily started per-connection work settle before reading RSS
            result = then(len(answered), opened)
        return result
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in writers:
            w.close()


def held_connections(setup, echo_port, count):
    """The figures for one setup: held connections of `count`, and the KiB of RSS one more
    held connection costs at the proxy end and the agent end, at the margin (None for the
    direct setup)."""
    port = setup["ports"]["echo.bench"]
    pids = setup["pids"]
    base_conns = run.established(echo_port)
    started = time.time()
    half = {}

    def at_half(held, opened):
        half.update(held=held, rss=[run.rss_kib(p) for p in pids])

    def measure(held, opened):
        after = [run.rss_kib(p) for p in pids]
        more = held - half["held"]
        return held, opened, [(a - b) / more if more > 0 else None for a, b in zip(after, half["rss"])]

    held, opened, per = asyncio.run(hold_many(port, count, at_half, measure))
    per = first_figures.setdefault(tuple(pids), per)
    kib = " and ".join(f"{k:.1f}" if k is not None else "-" for k in per)
    run.log(f"{held:,} of {count:,} connections held ({opened:,} opened) in {time.time() - started:.1f} s"
            + (f"; RSS per held connection, proxy end and agent end: {kib} KiB" if pids else ""))
    try:
        run.wait_until("the held connections to close at the backend",
                       lambda: run.established(echo_port) <= base_conns, 60)
    except RuntimeError as e:
        run.log(f"warning: {e}")
    figures = {f"connections held at once through one agent (of {count:,})": held}
    if pids:
        figures["memory per held connection: proxy / rathole server (KiB)"] = per[0]
        figures["memory per held connection: agent / rathole client (KiB)"] = per[1]
    return figures


def connection_count(quick, wanted):
    """N: `wanted`, or 10,000 (500 in a quick run) as far as the open-file limit lets every
    process hold them: rathole's server and client each hold two descriptors per connection."""
    limit = run.nofile_limit()
    if wanted:
        if limit < 2 * wanted + 1000:
            run.log(f"open-file limit is {limit}: rathole may hold fewer than {wanted} for want of descriptors")
        return wanted
    count = 500 if quick else 10000
    if limit < 2 * count + 1000:
        count = max(100, (limit - 1000) // 2)
        run.log(f"open-file limit is {limit}: holding {count} connections at once (--held N to choose)")
    return count


if __name__ == "__main__":
    if sys.argv[1:2] != ["echo"] or len(sys.argv) != 3:
        sys.exit("usage: held.py echo PORT (the figure itself runs in bench/run.py --only 'held at once')")
    try:
        asyncio.run(serve_echo(int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
