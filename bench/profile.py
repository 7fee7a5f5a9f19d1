#!/usr/bin/env python3
"""Profile the tunnel's two processes (proxy and agent) under one workload.

    python3 bench/profile.py                          # callgrind, h2, keep-alive requests
    python3 bench/profile.py --tool perf --seconds 8  # perf record -g while wrk runs
    python3 bench/profile.py --transport quic --workload newconn

callgrind counts instructions, which does not depend on how busy the machine is: the
figure to compare before and after a change is "instructions per request, both ends",
from the counters zeroed after a warm-up and dumped after exactly --requests requests
(`ab`, keep-alive or not). perf samples where the CPU time goes while wrk (or iperf3)
runs at full speed. Either way the top functions of each process are printed, and the
profiles are left in the work directory it names.

Workloads: `keepalive` (ab -k, 10 connections, a 100-byte answer from nginx), `newconn`
(ab, a new connection per request), `stream` (iperf3, one stream; perf only).
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the benchmark's setup helpers)


def callgrind_total(path):
    """Instructions (Ir) in a callgrind output file, summed over its parts."""
    total = 0
    with open(path) as f:
        for line in f:
            m = re.match(r"^(?:summary|totals):\s+(\d+)", line)
            if m:
                total = max(total, int(m.group(1)))
    return total


def context_switches(pids):
    """Voluntary and involuntary context switches of every thread of `pids` so far."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    total += sum(int(l.split()[1]) for l in f if "ctxt_switches" in l)
            except FileNotFoundError:
                pass
    return total


def strace_calls(path):
    """System call -> count, from the summary `strace -c` wrote to `path`."""
    calls = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(fields) >= 5 and fields[0].replace(".", "").isdigit() and fields[-1] != "total":
                calls[fields[-1]] = int(fields[3])
    return calls


