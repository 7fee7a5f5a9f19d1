#!/usr/bin/env python3
"""revproxy benchmark: the same workloads through a direct connection and through revproxy,
side by side in one run, each figure the median of several alternating repetitions.

    python3 bench/run.py            # full run (several minutes)
    python3 bench/run.py --quick    # smoke run (well under 2 minutes), numbers not meaningful

It builds the release binaries, installs the Debian tools it needs (iperf3, wrk, ab from
apache2-utils, nginx) if they are missing, starts everything on 127.0.0.1 with ports the
kernel picks, and prints a Markdown table (figures and ratios to direct) ready for
docs/benchmarks.md. Everything it starts is stopped when it exits.
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"iperf3": "iperf3", "wrk": "wrk", "ab": "apache2-utils", "nginx": "nginx-light"}


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ensure_tools():
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Procs:
    """Background processes, all stopped on exit."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def build():
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "revproxy", "--bin", "revproxy-agent"],
                   cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release")


def start_nginx(procs, work, port):
    os.makedirs(f"{work}/www", exist_ok=True)
    with open(f"{work}/www/index.html", "w") as f:
        f.write("x" * 100)
    conf = f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{ listen 127.0.0.1:{port}; root {work}/www; }}
}}
"""
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    procs.start([nginx, "-c", f"{work}/nginx.conf", "-p", work])
    wait_port(port)


def start_revproxy(procs, bindir, work, backends):
    """Proxy + one enrolled agent. `backends` maps name -> port. Returns (http_port, fixed ports by name)."""
    agents, http = free_port(), free_port()
    fixed = {name: free_port() for name in backends}
    state = f"{work}/proxy"
    env = dict(os.environ, RUST_LOG="warn")
    listeners = "".join(f'[[listener]]\nlisten = "127.0.0.1:{p}"\nto = "{n}"\n' for n, p in fixed.items())
    with open(f"{work}/proxy.toml", "w") as f:
        f.write(f'agents = "127.0.0.1:{agents}"\nhttp = "127.0.0.1:{http}"\n{listeners}')
    subprocess.run([f"{bindir}/revproxy", "ca", "init", "--state", state], check=True, env=env, capture_output=True)
    procs.start([f"{bindir}/revproxy", "serve", "--state", state, "--config", f"{work}/proxy.toml"], env=env,
                stderr=open(f"{work}/proxy.log", "w"))
    wait_port(agents)
    hosts = sum((["--host", n] for n in backends), [])
    token = subprocess.run([f"{bindir}/revproxy", "token", "create", "--state", state, "--name", "bench",
                            "--server", f"127.0.0.1:{agents}"] + hosts,
                           check=True, env=env, capture_output=True, text=True).stdout.strip()
    subprocess.run([f"{bindir}/revproxy-agent", "enroll", "--state", f"{work}/agent", "--token", token],
                   check=True, env=env, capture_output=True)
    maps = sum((["--map", f"{n}=127.0.0.1:{p}"] for n, p in backends.items()), [])
    procs.start([f"{bindir}/revproxy-agent", "run", "--state", f"{work}/agent"] + maps, env=env,
                stderr=open(f"{work}/agent.log", "w"))
    # Ready when a request through the tunnel gets an answer from the backend.
    deadline = time.time() + 15
    while time.time() < deadline:
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: web.bench",
                            f"http://127.0.0.1:{http}/"], capture_output=True, text=True)
        if r.stdout == "200":
            return http, fixed
        time.sleep(0.1)
    logs = r.stdout + r.stderr + "".join(open(f"{work}/{n}.log").read()[-2000:] for n in ("proxy", "agent"))
    raise RuntimeError(f"the tunnel did not come up:\n{logs}")


# --- workloads: each returns a dict of figures ---

def iperf(port, seconds, parallel=1):
    r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(parallel), "-J"],
                       capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(port, host, conns, seconds):
    r = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}",
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30)
    out = r.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses")
    return rps, pct(50), pct(99)


def ab(port, host, conns, requests):
    r = subprocess.run(["ab", "-q", "-n", str(requests), "-c", str(conns), "-H", f"Host: {host}",
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=300)
    failed = int(re.search(r"Failed requests:\s+(\d+)", r.stdout).group(1))
    if failed:
        raise RuntimeError(f"ab saw {failed} failed requests")
    return float(re.search(r"Requests per second:\s+([\d.]+)", r.stdout).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run; numbers are not meaningful")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions per figure (default 3, quick 1)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    seconds = 2 if args.quick else 10
    wrk_seconds = 2 if args.quick else 10
    ab_requests = 2000 if args.quick else 20000

    ensure_tools()
    bindir = build()
    procs = Procs()
    work = tempfile.mkdtemp(prefix="revproxy-bench-")
    os.chmod(work, 0o755)  # nginx workers run as another user and must read www/
    try:
        nginx_port, iperf_port = free_port(), free_port()
        start_nginx(procs, work, nginx_port)
        procs.start(["iperf3", "-s", "-p", str(iperf_port)])
        wait_port(iperf_port)
        http_port, fixed = start_revproxy(procs, bindir, work, {"web.bench": nginx_port, "iperf.bench": iperf_port})

        setups = {
            "direct": {"iperf": iperf_port, "http": nginx_port},
            "revproxy h2": {"iperf": fixed["iperf.bench"], "http": http_port},
        }
        figures = [
            ("single-stream throughput (Gbit/s)", lambda s: iperf(s["iperf"], seconds)),
            ("8 parallel streams (Gbit/s)", lambda s: iperf(s["iperf"], seconds, 8)),
            ("keep-alive, 10 conns: req/s", None),
            ("keep-alive, 100 conns: req/s", None),
            ("new connections/s, concurrency 10", lambda s: ab(s["http"], "web.bench", 10, ab_requests)),
            ("new connections/s, concurrency 100", lambda s: ab(s["http"], "web.bench", 100, ab_requests)),
        ]
        results = {}  # (figure, setup) -> list of values
        for rep in range(repeats):
            for name, fn in figures:
                for setup, ports in setups.items():  # alternate A B A B
                    if fn is None:
                        conns = 10 if "10 conns" in name else 100
                        rps, p50, p99 = wrk(ports["http"], "web.bench", conns, wrk_seconds)
                        base = f"keep-alive, {conns} conns"
                        results.setdefault((f"{base}: req/s", setup), []).append(rps)
                        results.setdefault((f"{base}: p50 latency (ms)", setup), []).append(p50)
                        results.setdefault((f"{base}: p99 latency (ms)", setup), []).append(p99)
                    else:
                        results.setdefault((name, setup), []).append(fn(ports))
                    log(f"rep {rep + 1}/{repeats} {name} {setup} done")

        names = []
        for (name, _setup) in results:
            if name not in names:
                names.append(name)
        kernel = platform.release()
        cores = os.cpu_count()
        version = subprocess.run([f"{bindir}/revproxy", "--version"], capture_output=True, text=True).stdout.strip()
        tools = {t: subprocess.run([t, "--version"] if t != "ab" else ["ab", "-V"], capture_output=True, text=True).stdout.splitlines()[0]
                 for t in ("iperf3", "wrk", "ab")}
        print(f"Machine: {cores} cores, Linux {kernel}. {version}. "
              f"Median of {repeats} alternating repetition(s); {'QUICK run' if args.quick else f'{seconds}s per iperf3/wrk run, {ab_requests} requests per ab run'}.")
        print("Tools: " + "; ".join(tools.values()))
        print()
        cols = list(setups)
        print("| figure | " + " | ".join(cols) + " | " + " | ".join(f"{c} / direct" for c in cols[1:]) + " |")
        print("|---|" + "---:|" * (len(cols) * 2 - 1))
        for name in names:
            med = {c: statistics.median(results[(name, c)]) for c in cols}
            cells = [f"{med[c]:.2f}" if med[c] < 100 else f"{med[c]:.0f}" for c in cols]
            ratios = [f"{med[c] / med['direct']:.2f}" if med["direct"] else "-" for c in cols[1:]]
            print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
