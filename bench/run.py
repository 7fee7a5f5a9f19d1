#!/usr/bin/env python3
"""revproxy benchmark: the same workloads through a direct connection, through revproxy and
through rathole (TLS transport), side by side in one run, each figure the median of several
alternating repetitions.

    python3 bench/run.py            # full run (about 20 minutes on 2 cores)
    python3 bench/run.py --quick    # smoke run (under 2 minutes after the build), numbers not meaningful
    python3 bench/run.py --baseline DIR   # also the binaries in DIR (an earlier build): before/after

It builds the release binaries, installs the Debian tools it needs (iperf3, wrk, ab from
apache2-utils, nginx, openssl) if they are missing, installs rathole with `cargo install
rathole` if it is absent (a --quick run skips rathole instead, saying so), starts everything
on 127.0.0.1 with ports the kernel picks, and prints a Markdown table (figures and ratios to
direct) ready for docs/benchmarks.md. Everything it starts is stopped when it exits.
"""

import argparse
import array
import fcntl
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import termios
import time

import held
import udp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"iperf3": "iperf3", "wrk": "wrk", "ab": "apache2-utils", "nginx": "nginx-light", "openssl": "openssl",
         "ss": "iproute2", "curl": "curl"}


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


def wait_port(port, timeout=10.0, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
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


def find_rathole():
    found = shutil.which("rathole")
    cargo_bin = os.path.expanduser("~/.cargo/bin/rathole")
    return found or (cargo_bin if os.path.exists(cargo_bin) else None)


def ensure_rathole(quick, wanted):
    """rathole's binary, installing it with cargo if absent; None (and a clear message) if skipped."""
    if not wanted:
        log("rathole skipped (--no-rathole)")
        return None
    found = find_rathole()
    if found:
        return found
    if quick:
        log("rathole is not installed: skipped in --quick mode (a full run installs it with `cargo install rathole`)")
        return None
    log("installing rathole with `cargo install rathole` (a few minutes)")
    # Not --locked: rathole 0.5.0's lock file pins a `time` that no longer builds on current rustc.
    r = subprocess.run(["cargo", "install", "--quiet", "rathole"])
    if r.returncode != 0 or not find_rathole():
        log("`cargo install rathole` failed: rathole skipped")
        return None
    return find_rathole()


def start_nginx(procs, work, port):
    os.makedirs(f"{work}/www", exist_ok=True)
    with open(f"{work}/www/index.html", "w") as f:
        f.write("x" * 100)
    # A large sparse file: what the stalled client of the fairness run asks for and never reads.
    with open(f"{work}/www/big", "wb") as f:
        f.truncate(8 << 30)
    conf = f"""
worker_processes 1;
worker_rlimit_nofile {nofile_limit()};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections {nofile_limit() - 100}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_header_timeout 600s;
    # Stalled readers (bench/stalled.py) hold their downloads open for minutes.
    send_timeout 600s;
    server {{ listen 127.0.0.1:{port} backlog=16384; root {work}/www; }}
}}
"""
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    procs.start([nginx, "-c", f"{work}/nginx.conf", "-p", work])
    wait_port(port)


def wait_http(port, what, logs):
    """Until a request to `port` (Host web.bench) gets a 200 from nginx through the tunnel."""
    deadline = time.time() + 20
    r = None
    while time.time() < deadline:
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: web.bench",
                            f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
        if r.stdout == "200":
            return
        time.sleep(0.1)
    tails = "".join(open(f).read()[-2000:] for f in logs if os.path.exists(f))
    raise RuntimeError(f"{what}: the tunnel did not come up:\n{r.stdout}{r.stderr}{tails}")


def start_revproxy(procs, bindir, work, backends, transport="h2", label="revproxy", udp_backends=None):
    """Proxy + one enrolled agent, one tunnel over `transport`. `backends` maps name -> port;
    `udp_backends` ({"iperf": port, "echo": port}) are reached through granted ports, where
    the build has them. Returns the setup: ports for each workload and the pids whose memory
    is measured."""
    work = f"{work}/{label}-{transport}"
    os.makedirs(work)
    agents, http = free_port(), free_port()
    fixed = {name: free_port() for name in backends}
    state = f"{work}/proxy"
    env = dict(os.environ, RUST_LOG="warn")
    listeners = "".join(f'[[listener]]\nlisten = "127.0.0.1:{p}"\nto = "{n}"\n' for n, p in fixed.items())
    # Every benchmark client comes from 127.0.0.1: lift the per-source cap (256 by default)
    # where the build has one, or the idle-memory figure would measure 256 connections.
    with open(f"{bindir}/revproxy", "rb") as binary:
        caps = b"max_connections_per_source" in binary.read()
        binary.seek(0)
        grants_udp = b"udp_idle_timeout" in binary.read()
    per_source = "max_connections_per_source = 100000\n" if caps else ""
    # Granted ports listen on 127.0.0.2, apart from the listeners the kernel picked ports for
    # on 127.0.0.1 (a listener inside the range on the same address is refused).
    granted = {}
    if udp_backends and grants_udp:
        granted = {role: udp.free_port_both("127.0.0.2") for role in udp_backends}
        low, high = min(granted.values()), max(granted.values())
        per_source += f'ports = "{low}-{high}"\nports_bind = "127.0.0.2"\n'
    with open(f"{work}/proxy.toml", "w") as f:
        f.write(f'agents = "127.0.0.1:{agents}"\nhttp = "127.0.0.1:{http}"\n{per_source}{listeners}')
    subprocess.run([f"{bindir}/revproxy", "ca", "init", "--state", state], check=True, env=env, capture_output=True)
    # Builds with an admin listener get a free port for it (and their metrics are on, as in
    # production); older baseline builds have none.
    serve_help = subprocess.run([f"{bindir}/revproxy", "serve", "--help"], capture_output=True, text=True).stdout
    admin = ["--admin", f"127.0.0.1:{free_port()}"] if "--admin" in serve_help else []
    proxy = procs.start([f"{bindir}/revproxy", "serve", "--state", state, "--config", f"{work}/proxy.toml"] + admin,
                        env=env, stderr=open(f"{work}/proxy.log", "w"))
    wait_port(agents)
    hosts = sum((["--host", n] for n in backends), [])
    # iperf3 needs its port for TCP (control) and UDP (data); the echo only UDP.
    if granted:
        hosts += ["--tcp-port", str(granted["iperf"])]
        hosts += sum((["--udp-port", str(p)] for p in granted.values()), [])
    token = subprocess.run([f"{bindir}/revproxy", "token", "create", "--state", state, "--name", "bench",
                            "--server", f"127.0.0.1:{agents}"] + hosts,
                           check=True, env=env, capture_output=True, text=True).stdout.strip()
    subprocess.run([f"{bindir}/revproxy-agent", "enroll", "--state", f"{work}/agent", "--token", token],
                   check=True, env=env, capture_output=True)
    maps = sum((["--map", f"{n}=127.0.0.1:{p}"] for n, p in backends.items()), [])
    if granted:
        maps += ["--map", f"tcp:{granted['iperf']}=127.0.0.1:{udp_backends['iperf']}"]
        maps += sum((["--map", f"udp:{granted[r]}=127.0.0.1:{udp_backends[r]}"] for r in granted), [])
    agent = procs.start([f"{bindir}/revproxy-agent", "run", "--state", f"{work}/agent", "--transport", transport] + maps,
                        env=env,
                        stderr=open(f"{work}/agent.log", "w"))
    wait_http(http, f"revproxy {transport}", [f"{work}/proxy.log", f"{work}/agent.log"])
    # Plain HTTP workloads go through the Host-routing listener (the realistic path); the idle
    # and stalled connections use the fixed listener, which opens the stream at accept.
    setup = {"iperf": fixed["iperf.bench"], "http": http, "web": fixed["web.bench"], "ports": fixed,
             "pids": [proxy.pid, agent.pid]}
    if granted:
        setup["udp"] = dict(granted, host="127.0.0.2")
        # The agent maps its ports once its tunnel is up; the proxy listens on them then
        # (checked without connecting: iperf3 would take a probe for a test).
        udp.wait_bound("127.0.0.2", granted["iperf"])
    return setup


def localhost_cert(d):
    """A throwaway P-256 CA (`ca.crt`, `ca.key`) and a certificate for localhost signed by it
    (`srv.crt`, `srv.key`), made with openssl in `d`."""

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench-ca")
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "srv.crt", "-days", "2", "-extfile", "ext")


