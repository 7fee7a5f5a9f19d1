#!/usr/bin/env python3
"""TLS terminated at the proxy, side by side with nginx terminating TLS in front of the same
backend, in one run: new HTTPS connections a second (a full handshake each) and requests a
second over keep-alive HTTPS, each figure the median of alternating repetitions, with the
CPU each setup spent per request.

    python3 bench/tls.py            # about 4 minutes after the build
    python3 bench/tls.py --quick    # smoke run, numbers not meaningful
    python3 bench/tls.py --baseline DIR   # also revproxy and revproxy-agent from DIR, side by side

revproxy: `revproxy tls terminate localhost --cert --key` (an ECDSA P-256 certificate), one
agent over an h2 tunnel, its service the backend in plain HTTP. nginx: `listen ssl` with the
same certificate, `proxy_pass` to the same backend over kept-alive connections, one worker a
core. The backend is nginx serving 100 bytes. The clients (ab, wrk) resolve `localhost` and
send it as the server name. Everything runs on 127.0.0.1 with ports the kernel picks.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import run
from run import Procs, free_port, log, wait_port


def make_cert(d):
    """A CA and an ECDSA P-256 certificate for localhost, signed by it: (cert, key)."""

    run.localhost_cert(d)
    with open(f"{d}/srv.crt") as leaf, open(f"{d}/ca.crt") as ca, open(f"{d}/chain.pem", "w") as out:
        out.write(leaf.read() + ca.read())
    return f"{d}/chain.pem", f"{d}/srv.key"


def start_nginx_tls(procs, work, backend, cert, key):
    """nginx terminating TLS on a new port, proxying to `backend`: its port and pids."""
    d = f"{work}/nginx-tls"
    os.makedirs(d)
    port = free_port()
    conf = f"""
worker_processes auto;
worker_rlimit_nofile {run.nofile_limit()};
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=16384;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    master = procs.start([nginx, "-c", f"{d}/nginx.conf", "-p", d])
    wait_port(port)
    return port, lambda: [master.pid] + children(master.pid)


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start_revproxy_tls(procs, bindir, work, backend, cert, key):
    """A proxy with an SNI listener terminating `localhost`, one agent on h2: its port and pids."""
    d = f"{work}/revproxy-tls"
    os.makedirs(d)
    agents, sni = free_port(), free_port()
    state = f"{d}/proxy"
    env = dict(os.environ, RUST_LOG="warn")
    with open(f"{d}/proxy.toml", "w") as f:
        f.write(f'agents = "127.0.0.1:{agents}"\nsni = "127.0.0.1:{sni}"\nadmin = "127.0.0.1:{free_port()}"\n'
                "max_connections_per_source = 100000\n")
    subprocess.run([f"{bindir}/revproxy", "ca", "init", "--state", state], check=True, env=env, capture_output=True)
    proxy = procs.start([f"{bindir}/revproxy", "serve", "--state", state, "--config", f"{d}/proxy.toml"],
                        env=env, stderr=open(f"{d}/proxy.log", "w"))
    wait_port(agents)
    token = subprocess.run([f"{bindir}/revproxy", "token", "create", "--state", state, "--name", "bench",
                            "--server", f"127.0.0.1:{agents}", "--host", "localhost"],
                           check=True, env=env, capture_output=True, text=True).stdout.strip()
    subprocess.run([f"{bindir}/revproxy-agent", "enroll", "--state", f"{d}/agent", "--token", token],
                   check=True, env=env, capture_output=True)
    agent = procs.start([f"{bindir}/revproxy-agent", "run", "--state", f"{d}/agent", "--transport", "h2",
                         "--map", f"localhost=127.0.0.1:{backend}"], env=env, stderr=open(f"{d}/agent.log", "w"))
    subprocess.run([f"{bindir}/revproxy", "tls", "terminate", "--state", state, "localhost",
                    "--cert", cert, "--key", key], check=True, env=env, capture_output=True)
    return sni, lambda: [proxy.pid, agent.pid]


def wait_https(port, ca):
    deadline = time.time() + 20
    while time.time() < deadline:
        r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca,
                            f"https://localhost:{port}/"], capture_output=True, text=True)
        if r.stdout == "200":
            return
        time.sleep(0.2)
    raise RuntimeError(f"https://localhost:{port}/ did not answer 200: {r.stdout} {r.stderr}")


