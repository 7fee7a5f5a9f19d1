#!/usr/bin/env python3
"""The control plane at scale: what one change costs with 1,000, 10,000 and 100,000 agents'
worth of records in the CA state (issue 29), for this build and, with --baseline, an
earlier one, side by side.

    python3 bench/scale.py                       # 1,000 / 10,000 / 100,000 agents
    python3 bench/scale.py --agents 1000,20000   # other sizes
    python3 bench/scale.py --baseline DIR        # also the binaries in DIR (before/after)
    python3 bench/scale.py --store postgres      # on a PostgreSQL the bench starts

Each agent's worth is three records, as an enrolled agent leaves them: the token it traded,
its certificate and its grant. They are written straight into a new CA's store (rows in
state.db, or state.json for a build from before the embedded store), and with
`--store postgres` moved into a database of their own with `revproxy store migrate`; then,
with the real binaries on 127.0.0.1:
- `token create`: the median of five, each a new process (what an operator's script pays);
- the proxy's start: from exec until its `/ready` answers 200 (the state loaded, every
  listener up), and its resident memory then;
- an enrollment: `revproxy-agent enroll` with a fresh token, the whole command;
- a renewal: one `POST /v1/renew` with the enrolled agent's certificate (TLS included),
  after its record was aged in the store (a certificate is renewable only after half its
  lifetime: the record says it was issued two hours ago for three);
- `token list` of every token, its output thrown away: its time and peak memory;
- a revocation reaching a live tunnel: from starting `revproxy cert revoke` until the
  agent's `/ready` says it has no tunnel (the proxy closed it).

It prints a Markdown table for docs/benchmarks.md. Everything it starts is stopped when it
exits.
"""

import argparse
import glob
import http.client
import json
import os
import shutil
import sqlite3
import ssl
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


class Postgres:
    """A PostgreSQL server of the bench's own, in `work`, on a free loopback port."""

    def __init__(self, work):
        bins = [b for b in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(f"{b}/postgres")]
        if not bins or not shutil.which("psql"):
            raise SystemExit("PostgreSQL is not installed: bash scripts/test-tools.sh installs it")
        self.bin, self.port, self.dir = bins[0], run.free_port(), f"{work}/pg"
        os.makedirs(self.dir)
        os.chmod(work, 0o711)  # the server runs as postgres
        os.chmod(self.dir, 0o777)
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(as_pg + [f"{self.bin}/initdb", "--auth=trust", "--username=postgres",
                                "-D", f"{self.dir}/data"], check=True, capture_output=True)
        self.proc = subprocess.Popen(as_pg + [f"{self.bin}/postgres", "-D", f"{self.dir}/data",
                                              "-c", "listen_addresses=127.0.0.1",
                                              "-c", f"unix_socket_directories={self.dir}",
                                              "-p", str(self.port)],
                                     stderr=open(f"{work}/postgres.log", "w"))
        run.wait_until("PostgreSQL", lambda: self.psql("SELECT 1", "postgres", check=False) == "1", 60)

    def psql(self, sql, db, check=True):
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", db, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr.strip()}")
        return out.stdout.strip()

    def database(self, name):
        """A new database; its store URL."""
        self.psql(f"CREATE DATABASE {name}", "postgres")
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def size(self, db):
        """Bytes the store's tables and indexes take."""
        return int(self.psql("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                             "JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE n.nspname = 'revproxy' AND c.relkind = 'r'", db))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def age_live_cert(state_dir, pg, db):
    """Makes the store's record of agent `live`'s certificate say it was issued two hours
    ago for three, so that it is due for renewal now (the certificate itself is unchanged)."""
    now = int(time.time())
    nb, na = now - 2 * 3600, now + 3600
    if pg:
        has_rows = pg.psql("SELECT count(*) FROM information_schema.tables "
                           "WHERE table_schema = 'revproxy' AND table_name = 'certs'", db) == "1"
        if has_rows:
            pg.psql(f"UPDATE revproxy.certs SET not_after = {na}, doc = doc || "
                    f"jsonb_build_object('not_before', {nb}, 'not_after', {na}) WHERE agent = 'live'", db)
        else:
            pg.psql("UPDATE revproxy.state SET version = version + 1, doc = jsonb_set(doc, '{certs}', "
                    "(SELECT jsonb_agg(CASE WHEN c->>'agent' = 'live' THEN c || jsonb_build_object("
                    f"'not_before', {nb}, 'not_after', {na}) ELSE c END ORDER BY o) "
                    "FROM jsonb_array_elements(doc->'certs') WITH ORDINALITY e(c, o)))", db)
        return
    db_file, doc = f"{state_dir}/state.db", f"{state_dir}/state.json"
    if os.path.exists(db_file):
        conn = sqlite3.connect(db_file)
        with conn:
            conn.execute("UPDATE certs SET not_after = ?, doc = json_set(doc, '$.not_before', ?, "
                         "'$.not_after', ?) WHERE agent = 'live'", (na, nb, na))
        conn.close()
        return
    with open(doc) as f:
        state = json.load(f)
    for cert in state["certs"]:
        if cert["agent"] == "live":
            cert["not_before"], cert["not_after"] = nb, na
    with open(f"{doc}.tmp", "w") as f:
        json.dump(state, f)
    os.rename(f"{doc}.tmp", doc)


def renew(agent_dir, port, work):
    """One `POST /v1/renew` as the agent in `agent_dir` (a CSR for a fresh key made first);
    the seconds it took, TLS handshake included."""
    key, csr = f"{work}/renew.key", f"{work}/renew.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=live"],
                   check=True, capture_output=True)
    with open(csr) as f:
        body = json.dumps({"csr": f.read()}).encode()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(f"{agent_dir}/ca.crt")
    ctx.check_hostname = False  # the chain is verified; the agent checks the pin
    ctx.load_cert_chain(f"{agent_dir}/agent.crt", f"{agent_dir}/agent.key")
    ctx.set_alpn_protocols(["http/1.1"])
    started = time.perf_counter()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.request("POST", "/v1/renew", body, {"content-type": "application/json"})
    answer = conn.getresponse()
    text = answer.read()
    took = time.perf_counter() - started
    conn.close()
    if answer.status != 200:
        raise RuntimeError(f"renewal answered {answer.status}: {text[:300]!r}")
    return took