def start_rathole(procs, rathole, work, backends, udp_backends=None):
    """rathole server + client with its TLS transport, one service per backend (by port), and
    a UDP service per `udp_backends` entry (iperf3's beside its TCP service, on the same port
    number)."""
    d = f"{work}/rathole"
    os.makedirs(d)

    localhost_cert(d)
    subprocess.run(["openssl", "pkcs12", "-export", "-out", "id.pfx", "-inkey", "srv.key", "-in", "srv.crt", "-certfile", "ca.crt",
            "-passout", "pass:bench"], check=True, capture_output=True, cwd=d)
    control = free_port()
    public = {name: free_port() for name in backends}
    server = (f'[server]\nbind_addr = "127.0.0.1:{control}"\n[server.transport]\ntype = "tls"\n'
              f'[server.transport.tls]\npkcs12 = "{d}/id.pfx"\npkcs12_password = "bench"\n')
    client = (f'[client]\nremote_addr = "localhost:{control}"\n[client.transport]\ntype = "tls"\n'
              f'[client.transport.tls]\ntrusted_root = "{d}/ca.crt"\nhostname = "localhost"\n')
    for name, port in backends.items():
        svc = name.replace(".", "_")
        server += f'[server.services.{svc}]\ntoken = "bench-{svc}"\nbind_addr = "127.0.0.1:{public[name]}"\n'
        client += f'[client.services.{svc}]\ntoken = "bench-{svc}"\nlocal_addr = "127.0.0.1:{port}"\n'
    udp_public = {}
    for role, port in (udp_backends or {}).items():
        udp_public[role] = public["iperf.bench"] if role == "iperf" else udp.free_port_both("127.0.0.1")
        server += (f'[server.services.udp_{role}]\ntype = "udp"\ntoken = "bench-udp-{role}"\n'
                   f'bind_addr = "127.0.0.1:{udp_public[role]}"\n')
        client += (f'[client.services.udp_{role}]\ntype = "udp"\ntoken = "bench-udp-{role}"\n'
                   f'local_addr = "127.0.0.1:{port}"\n')
    for role, text in (("server", server), ("client", client)):
        with open(f"{d}/{role}.toml", "w") as f:
            f.write(text)
    env = dict(os.environ, RUST_LOG="warn")
    srv = procs.start([rathole, "-s", f"{d}/server.toml"], env=env, stderr=open(f"{d}/server.log", "w"))
    wait_port(control)
    cli = procs.start([rathole, "-c", f"{d}/client.toml"], env=env, stderr=open(f"{d}/client.log", "w"))
    wait_http(public["web.bench"], "rathole", [f"{d}/server.log", f"{d}/client.log"])
    setup = {"iperf": public["iperf.bench"], "http": public["web.bench"], "web": public["web.bench"],
             "ports": public, "pids": [srv.pid, cli.pid]}
    if udp_public:
        setup["udp"] = dict(udp_public, host="127.0.0.1")
    return setup


