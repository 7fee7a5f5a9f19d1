#!/usr/bin/env python3
"""Idle tunnels at scale (issue 33): what an idle agent costs the proxy, and how fast a fleet
comes back after the proxy restarts.

    python3 bench/idle.py                          # 10,000 agents, h2 then QUIC; 300 real agents each
    python3 bench/idle.py --agents 3000 --real 0   # smaller, library agents only
    python3 bench/idle.py --transport quic --window 30

For each transport, against one release proxy on 127.0.0.1 (its own state, a fresh CA):

- **Library agents** (`examples/idle_agents.rs`): N agents, each with its own identity and its
  own TCP or UDP connection, spread over a few processes. Once all N tunnels are up
  (`revproxy_tunnels` on the admin listener) and have settled, the proxy's resident memory
  over its memory before any agent came, divided by N, and its CPU (all threads, the
  scheduler's nanosecond count) over the window over what it used alone before any agent
  came, per 10,000 tunnels.
- **Reconnect storm**: the proxy is killed (SIGKILL, as a crash) and started again on the
  same ports; the time from its listening again to all N tunnels up, and how many
  handshakes its caps refused meanwhile.
- **Real agents** (`revproxy-agent run`, one process each, `--real`): the same memory and
  CPU figures with that many processes, as issue 33 measured them first.

Prints a Markdown table for docs/benchmarks.md. The proxy keeps its default caps but for
`max_agent_connections` (raised above N): the per-source handshake cap is not lifted, and
every agent here comes from 127.0.0.1, one source, the hardest case for a storm.
"""

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

log = run.log


def build():
    log("building release binaries and examples/idle_agents")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "revproxy", "--bin", "revproxy-agent",
                    "--example", "idle_agents"], check=True)
    return "target/release", "target/release/examples/idle_agents"


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def metric_sum(admin, name):
    """The sum of every series of metric `name` on the admin listener, or None if it is
    unreachable."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Proxy:
    """The release proxy on fixed ports (a restart binds the same ones)."""

    def __init__(self, bindir, work, agents):
        self.bindir, self.work = bindir, work
        self.state = f"{work}/proxy"
        self.agents, self.admin = run.free_port(), run.free_port()
        # Room for every agent on the agent port, where the build can be told (by default it
        # takes an eighth of the open-file limit).
        with open(f"{bindir}/revproxy", "rb") as binary:
            room = f"max_agent_connections = {agents + 1000}\n" if b"max_agent_connections" in binary.read() else ""
        with open(f"{work}/proxy.toml", "w") as f:
            f.write(f'agents = "127.0.0.1:{self.agents}"\nhttp = "127.0.0.1:{run.free_port()}"\n'
                    f'admin = "127.0.0.1:{self.admin}"\n{room}')
        subprocess.run([f"{bindir}/revproxy", "ca", "init", "--state", self.state], check=True,
                       capture_output=True)
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = subprocess.Popen([f"{self.bindir}/revproxy", "serve", "--state", self.state,
                                      "--config", f"{self.work}/proxy.toml"], env=env,
                                     stderr=open(f"{self.work}/proxy-{self.starts}.log", "w"))
        run.wait_port(self.agents, timeout=30)
        return time.time()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def tunnels(self):
        return metric_sum(self.admin, "revproxy_tunnels")


def wait_tunnels(proxy, want, timeout, agents=()):
    """Seconds until the proxy holds `want` tunnels; raises after `timeout`, or at once if
    one of the `agents` processes ended (a QUIC agent's endpoint takes about 3 MiB of
    receive buffers: too many in one machine's memory and the kernel kills one)."""
    start = time.time()
    last = None
    while time.time() - start < timeout:
        ended = [p.args[0] for p in agents if p.poll() is not None]
        if ended:
            raise RuntimeError(f"{len(ended)} agent process(es) ended; {last} of {want} tunnels up")
        last = proxy.tunnels()
        if last is not None and last >= want:
            return time.time() - start
        time.sleep(1)  # a scrape of thousands of agents' series costs the proxy
    raise RuntimeError(f"only {last} of {want} tunnels up after {timeout}s")


def cpu_ns(pid):
    """Nanoseconds the threads of `pid` have run (the scheduler's own count: /proc's
    utime and stime tick in 10 ms, too coarse for a few hundred idle tunnels)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total


def cpu_share(pid, window):
    """The share of a core `pid` used over `window` seconds."""
    cpu0, t0 = cpu_ns(pid), time.time()
    time.sleep(window)
    return (cpu_ns(pid) - cpu0) / 1e9 / (time.time() - t0)


def settle_and_measure(proxy, count, before, settle, window):
    """KiB of proxy memory per tunnel and % of a core per 10,000 tunnels, after `settle`
    seconds, over `window` seconds: both over the proxy's alone (`before`: its RSS in KiB
    and its share of a core with no agent)."""
    rss_before, cpu_before = before
    time.sleep(settle)
    pid = proxy.proc.pid
    cpu = cpu_share(pid, window)
    rss = run.rss_kib(pid)
    return (rss - rss_before) / count, (cpu - cpu_before) * 100 * 10000 / count, rss


def proxy_alone(proxy, window):
    """The fresh proxy's RSS (KiB) and share of a core with no agent, over `window` s."""
    time.sleep(2)
    cpu = cpu_share(proxy.proc.pid, window)
    return run.rss_kib(proxy.proc.pid), cpu