def handshakes(port, conns, requests):
    """New HTTPS connections a second: ab without keep-alive, a full handshake a request."""
    r = subprocess.run(["ab", "-q", "-n", str(requests), "-c", str(conns), f"https://localhost:{port}/"],
                       capture_output=True, text=True, timeout=600)
    m = re.search(r"Failed requests:\s+(\d+)", r.stdout)
    if m is None or int(m.group(1)):
        raise RuntimeError(f"ab: {r.stdout[-500:]}{r.stderr[-300:]}")
    return float(re.search(r"Requests per second:\s+([\d.]+)", r.stdout).group(1))


def keepalive(port, conns, seconds):
    """Requests a second over kept-alive HTTPS connections (wrk)."""
    r = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", f"https://localhost:{port}/"],
                       capture_output=True, text=True, timeout=seconds + 30)
    if "Non-2xx" in r.stdout:
        raise RuntimeError(f"wrk: {r.stdout}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", r.stdout).group(1))


def measure(work_fn, pids_fn):
    """The workload's figure and the CPU seconds the setup's processes spent on it."""
    before = run.cpu_seconds(pids_fn())
    figure, requests = work_fn()
    spent = run.cpu_seconds(pids_fn()) - before
    return figure, spent / max(requests, 1) * 1e6


BEFORE = "revproxy before (TLS terminated, h2)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run; numbers are not meaningful")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also measure revproxy and revproxy-agent from DIR (an earlier build), side by side")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions per figure (default 5, quick 1)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    seconds = 2 if args.quick else 10
    new_conns = 500 if args.quick else 5000
    run.ensure_tools()
    bindir = run.build()
    procs = Procs()
    work = tempfile.mkdtemp(prefix="revproxy-tls-bench-")
    os.chmod(work, 0o755)  # nginx workers run as another user and must read www/
    try:
        backend = free_port()
        os.makedirs(f"{work}/backend")
        run.start_nginx(procs, f"{work}/backend", backend)
        cert, key = make_cert(work)
        setups = {
            "nginx (TLS)": start_nginx_tls(procs, work, backend, cert, key),
            "revproxy (TLS terminated, h2)": start_revproxy_tls(procs, bindir, work, backend, cert, key),
        }
        if args.baseline:
            setups[BEFORE] = start_revproxy_tls(procs, os.path.abspath(args.baseline), f"{work}/before",
                                                backend, cert, key)
        for port, _ in setups.values():
            wait_https(port, f"{work}/ca.crt")
        workloads = {
            "new HTTPS connections, 16 at a time (conn/s)":
                lambda port: (handshakes(port, 16, new_conns), new_conns),
            "keep-alive HTTPS, 50 connections (req/s)":
                lambda port: (lambda rps: (rps, rps * seconds))(keepalive(port, 50, seconds)),
        }
        rows = []
        for name, work_fn in workloads.items():
            figures = {label: [] for label in setups}
            cpu = {label: [] for label in setups}
            for i in range(repeats):
                order = list(setups.items()) if i % 2 == 0 else list(reversed(setups.items()))
                for label, (port, pids) in order:
                    figure, us = measure(lambda: work_fn(port), pids)
                    figures[label].append(figure)
                    cpu[label].append(us)
                    log(f"{name}: {label} {figure:.0f} ({us:.0f} µs CPU/request)")
            rows.append((name, {label: (statistics.median(figures[label]), statistics.median(cpu[label]))
                                for label in setups}))
        ratios = ["revproxy / nginx"] + (["before / nginx"] if args.baseline else [])
        print(f"| workload ({repeats} runs, median) | " + " | ".join(setups) + " | " + " | ".join(ratios) + " |")
        print("|---|" + "---|" * (len(setups) + len(ratios)))
        for name, by in rows:
            cells = [f"{f:,.0f} ({us:.0f} µs CPU/req)" for f, us in by.values()]
            n = by["nginx (TLS)"][0]
            shares = [f"{by[label][0] / n:.2f}" for label in setups if label != "nginx (TLS)"]
            print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(shares) + " |")
    finally:
        procs.stop()
        if os.environ.get("KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