def nofile_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- workloads: each returns a figure, or a dict of figures ---

def iperf(port, seconds, parallel=1, wrap=()):
    """Gbit/s received. `wrap` prefixes the command (e.g. `ip netns exec NS`)."""
    r = subprocess.run(list(wrap) + ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(parallel), "-J"],
                       capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(port, host, conns, seconds, wrap=()):
    """(requests/s, p50 ms, p99 ms). `wrap` as for `iperf`."""
    r = subprocess.run(list(wrap) + ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}",
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
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=600)
    m = re.search(r"Failed requests:\s+(\d+)", r.stdout)
    if m is None:
        raise RuntimeError(f"ab did not finish: {r.stderr.strip()[-300:]}")
    failed = int(m.group(1))
    if failed:
        raise RuntimeError(f"ab saw {failed} failed requests")
    return float(re.search(r"Requests per second:\s+([\d.]+)", r.stdout).group(1))


def cpu_seconds(pids):
    """User + system CPU seconds the processes `pids` have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def established(port):
    """Established TCP connections whose local port is `port` (the backend's side)."""
    r = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                       capture_output=True, text=True, check=True)
    return len(r.stdout.splitlines())


def wait_until(what, cond, timeout):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def idle_memory(setup, backend_port, count):
    """KiB of RSS per idle stream, summed over the tunnel's two processes: RSS before and after
    `count` idle client connections are open end to end (each one accepted by the backend)."""
    base_conns = established(backend_port)
    before = sum(rss_kib(p) for p in setup["pids"])
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", setup["web"]), timeout=10))
        # Every connection reaches the backend, or (a tunnel that drops some) the count
        # stops growing: then the RSS growth is divided by those that did.
        deadline, last, still_since = time.time() + 120, -1, time.time()
        while time.time() < deadline:
            opened = established(backend_port) - base_conns
            if opened >= count:
                break
            if opened != last:
                last, still_since = opened, time.time()
            elif time.time() - still_since > 5:
                log(f"only {opened} of {count} idle connections reached the backend; dividing by {opened}")
                break
            time.sleep(0.1)
        opened = max(1, min(count, established(backend_port) - base_conns))
        time.sleep(1)  # let any lazily started per-connection work settle before reading RSS
        after = sum(rss_kib(p) for p in setup["pids"])
    finally:
        for s in socks:
            s.close()
    try:
        wait_until("the idle connections to close at the backend", lambda: established(backend_port) <= base_conns, 120)
    except RuntimeError as e:
        log(f"warning: {e}")
    return (after - before) / opened


