#!/usr/bin/env python3
"""The proxy's memory under stalled readers: N clients each ask for a large download through
the proxy and never read it. Each stream fills what the proxy lets it hold (its window);
the figure is the proxy's peak RSS once every stream is full, beside its RSS before the
clients came.

    python3 bench/stalled.py                          # 2,000 readers, this build
    python3 bench/stalled.py --baseline DIR           # also the binaries in DIR, side by side
    python3 bench/stalled.py --extra 'send_timeout = "600s"'   # a config line for this build's run

Two agents serve the name (one tunnel carries at most 1,023 streams). Everything runs on
127.0.0.1; the nginx, ports and helpers are bench/run.py's. Prints a Markdown table for
docs/benchmarks.md.
"""

import argparse
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def peak_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1))


def start(procs, bindir, work, nginx_port, transport, label, extra_line):
    """Proxy with a fixed listener for web.bench, served by two agents. Returns (port, pid)."""
    work = f"{work}/{label}"
    os.makedirs(work)
    env = dict(os.environ, RUST_LOG="warn")
    agents, web = run.free_port(), run.free_port()
    state = f"{work}/proxy"
    extra = f"{extra_line}\n" if extra_line else ""
    with open(f"{work}/proxy.toml", "w") as f:
        f.write(f'agents = "127.0.0.1:{agents}"\nmax_connections_per_source = 100000\nsend_timeout = "600s"\n{extra}'
                f'[[listener]]\nlisten = "127.0.0.1:{web}"\nto = "web.bench"\n')
    subprocess.run([f"{bindir}/revproxy", "ca", "init", "--state", state], check=True, env=env, capture_output=True)
    proxy = procs.start([f"{bindir}/revproxy", "serve", "--state", state, "--config", f"{work}/proxy.toml"],
                        env=env, stderr=open(f"{work}/proxy.log", "w"))
    run.wait_port(agents)
    for i in range(2):
        token = subprocess.run([f"{bindir}/revproxy", "token", "create", "--state", state, "--name", f"bench{i}",
                                "--server", f"127.0.0.1:{agents}", "--host", "web.bench"],
                               check=True, env=env, capture_output=True, text=True).stdout.strip()
        subprocess.run([f"{bindir}/revproxy-agent", "enroll", "--state", f"{work}/agent{i}", "--token", token],
                       check=True, env=env, capture_output=True)
        procs.start([f"{bindir}/revproxy-agent", "run", "--state", f"{work}/agent{i}", "--transport", transport,
                     "--map", f"web.bench=127.0.0.1:{nginx_port}"],
                    env=env, stderr=open(f"{work}/agent{i}.log", "w"))
    # Both tunnels up: the proxy logs nothing at warn, so ask through the listener until
    # both agents have answered (each request goes to one of them).
    run.wait_http(web, label, [f"{work}/proxy.log"])
    time.sleep(1)
    return web, proxy.pid


def stalled_readers(port, pid, count, backend_port):
    """Opens `count` clients that each ask for /big and never read; returns the proxy's
    (RSS before, peak RSS once its memory stopped growing) in MiB, and how many of the
    clients reached the backend."""
    before = run.rss_kib(pid)
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: web.bench\r\n\r\n")
            socks.append(s)
        # Every reader at the backend (at most 30 s), then full once the proxy's RSS
        # stopped growing for 30 s (filling 2,000 streams takes a while on 2 cores, and
        # nginx feeds them in bursts with pauses of several seconds: the send timeout is
        # 10 minutes here, so that none is reset meanwhile).
        deadline = time.time() + 30
        while run.established(backend_port) < count and time.time() < deadline:
            time.sleep(0.2)
        last, still = -1, time.time()
        deadline = time.time() + 300
        while time.time() < deadline:
            now = run.rss_kib(pid)
            if abs(now - last) > 1024:
                last, still = now, time.time()
            elif time.time() - still > 30:
                break
            time.sleep(0.2)
        else:
            run.log("the proxy's memory was still growing after 300 s; measuring anyway")
        return before / 1024, peak_kib(pid) / 1024, run.established(backend_port)
    finally:
        for s in socks:
            s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", type=int, default=2000)
    ap.add_argument("--baseline", metavar="DIR", help="also the binaries in DIR (an earlier build)")
    ap.add_argument("--extra", metavar="LINE", action="append", default=[],
                    help="also this build with LINE added to its proxy.toml (repeatable)")
    ap.add_argument("--transport", default="h2", choices=["h2", "quic"])
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < 65536:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
        except (ValueError, OSError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 3 * args.readers + 200:
        sys.exit(f"the open-file limit ({hard}) is too low for {args.readers} readers")
    run.ensure_tools()
    bindir = run.build()
    procs = run.Procs()
    work = tempfile.mkdtemp(prefix="revproxy-stalled-")
    os.chmod(work, 0o755)
    started = time.time()
    try:
        nginx_port = run.free_port()
        run.start_nginx(procs, work, nginx_port)
        setups = [("this build", bindir, None)]
        setups += [(f"this build, {line}", bindir, line) for line in args.extra]
        if args.baseline:
            setups.insert(0, ("baseline", os.path.abspath(args.baseline), None))
        rows = []
        for i, (label, binaries, extra_line) in enumerate(setups):
            # One proxy at a time: each gets the machine's memory to itself.
            one = run.Procs()
            try:
                port, pid = start(one, binaries, work, nginx_port, args.transport, f"s{i}", extra_line)
                before, peak, reached = stalled_readers(port, pid, args.readers, nginx_port)
            finally:
                one.stop()
            run.log(f"{label}: {before:.0f} MiB before, {peak:.0f} MiB peak, {reached} readers at the backend")
            rows.append((label, before, peak, reached))
        version = subprocess.run([f"{bindir}/revproxy", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{version}, {os.cpu_count()} cores, {args.transport}, {args.readers} stalled readers of an 8 GiB "
              f"download (client receive buffer 4 KiB), two agents. Took {(time.time() - started) / 60:.1f} min.")
        print()
        print("| proxy | readers at the backend | RSS before (MiB) | peak RSS with the readers (MiB) | per reader (KiB) |")
        print("|---|---:|---:|---:|---:|")
        for label, before, peak, reached in rows:
            per = (peak - before) * 1024 / max(1, reached)
            print(f"| {label} | {reached} | {before:.0f} | {peak:.0f} | {per:.0f} |")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