def start_library_agents(example, ids, count, processes, transport, work):
    procs = []
    per = (count + processes - 1) // processes
    for p in range(processes):
        first, n = p * per, min(per, count - p * per)
        if n <= 0:
            break
        procs.append(subprocess.Popen([example, "run", "--dir", ids, "--first", str(first), "--count", str(n),
                                       "--transport", transport],
                                      stdout=subprocess.DEVNULL,
                                      stderr=open(f"{work}/agents-{transport}-{p}.log", "w"),
                                      env=dict(os.environ, RUST_LOG="error")))
    return procs


def start_real_agents(bindir, ids, count, transport, work):
    env = dict(os.environ, RUST_LOG="error")
    os.makedirs(f"{work}/real", exist_ok=True)
    return [subprocess.Popen([f"{bindir}/revproxy-agent", "run", "--state", f"{ids}/{i}", "--transport", transport,
                              "--map", f"idle{i}.bench.test=127.0.0.1:9"],
                             stdout=subprocess.DEVNULL, stderr=open(f"{work}/real/{i}.log", "w"), env=env)
            for i in range(count)]


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=10000, help="library agents (default 10,000)")
    p.add_argument("--processes", type=int, default=4, help="processes the library agents run in")
    p.add_argument("--real", type=int, default=300, help="real revproxy-agent processes (0: none)")
    p.add_argument("--transport", action="append", choices=["h2", "quic"], help="default: both")
    p.add_argument("--settle", type=float, default=15.0, help="seconds after all are up before measuring")
    p.add_argument("--window", type=float, default=60.0, help="seconds CPU is measured over")
    p.add_argument("--bindir", help="use these release binaries (and BINDIR/examples/idle_agents)")
    args = p.parse_args()
    transports = args.transport or ["h2", "quic"]
    nofile = raise_nofile(4 * args.agents + 4096)
    log(f"open-file limit {nofile}")
    if args.bindir:
        bindir, example = args.bindir, f"{args.bindir}/examples/idle_agents"
    else:
        bindir, example = build()
    work = tempfile.mkdtemp(prefix="revproxy-idle-")
    ids = f"{work}/agents"
    proxy = Proxy(bindir, work, max(args.agents, args.real))
    rows = {}
    alone = None
    try:
        proxy.start()
        n = max(args.agents, args.real)
        t = time.time()
        subprocess.run([example, "enroll", "--state", proxy.state, "--server", f"127.0.0.1:{proxy.agents}",
                        "--dir", ids, "--count", str(n)], check=True, stdout=subprocess.DEVNULL)
        log(f"enrolled {n} agents in {time.time() - t:.0f} s")
        for transport in transports:
            row = rows.setdefault(transport, {})
            # Library agents.
            proxy.kill()
            proxy.start()
            # The proxy alone, measured once, on its first start with no agent ever (a
            # restarted proxy may still be resetting the last one's QUIC agents).
            if alone is None:
                alone = proxy_alone(proxy, args.window / 2)
            row["the proxy alone, no agent (% of a core)"] = alone[1] * 100
            agents = start_library_agents(example, ids, args.agents, args.processes, transport, work)
            try:
                up = wait_tunnels(proxy, args.agents, 600, agents)
                log(f"{transport}: {args.agents} tunnels up in {up:.1f} s")
                row["first connect (s)"] = up
                kib, cpu, rss = settle_and_measure(proxy, args.agents, alone, args.settle, args.window)
                log(f"{transport}: {kib:.1f} KiB per tunnel, {cpu:.2f}% of a core per 10,000 (RSS {rss} KiB)")
                row["memory per idle tunnel, library agents (KiB)"] = kib
                row["CPU per 10,000 idle tunnels, library agents (% of a core)"] = cpu
                refused0 = metric_sum(proxy.admin, "revproxy_agent_port_refused_total") or 0
                proxy.kill()
                proxy.start()
                back = wait_tunnels(proxy, args.agents, 600, agents)
                row["all back after a proxy restart (s)"] = back
                # Counters restart with the process.
                refused = metric_sum(proxy.admin, "revproxy_agent_port_refused_total") or 0
                row["handshakes refused during the storm"] = refused
                log(f"{transport}: all {args.agents} back {back:.1f} s after the restarted proxy listened "
                    f"({refused:.0f} refused by its caps; before the restart {refused0:.0f})")
            finally:
                stop(agents)
            # Real agent processes.
            if args.real:
                proxy.kill()
                proxy.start()
                time.sleep(2)
                agents = start_real_agents(bindir, ids, args.real, transport, work)
                try:
                    wait_tunnels(proxy, args.real, 300, agents)
                    kib, cpu, _ = settle_and_measure(proxy, args.real, alone, args.settle, args.window)
                    log(f"{transport}: {args.real} real agents: {kib:.1f} KiB per tunnel, {cpu:.2f}% per 10,000")
                    row[f"memory per idle tunnel, {args.real} agent processes (KiB)"] = kib
                    row[f"CPU per 10,000 idle tunnels, {args.real} agent processes (% of a core)"] = cpu
                finally:
                    stop(agents)
    finally:
        proxy.kill()
    machine = os.cpu_count()
    print(f"\n{args.agents} library agents in {args.processes} processes, {args.real} real agents; "
          f"{args.settle:.0f} s settle, {args.window:.0f} s CPU window; {machine} cores.\n")
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("| figure | " + " | ".join(transports) + " |")
    print("|---|" + "---:|" * len(transports))
    for name in names:
        print(f"| {name} | " + " | ".join(run.fmt(rows[t][name]) if name in rows[t] else "-"
                                           for t in transports) + " |")


if __name__ == "__main__":
    main()
