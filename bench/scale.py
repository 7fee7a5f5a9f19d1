#!/usr/bin/env python3
"""The control plane at scale: what one change costs with 1,000, 10,000 and 100,000 agents'
worth of records in the CA state (issue 29), for this build and, with --baseline, an
earlier one, side by side.

    python3 bench/scale.py                       # 1,000 / 10,000 / 100,000 agents
    python3 bench/scale.py --agents 1000,20000   # other sizes
    python3 bench/scale.py --baseline DIR        # also the binaries in DIR (before/after)

Each agent's worth is three records, as an enrolled agent leaves them: the token it traded,
its certificate and its grant. They are written straight into a new CA's store (rows in
state.db, or state.json for a build from before the embedded store), then, with the real
binaries on 127.0.0.1:
- `token create`: the median of five, each a new process (what an operator's script pays);
- the proxy's start: from exec until its `/ready` answers 200 (the state loaded, every
  listener up), and its resident memory then;
- an enrollment: `revproxy-agent enroll` with a fresh token, the whole command;
- a revocation reaching a live tunnel: from starting `revproxy cert revoke` until the
  agent's `/ready` says it has no tunnel (the proxy closed it).
Renewal is a transaction like enrollment's (one certificate read, one written); it is not
timed here because a certificate is renewable only after half its lifetime.

It prints a Markdown table for docs/benchmarks.md. Everything it starts is stopped when it
exits.
"""

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

DAY = 24 * 3600
PEM = "-----BEGIN CERTIFICATE-----\nbench\n-----END CERTIFICATE-----\n"


def records(agents, now):
    """`agents` agents' worth of records: (token, certificate, grant) each."""
    for i in range(agents):
        name = f"agent-{i}"
        host = f"{name}.example.com"
        serial = f"{i:040x}"
        token = {"id": f"{i:016x}", "agent": name, "hosts": [host], "secret_sha256": "00" * 32,
                 "created": now - 3600, "expires": now, "cert_ttl_secs": DAY, "revoked": False,
                 "used": {"at": now - 3500, "spki_sha256": "11" * 32, "serial": serial}}
        cert = {"serial": serial, "agent": name, "hosts": [host], "not_before": now - 3560,
                "not_after": now - 3500 + DAY, "revoked_at": None, "pem": PEM}
        yield name, token, cert, {"hosts": [host]}


def fill(state_dir, agents):
    """Writes the records into the store `ca init` made; returns its size in bytes."""
    now = int(time.time())
    db, doc = f"{state_dir}/state.db", f"{state_dir}/state.json"
    if os.path.exists(db):
        conn = sqlite3.connect(db)
        with conn:  # one transaction
            for name, token, cert, grant in records(agents, now):
                conn.execute("INSERT INTO tokens (id, agent, ended, doc) VALUES (?, ?, ?, ?)",
                             (token["id"], name, token["used"]["at"], json.dumps(token)))
                conn.execute("INSERT INTO certs (serial, agent, not_after, doc) VALUES (?, ?, ?, ?)",
                             (cert["serial"], name, cert["not_after"], json.dumps(cert)))
                conn.execute("INSERT INTO grants (agent, doc) VALUES (?, ?)", (name, json.dumps(grant)))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        return os.path.getsize(db)
    with open(doc) as f:
        state = json.load(f)
    for name, token, cert, grant in records(agents, now):
        state["tokens"].append(token)
        state["certs"].append(cert)
        state["agents"][name] = grant
    with open(doc, "w") as f:
        json.dump(state, f)
    return os.path.getsize(doc)


def timed(args, env):
    started = time.perf_counter()
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {out.stderr.strip()}")
    return time.perf_counter() - started, out.stdout.strip()


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def measure(bindir, agents, work):
    """The figures of one build at one size."""
    env = dict(os.environ, RUST_LOG="warn")
    state = f"{work}/proxy"
    proxy_bin, agent_bin = f"{bindir}/revproxy", f"{bindir}/revproxy-agent"
    subprocess.run([proxy_bin, "ca", "init", "--state", state], check=True, env=env, capture_output=True)
    size = fill(state, agents)
    creates = [timed([proxy_bin, "token", "create", "--state", state, "--name", f"new-{n}", "--host",
                      f"new-{n}.example.com", "--server", "127.0.0.1:1"], env)[0] for n in range(5)]
    procs = run.Procs()
    try:
        port, admin, agent_admin = run.free_port(), run.free_port(), run.free_port()
        started = time.perf_counter()
        proxy = procs.start([proxy_bin, "serve", "--state", state, "--agents", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}"], env=env,
                            stderr=open(f"{work}/proxy.log", "w"))
        run.wait_until("the proxy's /ready", lambda: ready(admin), 600)
        start = time.perf_counter() - started
        rss = run.rss_kib(proxy.pid) / 1024
        _, token = timed([proxy_bin, "token", "create", "--state", state, "--name", "live", "--host",
                          "live.example.com", "--server", f"127.0.0.1:{port}"], env)
        enroll, _ = timed([agent_bin, "enroll", "--state", f"{work}/agent", "--token", token], env)
        procs.start([agent_bin, "run", "--state", f"{work}/agent", "--admin", f"127.0.0.1:{agent_admin}",
                     "--map", f"live.example.com=127.0.0.1:{run.free_port()}"], env=env,
                    stderr=open(f"{work}/agent.log", "w"))
        run.wait_until("the live agent's tunnel", lambda: ready(agent_admin), 120)
        started = time.perf_counter()
        timed([proxy_bin, "cert", "revoke", "--state", state, "live"], env)
        deadline = time.time() + 120
        while ready(agent_admin):
            if time.time() > deadline:
                raise RuntimeError("the revoked agent's tunnel stayed up for 120 s")
            time.sleep(0.01)
        revoke = time.perf_counter() - started
    finally:
        procs.stop()
    return {
        "token create (ms)": statistics.median(creates) * 1000,
        "enrollment (ms)": enroll * 1000,
        "revocation to tunnel cut (ms)": revoke * 1000,
        "proxy start (ms)": start * 1000,
        "proxy memory after start (MiB)": rss,
        "state on disk (MB)": size / 1e6,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="1000,10000,100000",
                    help="agents' worth of records, comma-separated (default 1000,10000,100000)")
    ap.add_argument("--baseline", metavar="DIR", help="also the revproxy binaries in DIR (an earlier build)")
    args = ap.parse_args()
    sizes = [int(n) for n in args.agents.split(",")]
    builds = [("this build", run.build())]
    if args.baseline:
        builds.append(("baseline", os.path.abspath(args.baseline)))
    results = {}
    with tempfile.TemporaryDirectory(prefix="revproxy-scale-") as work:
        for n in sizes:
            for label, bindir in builds:
                run.log(f"{label}: {n} agents' worth of records")
                dir = f"{work}/{label.replace(' ', '-')}-{n}"
                os.makedirs(dir)
                results[(label, n)] = measure(bindir, n, dir)
    figures = list(next(iter(results.values())).keys())
    head = ["figure"] + [f"{label}, {n:,} agents" for n in sizes for label, _ in builds]
    print("| " + " | ".join(head) + " |")
    print("|---" + "|---:" * (len(head) - 1) + "|")
    for fig in figures:
        row = [fig] + [run.fmt(results[(label, n)][fig]) for n in sizes for label, _ in builds]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