def top(tool, path, limit):
    if tool == "callgrind":
        out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", path],
                             capture_output=True, text=True).stdout
        # callgrind_annotate counts the threads' start functions as their own cost
        # (everything runs under them): leave those out.
        lines = [l for l in out.splitlines()
                 if (m := re.match(r"^\s*[\d,]+ \(\s*([\d.]+)%\)", l)) and float(m.group(1)) < 90]
        return "\n".join(lines[:limit])
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--stdio", "--percent-limit", "0.5",
                          "--sort", "dso,symbol", "-g", "none"], capture_output=True, text=True).stdout
    # perf pads each line with columns of dashes: keep the share, the object and the symbol.
    lines = [re.sub(r"\s+-\s+-\s*$", "", l).rstrip() for l in out.splitlines()
             if l.strip() and not l.startswith("#")]
    return "\n".join(lines[:limit])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=["callgrind", "perf", "syscalls"], default="callgrind")
    ap.add_argument("--transport", choices=["h2", "quic"], default="h2")
    ap.add_argument("--workload", choices=["keepalive", "newconn", "stream"], default="keepalive")
    ap.add_argument("--requests", type=int, default=20000, help="requests counted (callgrind)")
    ap.add_argument("--seconds", type=int, default=8, help="how long the workload runs (perf)")
    ap.add_argument("--bindir", help="revproxy binaries to profile (default: build target/release)")
    ap.add_argument("--top", type=int, default=25, help="functions listed per process")
    ap.add_argument("--concurrency", type=int, default=10, help="clients at once (ab -c, the keepalive and newconn workloads)")
    args = ap.parse_args()
    if args.tool != "perf" and args.workload == "stream":
        ap.error("the stream workload is measured with --tool perf")

    run.ensure_tools()
    needs = {"callgrind": ("valgrind", "callgrind_annotate"), "perf": ("perf",), "syscalls": ("strace",)}
    for tool in needs[args.tool]:
        if shutil.which(tool) is None:
            package = {"callgrind_annotate": "valgrind", "perf": "linux-perf"}.get(tool, tool)
            sys.exit(f"{tool} is not installed (Debian: {package})")
    bindir = os.path.abspath(args.bindir) if args.bindir else run.build()
    work = tempfile.mkdtemp(prefix="revproxy-profile-")
    os.chmod(work, 0o755)
    procs = run.Procs()
    wrapped = bindir
    if args.tool == "callgrind":
        # The proxy and agent run under valgrind: shims in `wrapped` start them there.
        wrapped = f"{work}/bin"
        os.makedirs(wrapped)
        for name in ("revproxy", "revproxy-agent"):
            shim = f"{wrapped}/{name}"
            with open(shim, "w") as f:
                f.write(f'#!/bin/sh\ncase "$1" in serve|run) exec valgrind --tool=callgrind --quiet '
                        f'--callgrind-out-file={work}/callgrind.{name}.%p "{bindir}/{name}" "$@";; esac\n'
                        f'exec "{bindir}/{name}" "$@"\n')
            os.chmod(shim, 0o755)
    try:
        nginx_port, iperf_port = run.free_port(), run.free_port()
        run.start_nginx(procs, work, nginx_port)
        procs.start(["iperf3", "-s", "-p", str(iperf_port)])
        run.wait_port(iperf_port)
        backends = {"web.bench": nginx_port, "iperf.bench": iperf_port}
        setup = run.start_revproxy(procs, wrapped, work, backends, args.transport)
        pids = dict(zip(("proxy", "agent"), setup["pids"]))
        http = setup["http"]
        keep = ["-k"] if args.workload == "keepalive" else []

        def workload(requests=None):
            if args.workload == "stream":
                return run.iperf(setup["iperf"], args.seconds)
            if requests is None:
                return run.wrk(http, "web.bench", 10, args.seconds)[0]
            r = subprocess.run(["ab", "-q"] + keep + ["-n", str(requests), "-c", str(args.concurrency), "-H", "Host: web.bench",
                                                     f"http://127.0.0.1:{http}/"],
                               capture_output=True, text=True, timeout=3600)
            failed = re.search(r"Failed requests:\s+(\d+)", r.stdout)
            if failed is None or int(failed.group(1)):
                raise RuntimeError(f"ab: {r.stdout[-500:]}{r.stderr[-500:]}")
            return requests

        if args.tool == "syscalls":
            workload(500)
            switches0, cpu0 = context_switches(pids.values()), run.cpu_seconds(setup["pids"])
            workload(args.requests)
            switches = context_switches(pids.values()) - switches0
            cpu = run.cpu_seconds(setup["pids"]) - cpu0
            print(f"{args.transport}, {args.workload}: {args.requests} requests (ab -c {args.concurrency}{' -k' if keep else ''})")
            print(f"  both ends: {switches / args.requests:.2f} context switches and "
                  f"{cpu * 1e6 / args.requests:.1f} us CPU per request (no tracer attached)")
            for role, pid in pids.items():
                out = f"{work}/strace.{role}"
                tracer = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)  # attached to every thread
                workload(args.requests)
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
                calls = strace_calls(out)
                total = sum(calls.values())
                print(f"\n--- {role}: {total / args.requests:.2f} system calls per request ---")
                for name, n in sorted(calls.items(), key=lambda kv: -kv[1])[:args.top]:
                    print(f"  {n / args.requests:8.2f}  {name}")
        elif args.tool == "callgrind":
            workload(500)  # warm-up: buffers, caches, the first connections
            for pid in pids.values():
                subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
            started = time.time()
            workload(args.requests)
            took = time.time() - started
            totals = {}
            for role, pid in pids.items():
                subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
            for role, pid in pids.items():
                name = "revproxy" if role == "proxy" else "revproxy-agent"
                dumps = sorted(f for f in os.listdir(work) if f.startswith(f"callgrind.{name}.{pid}"))
                path = f"{work}/{dumps[-1]}"
                totals[role] = (callgrind_total(path), path)
            print(f"callgrind, {args.transport}, {args.workload}: {args.requests} requests (ab -c {args.concurrency}{' -k' if keep else ''}) "
                  f"in {took:.1f} s under valgrind")
            for role, (ir, path) in totals.items():
                print(f"  {role}: {ir / args.requests:,.0f} instructions per request  ({path})")
            both = sum(ir for ir, _ in totals.values()) / args.requests
            print(f"  both ends: {both:,.0f} instructions per request")
            for role, (_, path) in totals.items():
                print(f"\n--- {role}: top functions (self) ---\n{top('callgrind', path, args.top)}")
        else:
            recorders = []
            for role, pid in pids.items():
                out = f"{work}/perf.{role}.data"
                recorders.append((role, out, subprocess.Popen(
                    ["perf", "record", "-g", "-p", str(pid), "-o", out, "--", "sleep", str(args.seconds + 1)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            time.sleep(0.5)
            if args.workload == "newconn":
                before = run.cpu_seconds(setup["pids"])
                rate = run.ab(http, "web.bench", args.concurrency, 20000)
                used = run.cpu_seconds(setup["pids"]) - before
                print(f"perf, {args.transport}, newconn: {rate:.0f} connections/s, "
                      f"{used * 1e6 / 20000:.0f} us CPU per connection (both ends)")
            else:
                before = run.cpu_seconds(setup["pids"])
                rate = workload()
                used = run.cpu_seconds(setup["pids"]) - before
                unit = "Gbit/s" if args.workload == "stream" else "req/s"
                print(f"perf, {args.transport}, {args.workload}: {rate:.2f} {unit}, {used:.2f} s CPU (both ends)")
            for role, out, rec in recorders:
                rec.wait()
                print(f"\n--- {role}: top symbols (self) ---  ({out})\n{top('perf', out, args.top)}")
        print(f"\nprofiles kept in {work}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
