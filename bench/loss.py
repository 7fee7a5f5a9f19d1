#!/usr/bin/env python3
"""h2 against QUIC tunnels on a lossy link, side by side in one run.

    sudo python3 bench/loss.py            # full run (about 15 minutes)
    sudo python3 bench/loss.py --quick    # smoke run, numbers not meaningful

Needs root (network namespaces). Two namespaces joined by a veth pair play the two sides of
a network: the proxy and the clients in one, the agents and the backends (iperf3, nginx)
in the other. Packets crossing the veth are dropped at random by an nftables rule
(`numgen random mod 100 < LOSS drop`, in both directions); `tc netem` is not available on
these machines. Both transports run at once (a proxy and an agent each) and are measured
in alternation, at 0%, 1% and 3% loss. Prints a Markdown table for docs/benchmarks.md.
Installs nftables, iperf3, wrk and nginx with apt-get if they are missing.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the main harness: builds, tools, workloads)

NS_PROXY, NS_AGENT = "rvp-bench-proxy", "rvp-bench-agent"
PROXY_IP, AGENT_IP = "10.77.0.1", "10.77.0.2"
# Ports inside namespaces this script creates and owns: nothing else listens there.
NGINX, IPERF = 8080, 5201
TRANSPORTS = {"h2": {"agents": 7443, "http": 8081, "iperf": 8082},
              "quic": {"agents": 7543, "http": 8181, "iperf": 8182}}


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def ns(name, *args):
    return ["ip", "netns", "exec", name] + list(args)


def setup_network():
    teardown_network()
    for n in (NS_PROXY, NS_AGENT):
        sh("ip", "netns", "add", n)
        sh(*ns(n, "ip", "link", "set", "lo", "up"))
    sh("ip", "link", "add", "rvpa", "type", "veth", "peer", "name", "rvpb")
    sh("ip", "link", "set", "rvpa", "netns", NS_PROXY)
    sh("ip", "link", "set", "rvpb", "netns", NS_AGENT)
    for n, dev, ip in ((NS_PROXY, "rvpa", PROXY_IP), (NS_AGENT, "rvpb", AGENT_IP)):
        sh(*ns(n, "ip", "addr", "add", f"{ip}/24", "dev", dev))
        sh(*ns(n, "ip", "link", "set", dev, "up"))
        # Room for QUIC's receive bursts, as an operator following our docs would set.
        sh(*ns(n, "sysctl", "-q", "-w", "net.core.rmem_max=8388608", "net.core.wmem_max=8388608"), check=False)


def set_loss(percent):
    """Drops `percent`% of the packets arriving over the veth, in each namespace."""
    for n, dev in ((NS_PROXY, "rvpa"), (NS_AGENT, "rvpb")):
        sh(*ns(n, "nft", "delete", "table", "inet", "rvploss"), check=False)
        if percent:
            sh(*ns(n, "nft", "add", "table", "inet", "rvploss"))
            sh(*ns(n, "nft", "add", "chain", "inet", "rvploss", "input",
                   "{ type filter hook input priority 0; }"))
            sh(*ns(n, "nft", "add", "rule", "inet", "rvploss", "input", "iifname", dev,
                   "numgen", "random", "mod", "100", "<", str(percent), "drop"))


def teardown_network():
    for n in (NS_PROXY, NS_AGENT):
        sh("ip", "netns", "del", n, check=False)


def wait_listening(name, port, udp=False, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = sh(*ns(name, "ss", "-Hln" + ("u" if udp else "t"), f"( sport = :{port} )")).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} in {name}")


def start(procs, bindir, work, transport):
    ports = TRANSPORTS[transport]
    d = f"{work}/{transport}"
    os.makedirs(d)
    env = dict(os.environ, RUST_LOG="warn")
    state = f"{d}/proxy"
    with open(f"{d}/proxy.toml", "w") as f:
        f.write(f'agents = "{PROXY_IP}:{ports["agents"]}"\nhttp = "127.0.0.1:{ports["http"]}"\n'
                f'[[listener]]\nlisten = "127.0.0.1:{ports["iperf"]}"\nto = "iperf.bench"\n')
    sh(f"{bindir}/revproxy", "ca", "init", "--state", state, "--san", PROXY_IP, env=env)
    procs.start(ns(NS_PROXY, f"{bindir}/revproxy", "serve", "--state", state, "--config", f"{d}/proxy.toml"),
                env=env, stderr=open(f"{d}/proxy.log", "w"))
    wait_listening(NS_PROXY, ports["agents"])
    token = sh(f"{bindir}/revproxy", "token", "create", "--state", state, "--name", "bench", "--host", "web.bench",
               "--host", "iperf.bench", "--server", f"{PROXY_IP}:{ports['agents']}", env=env).stdout.strip()
    sh(*ns(NS_AGENT, f"{bindir}/revproxy-agent", "enroll", "--state", f"{d}/agent", "--token", token), env=env)
    procs.start(ns(NS_AGENT, f"{bindir}/revproxy-agent", "run", "--state", f"{d}/agent", "--transport", transport,
                   "--map", f"web.bench=127.0.0.1:{NGINX}", "--map", f"iperf.bench=127.0.0.1:{IPERF}"),
                env=env, stderr=open(f"{d}/agent.log", "w"))
    deadline = time.time() + 20
    while time.time() < deadline:
        r = sh(*ns(NS_PROXY, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: web.bench",
                   f"http://127.0.0.1:{ports['http']}/"), check=False)
        if r.stdout == "200":
            return
        time.sleep(0.1)
    raise RuntimeError(f"{transport} tunnel did not come up: {open(f'{d}/agent.log').read()[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run; numbers are not meaningful")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions per figure (default 3, quick 1)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/loss.py needs root to create network namespaces (sudo python3 bench/loss.py)")
    repeats = args.repeats or (1 if args.quick else 3)
    seconds = 2 if args.quick else 10

    bench.TOOLS["nft"] = "nftables"
    bench.ensure_tools()
    bindir = bench.build()
    procs = bench.Procs()
    work = tempfile.mkdtemp(prefix="revproxy-loss-")
    os.chmod(work, 0o755)
    started = time.time()
    try:
        setup_network()
        os.makedirs(f"{work}/www")
        with open(f"{work}/www/index.html", "w") as f:
            f.write("x" * 100)
        with open(f"{work}/nginx.conf", "w") as f:
            f.write(f"worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err warn;\n"
                    f"events {{ worker_connections 1024; }}\nhttp {{ access_log off; keepalive_requests 1000000;\n"
                    f"server {{ listen 127.0.0.1:{NGINX}; root {work}/www; }} }}\n")
        procs.start(ns(NS_AGENT, shutil.which("nginx") or "/usr/sbin/nginx", "-c", f"{work}/nginx.conf", "-p", work))
        procs.start(ns(NS_AGENT, "iperf3", "-s", "-p", str(IPERF)))
        wait_listening(NS_AGENT, NGINX)
        wait_listening(NS_AGENT, IPERF)
        for t in TRANSPORTS:
            start(procs, bindir, work, t)

        results = {}
        for loss in (0, 1, 3):
            set_loss(loss)
            for rep in range(repeats):
                for t, ports in TRANSPORTS.items():  # alternate h2, quic, h2, quic
                    cell = results.setdefault(loss, {}).setdefault(t, {})
                    client = ns(NS_PROXY)
                    cell.setdefault("single", []).append(bench.iperf(ports["iperf"], seconds, 1, client))
                    cell.setdefault("p16", []).append(bench.iperf(ports["iperf"], seconds, 16, client))
                    _, p50, p99 = bench.wrk(ports["http"], "web.bench", 10, seconds, client)
                    cell.setdefault("p50", []).append(p50)
                    cell.setdefault("p99", []).append(p99)
                    bench.log(f"loss {loss}% rep {rep + 1}/{repeats} {t} done")
        set_loss(0)

        version = sh(f"{bindir}/revproxy", "--version").stdout.strip()
        print(f"Machine: {os.cpu_count()} cores, Linux {os.uname().release}. {version}. Median of {repeats} "
              f"alternating repetition(s), {seconds}s per run"
              f"{' (QUICK run)' if args.quick else ''}. Took {(time.time() - started) / 60:.1f} min.")
        print("Proxy and clients in one network namespace, agent and backends in another, joined by a veth pair; "
              "loss applied by nftables to packets arriving on each side.")
        print()
        rows = [("single-stream throughput (Gbit/s)", "single"), ("16 parallel streams (Gbit/s)", "p16"),
                ("small requests, 10 conns: p50 (ms)", "p50"), ("small requests, 10 conns: p99 (ms)", "p99")]
        print("| figure | loss | h2 | QUIC | QUIC / h2 |")
        print("|---|---:|---:|---:|---:|")
        for label, key in rows:
            for loss in (0, 1, 3):
                h2 = statistics.median(results[loss]["h2"][key])
                q = statistics.median(results[loss]["quic"][key])
                print(f"| {label} | {loss}% | {bench.fmt(h2)} | {bench.fmt(q)} | {q / h2:.2f} |")
    finally:
        procs.stop()
        teardown_network()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
