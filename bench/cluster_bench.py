"""Scale-out: join rebalance time and failover time of daemons sharing accounts through leases.

Starts its own PostgreSQL 15 and Dovecot (devtools.devservers), puts ``--accounts`` accounts in
the store, and runs real daemons (``mailingestd`` subprocesses, one worker each, own runtime_dir
and node_id) with ``cluster.lease_time`` = ``--lease`` (renewals every third of it) and
``cluster.release_per_round`` = ``--release``. Connect limits are set high, so the figures are
the lease protocol's, not the token bucket's.

1. ``--nodes - 1`` nodes start and split the accounts; then the last node joins. *Join rebalance*
   = from its start until every node holds its fair share within 10 % (leases), and until the
   joiner has every account it holds in IDLE (connections).
2. One node is SIGKILLed with its children. *Failover* = from the kill until no lease is in the
   dead node's name and every account is held by a survivor, and until the survivors idle on
   every account again.

    .venv/bin/python -m bench.cluster_bench [--nodes 3] [--accounts 3000] [--lease 6] [--release 50]

Prints one line and writes bench/results/<date>/cluster.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psycopg

from mailingestd.config import AccountConfig
from devtools.devservers import Dovecot, Postgres
from mailingestd.store.store import open_store

BIN = Path(sys.executable).parent
PASSWORD_ENV = "BENCH_IMAP_PASSWORD"


class Node:
    """One daemon of the cluster, started the way an operator starts it."""

    def __init__(self, root: Path, name: str, url: str, lease: float, release: int) -> None:
        self.name = name
        self.root = root / name
        self.root.mkdir(parents=True)
        self.config = self.root / "mailingestd.toml"
        self.config.write_text(f"""
[daemon]
workers = 1
node_id = "{name}"
runtime_dir = "{self.root / 'run'}"
state_dir = "{self.root / 'state'}"
heartbeat_timeout = "30s"
[store]
url = "{url}"
[imap]
threads = 32
[cluster]
lease_time = "{lease:g}s"
release_per_round = {release}
[limits]
connects_per_minute = 100000
max_connections_per_server = 100000
[metrics]
textfile = ""
""")
        self.log = open(self.root / "mailingestd.log", "ab")
        self.proc = subprocess.Popen([str(BIN / "mailingestd"), "--allow-root", "--config", str(self.config)],
                                     env=dict(os.environ, **{PASSWORD_ENV: "secret",
                                                             "MAILINGESTD_SECRETS_ALLOWED_ENV": f'["{PASSWORD_ENV}"]'}),
                                     stdout=self.log, stderr=self.log)

    def status(self) -> dict[str, Any] | None:
        result = subprocess.run([str(BIN / "mailingestctl"), "--config", str(self.config), "status", "--json"],
                                capture_output=True, text=True, timeout=20)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def idling(self) -> int:
        status = self.status()
        return int(status["traffic"]["idle_connections"]) if status else 0

    def kill(self) -> None:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as handle:
                children = [int(p) for p in handle.read().split()]
        except OSError:
            children = []
        for pid in [*children, self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def leases_by_node(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        try:
            rows = conn.execute("SELECT owner, count(*) FROM leases WHERE owner IS NOT NULL AND expires_at > now() "
                                "GROUP BY owner").fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {owner: int(count) for owner, count in rows}


def balanced(url: str, names: list[str], total: int) -> bool:
    split = leases_by_node(url)
    share = total / len(names)
    return (sum(split.get(n, 0) for n in names) == total and not set(split) - set(names)
            and all(abs(split.get(n, 0) - share) <= 0.1 * share for n in names))


def wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Seconds until ``predicate`` holds (monotonic), or an error after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"cluster_bench: timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=3000)
    parser.add_argument("--lease", type=float, default=6.0, help="cluster.lease_time in seconds")
    parser.add_argument("--release", type=int, default=50, help="cluster.release_per_round")
    args = parser.parse_args()
    total = args.accounts
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        root = Path(tmp)
        postgres = Postgres(root / "postgres")
        dovecot = Dovecot(root / "dovecot", users=0)
        postgres.start()
        dovecot.start()
        nodes: list[Node] = []
        try:
            url = postgres.create_database("cluster_bench")
            store = open_store(url, 1, 2)
            for i in range(total):
                store.upsert_account(AccountConfig(id=f"acct{i:05d}", host="127.0.0.1", port=dovecot.port, tls="none",
                                                   username=f"bench{i}", password_env=PASSWORD_ENV))
            store.close()
            names = [f"node-{i}" for i in range(args.nodes)]
            nodes = [Node(root, name, url, args.lease, args.release) for name in names[:-1]]
            wait(lambda: balanced(url, names[:-1], total), 300, "the first nodes' split")
            wait(lambda: sum(n.idling() for n in nodes) == total, 300, "every account idling", 1.0)

            joiner = Node(root, names[-1], url, args.lease, args.release)
            nodes.append(joiner)
            join_leases = wait(lambda: balanced(url, names, total), 300, "the joiner's share")
            join_idle = join_leases + wait(
                lambda: joiner.idling() >= leases_by_node(url).get(joiner.name, total), 300, "the joiner idling", 0.5)
            wait(lambda: sum(n.idling() for n in nodes) == total, 120, "every account idling", 1.0)

            victim, survivors = nodes[0], nodes[1:]
            victim.kill()
            failover_leases = wait(lambda: leases_by_node(url).get(victim.name, 0) == 0
                                   and sum(leases_by_node(url).values()) == total, 300, "the failover")
            failover_idle = failover_leases + wait(lambda: sum(n.idling() for n in survivors) == total, 300,
                                                   "the survivors idling on every account", 0.5)
        finally:
            for node in nodes:
                node.stop()
            dovecot.stop()
            postgres.stop(mode="immediate")
    result = {
        "bench": "cluster", "date": datetime.date.today().isoformat(), "host": platform.node(),
        "cpus": len(os.sched_getaffinity(0)), "nodes": args.nodes, "accounts": total,
        "lease_time_s": args.lease, "release_per_round": args.release,
        "join_rebalance_leases_s": round(join_leases, 1), "join_rebalance_connected_s": round(join_idle, 1),
        "failover_leases_s": round(failover_leases, 1), "failover_connected_s": round(failover_idle, 1),
    }
    print(f"cluster: {args.nodes} nodes, {total} accounts, lease {args.lease:g}s: join rebalance "
          f"{join_leases:.1f}s (leases) / {join_idle:.1f}s (connected); failover {failover_leases:.1f}s (leases) / "
          f"{failover_idle:.1f}s (connected)")
    out = Path(__file__).resolve().parent / "results" / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