# Runs a command from a fresh, small process and prints its peak resident KiB: Linux keeps
# a process's peak across fork and exec, so a command started from this bench (which holds
# the records it wrote) would report the bench's own size.
PEAK = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(proc.stderr.read().decode())
print(usage.ru_maxrss if status == 0 else -1)
"""


def listed(args, env):
    """Runs a listing with its output thrown away: (seconds, peak resident KiB)."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK] + args, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    peak = int(out.stdout.strip() or -1)
    if peak < 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {out.stderr.strip()}")
    return took, peak


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


def measure(bindir, agents, work, pg=None):
    """The figures of one build at one size (on `pg`, a Postgres, when given)."""
    env = dict(os.environ, RUST_LOG="warn")
    env.pop("REVPROXY_STORE", None)
    state = f"{work}/proxy"
    proxy_bin, agent_bin = f"{bindir}/revproxy", f"{bindir}/revproxy-agent"
    subprocess.run([proxy_bin, "ca", "init", "--state", state], check=True, env=env, capture_output=True)
    size = fill(state, agents)
    db = os.path.basename(work).replace("-", "_")
    if pg:
        url = pg.database(db)
        subprocess.run([proxy_bin, "store", "migrate", "--from", state, "--to", url], check=True,
                       env=env, capture_output=True)
        env["REVPROXY_STORE"] = url
        size = pg.size(db)
    creates = [timed([proxy_bin, "token", "create", "--state", state, "--name", f"new-{n}", "--host",
                      f"new-{n}.example.com", "--server", "127.0.0.1:1"], env)[0] for n in range(5)]
    list_time, list_rss = listed([proxy_bin, "token", "list", "--state", state], env)
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
        age_live_cert(state, pg, db)
        renewal = renew(f"{work}/agent", port, work)
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
        "renewal (ms)": renewal * 1000,
        "revocation to tunnel cut (ms)": revoke * 1000,
        "token list, every token (ms)": list_time * 1000,
        "token list, peak memory (MiB)": list_rss / 1024,
        "proxy start (ms)": start * 1000,
        "proxy memory after start (MiB)": rss,
        "state stored (MB)": size / 1e6,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="1000,10000,100000",
                    help="agents' worth of records, comma-separated (default 1000,10000,100000)")
    ap.add_argument("--baseline", metavar="DIR", help="also the revproxy binaries in DIR (an earlier build)")
    ap.add_argument("--store", choices=["embedded", "postgres"], default="embedded",
                    help="where the CA state lives (default: the embedded store)")
    args = ap.parse_args()
    sizes = [int(n) for n in args.agents.split(",")]
    builds = [("this build", run.build())]
    if args.baseline:
        builds.append(("baseline", os.path.abspath(args.baseline)))
    results = {}
    with tempfile.TemporaryDirectory(prefix="revproxy-scale-") as work:
        pg = Postgres(work) if args.store == "postgres" else None
        try:
            for n in sizes:
                for label, bindir in builds:
                    run.log(f"{label}: {n} agents' worth of records ({args.store} store)")
                    dir = f"{work}/{label.replace(' ', '-')}-{n}"
                    os.makedirs(dir)
                    results[(label, n)] = measure(bindir, n, dir, pg)
        finally:
            if pg:
                pg.stop()
    figures = list(next(iter(results.values())).keys())
    head = ["figure"] + [f"{label}, {n:,} agents" for n in sizes for label, _ in builds]
    print("| " + " | ".join(head) + " |")
    print("|---" + "|---:" * (len(head) - 1) + "|")
    for fig in figures:
        row = [fig] + [run.fmt(results[(label, n)][fig]) for n in sizes for label, _ in builds]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
