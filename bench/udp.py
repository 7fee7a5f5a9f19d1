#!/usr/bin/env python3
"""UDP workloads for bench/run.py: datagrams through a granted UDP port (revproxy), a UDP
service (rathole), or straight to the backend (direct).

- `iperf3 -u` at a fixed offered rate, 1,200-byte datagrams: datagrams per second received
  and the loss iperf3's server counts. iperf3 speaks TCP (control) and UDP (data) on one
  port number, so revproxy grants the port for both.
- Ping-pong: one client sends a datagram and waits for its echo, over and over; the round
  trip's median and 99th percentile.

    python3 bench/udp.py echo PORT     # the UDP echo backend, in a process of its own
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time


def free_port_both(ip):
    """A port free for both TCP and UDP on `ip` a moment ago (a grant names its port, so the
    kernel cannot pick it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((ip, 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind((ip, port))
                    return port
                except OSError:
                    continue


def wait_bound(ip, port, timeout=10.0):
    """Waits until something listens on TCP `ip:port` (binding it fails), without connecting."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as t:
            try:
                t.bind((ip, port))
            except OSError:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {ip}:{port} after {timeout}s")


def start_echo(procs, port):
    """A UDP echo server on 127.0.0.1:`port` in its own process."""
    procs.start([sys.executable, os.path.abspath(__file__), "echo", str(port)])
    deadline = time.time() + 10
    while time.time() < deadline:
        if ping_pong("127.0.0.1", port, 1, timeout=0.2) is not None:
            return
    raise RuntimeError(f"the UDP echo server on {port} does not answer")


def serve_echo(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        while True:
            data, addr = s.recvfrom(65536)
            s.sendto(data, addr)


def iperf_udp(host, port, mbit, seconds, length=1200):
    """Datagrams per second the server received, and the percentage it counted lost, for
    `iperf3 -u` offering `mbit` Mbit/s of `length`-byte datagrams."""
    r = subprocess.run(["iperf3", "-c", host, "-p", str(port), "-u", "-b", f"{mbit}M", "-l", str(length),
                        "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    total = data["end"]["sum"]
    received = total["packets"] - total["lost_packets"]
    return received / total["seconds"], 100.0 * total["lost_packets"] / max(total["packets"], 1)


def ping_pong(host, port, count, timeout=1.0):
    """(p50, p99) round trips in ms of `count` echoed 64-byte datagrams, one at a time, from
    one client address (one flow); None if any went unanswered within `timeout`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        times = []
        for i in range(count):
            payload = i.to_bytes(8, "big") * 8
            start = time.perf_counter()
            s.send(payload)
            try:
                while s.recv(65536) != payload:
                    pass
            except OSError:
                return None
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def figures(seconds, pings):
    """The UDP figures as (name, fn) pairs for run.py; fn takes a setup and returns a dict
    (or None where the setup carries no UDP: a build before granted UDP ports)."""

    def rate(mbit):
        def run(s):
            udp = s.get("udp")
            if not udp:
                return None
            per_second, lost = iperf_udp(udp["host"], udp["iperf"], mbit, seconds)
            base = f"UDP at {mbit} Mbit/s offered"
            return {f"{base}: datagrams/s received": per_second, f"{base}: loss (%)": lost}
        return run

    def latency(s):
        udp = s.get("udp")
        if not udp:
            return None
        got = ping_pong(udp["host"], udp["echo"], pings)
        if got is None:
            raise RuntimeError("a ping went unanswered")
        return {"UDP ping-pong: p50 round trip (ms)": got[0], "UDP ping-pong: p99 round trip (ms)": got[1]}

    return [
        ("UDP at 100 Mbit/s offered", rate(100)),
        ("UDP at 1000 Mbit/s offered", rate(1000)),
        ("UDP ping-pong", latency),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        serve_echo(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