def fairness(setup, seconds):
    """8 parallel streams while a 9th client asks for a large file and never reads it."""
    stalled = socket.create_connection(("127.0.0.1", setup["web"]), timeout=10)
    try:
        stalled.sendall(b"GET /big HTTP/1.1\r\nHost: web.bench\r\n\r\n")
        # Stalled once every buffer on its path is full: its receive queue stops growing.
        def queued():
            buf = array.array("i", [0])
            fcntl.ioctl(stalled.fileno(), termios.FIONREAD, buf)
            return buf[0]

        # Give up waiting after 10 s: the client is stalled either way, only its buffers
        # may still be growing (a tunnel without per-stream flow control fills slowly).
        last, stable_since = -1, time.time()
        deadline = time.time() + 10
        while time.time() < deadline:
            now = queued()
            if now != last or now == 0:
                last, stable_since = now, time.time()
            elif time.time() - stable_since > 0.5:
                break
            time.sleep(0.1)
        else:
            log(f"the stalled client's receive queue still changes ({queued()} bytes queued); measuring anyway")
        return iperf(setup["iperf"], seconds, 8)
    finally:
        stalled.close()


def fmt(value):
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run; numbers are not meaningful")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions per figure (default 3, quick 1)")
    ap.add_argument("--no-rathole", action="store_true", help="leave rathole out")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also measure the revproxy and revproxy-agent binaries in DIR (an earlier build), "
                         "side by side with this one: a before/after in one run")
    ap.add_argument("--only", metavar="TEXT", action="append",
                    help="measure only the figures whose name contains TEXT (repeatable), "
                         "e.g. --only 'new connections': for iterating on one path")
    ap.add_argument("--held", metavar="N", type=int, help="connections held at once (default 10,000, quick 500)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    seconds = 2 if args.quick else 10
    wrk_seconds = 2 if args.quick else 10
    ab_requests = 2000 if args.quick else 20000
    # A tunnel carries at most 1,023 streams at a time (the agent's limit; more wait for a
    # slot), so the memory per idle stream is measured with 1,000: with more, the waiting
    # connections' memory would be divided among the 1,023 that are open.
    idle_count = 1000

    # Every process started from here inherits the raised open-file limit (10,000 idle
    # connections need as many descriptors in the client, the proxy, the agent and nginx).
    # rathole holds two descriptors per connection in each process, so root raises the hard
    # limit too (an unprivileged run keeps its hard limit and may measure fewer).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < 65536:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
        except (ValueError, OSError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * idle_count + 1000:
        idle_count = max(100, (hard - 1000) // 2)
        log(f"open-file hard limit is {hard}: measuring memory with {idle_count} idle connections")
    held_count = held.connection_count(args.quick, args.held)

    # Stopped from outside: still stop everything started (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_tools()
    rathole = ensure_rathole(args.quick, not args.no_rathole)
    bindir = build()
    procs = Procs()
    work = tempfile.mkdtemp(prefix="revproxy-bench-")
    os.chmod(work, 0o755)  # nginx workers run as another user and must read www/
    started = time.time()
    try:
        nginx_port, iperf_port, echo_port = free_port(), free_port(), free_port()
        start_nginx(procs, work, nginx_port)
        procs.start(["iperf3", "-s", "-p", str(iperf_port)])
        wait_port(iperf_port)
        held.start_echo(procs, echo_port)
        backends = {"web.bench": nginx_port, "iperf.bench": iperf_port, "echo.bench": echo_port}
        udp_echo_port = udp.free_port_both("127.0.0.1")
        udp.start_echo(procs, udp_echo_port)
        udp_backends = {"iperf": iperf_port, "echo": udp_echo_port}

        direct = {"iperf": iperf_port, "http": nginx_port, "web": nginx_port, "ports": backends, "pids": [],
                  "udp": dict(udp_backends, host="127.0.0.1")}
        setups = {
            "direct": direct,
            "revproxy h2": start_revproxy(procs, bindir, work, backends, udp_backends=udp_backends),
            "revproxy QUIC": start_revproxy(procs, bindir, work, backends, "quic", udp_backends=udp_backends),
        }
        if args.baseline:
            base = os.path.abspath(args.baseline)
            setups["baseline h2"] = start_revproxy(procs, base, work, backends, label="baseline",
                                                   udp_backends=udp_backends)
            setups["baseline QUIC"] = start_revproxy(procs, base, work, backends, "quic", label="baseline",
                                                     udp_backends=udp_backends)
        if rathole:
            setups["rathole TLS"] = start_rathole(procs, rathole, work, backends, udp_backends)

        def keepalive(conns):
            def run(s):
                before = cpu_seconds(s["pids"])
                rps, p50, p99 = wrk(s["http"], "web.bench", conns, wrk_seconds)
                used = cpu_seconds(s["pids"]) - before
                base = f"keep-alive, {conns} conns"
                figures = {f"{base}: req/s": rps, f"{base}: p50 latency (ms)": p50, f"{base}: p99 latency (ms)": p99}
                if s["pids"]:
                    # Proxy and agent together; wrk ran for wrk_seconds at rps.
                    figures[f"{base}: CPU per request, both ends (us)"] = used * 1e6 / (rps * wrk_seconds)
                return figures
            return run

        def new_connections(conns):
            def run(s):
                before = cpu_seconds(s["pids"])
                cps = ab(s["http"], "web.bench", conns, ab_requests)
                used = cpu_seconds(s["pids"]) - before
                name = f"new connections/s, concurrency {conns}"
                figures = {name: cps}
                if s["pids"]:
                    figures[f"CPU per new connection, concurrency {conns}, both ends (us)"] = used * 1e6 / ab_requests
                return figures
            return run

        def single_stream(s):
            before = cpu_seconds(s["pids"])
            gbps = iperf(s["iperf"], seconds)
            used = cpu_seconds(s["pids"]) - before
            figures = {"single-stream throughput (Gbit/s)": gbps}
            if s["pids"]:
                # Proxy and agent together, per GiB moved (iperf3 ran for `seconds` at gbps).
                figures["single stream: CPU per GiB, both ends (s)"] = used / (gbps * 1e9 * seconds / 8 / 2**30)
            return figures

        figures = [
            ("single-stream throughput (Gbit/s)", single_stream),
            ("8 parallel streams (Gbit/s)", lambda s: iperf(s["iperf"], seconds, 8)),
            ("keep-alive, 10 conns", keepalive(10)),
            ("keep-alive, 100 conns", keepalive(100)),
            ("new connections/s, concurrency 10", new_connections(10)),
            ("new connections/s, concurrency 100", new_connections(100)),
            ("memory per idle stream, both ends (KiB)",
             lambda s: idle_memory(s, nginx_port, idle_count) if s["pids"] else None),
            ("8 streams while a 9th is stalled (Gbit/s)", lambda s: fairness(s, seconds)),
            ("connections held at once through one agent", lambda s: held.held_connections(s, echo_port, held_count)),
        ] + udp.figures(seconds, 200 if args.quick else 2000)
        if args.only:
            figures = [(name, fn) for name, fn in figures if any(t in name for t in args.only)]
            if not figures:
                sys.exit(f"no figure's name contains any of {args.only}")
        results = {}  # (figure, setup) -> list of values
        for rep in range(repeats):
            for name, fn in figures:
                for setup, ports in setups.items():  # alternate A B C A B C
                    try:
                        value = fn(ports)
                    except Exception as e:  # one broken setup must not lose the whole run
                        log(f"rep {rep + 1}/{repeats} {name} {setup} FAILED: {e}")
                        value = None
                    # A figure a setup cannot give (an older build without granted UDP ports).
                    if value is None and fn is not None and name.startswith(("keep-alive", "UDP")):
                        continue
                    for key, v in (value.items() if isinstance(value, dict) else [(name, value)]):
                        results.setdefault((key, setup), []).append(v)
                    log(f"rep {rep + 1}/{repeats} {name} {setup} done")

        cols = list(setups)

        def median(name, col):
            values = [v for v in results.get((name, col), []) if v is not None]
            return statistics.median(values) if values else None

        names = []
        for (name, _setup) in results:
            if name not in names:
                names.append(name)
        rows = [(name, {c: median(name, c) for c in cols}) for name in names]
        fair = {}
        for c in cols:
            alone, stalled = median("8 parallel streams (Gbit/s)", c), median("8 streams while a 9th is stalled (Gbit/s)", c)
            fair[c] = stalled / alone if alone and stalled is not None else None
        rows.append(("fairness: 8 streams with a 9th stalled / without", fair))

        kernel = platform.release()
        cores = os.cpu_count()
        version = subprocess.run([f"{bindir}/revproxy", "--version"], capture_output=True, text=True).stdout.strip()
        tools = [subprocess.run([t, "--version"] if t != "ab" else ["ab", "-V"], capture_output=True,
                                text=True).stdout.splitlines()[0] for t in ("iperf3", "wrk", "ab")]
        if rathole:
            out = subprocess.run([rathole, "--version"], capture_output=True, text=True).stdout
            built = re.search(r"Build Version:\s*(\S+)", out)
            tools.append(f"rathole {built.group(1)}" if built else out.strip().splitlines()[0])
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        print(f"Machine: {cores} cores ({cpu}), Linux {kernel}. {version}. "
              f"Median of {repeats} alternating repetition(s); "
              + ("QUICK run" if args.quick else f"{seconds}s per iperf3/wrk run, {ab_requests} requests per ab run")
              + f", {idle_count} idle connections for memory, {held_count} held at once."
              f" Took {(time.time() - started) / 60:.1f} min.")
        print("Tools: " + "; ".join(tools))
        if not rathole:
            print("rathole: skipped (see the log above).")
        print()
        others = cols[1:]
        print("| figure | " + " | ".join(cols) + " | " + " | ".join(f"{c} / direct" for c in others) + " |")
        print("|---|" + "---:|" * (len(cols) + len(others)))
        for name, med in rows:
            ratios = [fmt(med[c] / med["direct"]) if med[c] is not None and med["direct"] else "-" for c in others]
            print(f"| {name} | " + " | ".join(fmt(med[c]) for c in cols) + " | " + " | ".join(ratios) + " |")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
