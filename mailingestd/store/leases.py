"""Scale-out: several daemons share the accounts through leases in PostgreSQL.

Each daemon is a node (``daemon.node_id``, default the host name). The scheduler process of every
node runs a :class:`LeaseManager` round every third of ``cluster.lease_time``, one short
transaction on the database clock (``now()``), never on the hosts' clocks:

1. heartbeat: the node's row in ``nodes`` (capacity, state, ``heartbeat_at``); a node's first
   round stops after the survey (step 3) and its second, the first to claim, follows 1 s later;
2. renew: every lease this node owns gets ``expires_at = now() + lease_time``, in one UPDATE;
3. balance: the fair share is ``ceil(accounts * capacity / sum of live capacities)`` over the
   nodes that are running and heartbeated within one lease time. Below it, the node claims free
   or expired leases with ``SELECT ... FOR UPDATE SKIP LOCKED`` (nodes claiming at once never wait
   on each other, and never take the same row). Above it, it gives back at most
   ``cluster.release_per_round`` accounts per round, in two steps: the accounts leave its scheduler
   (the worker LOGs OUT) in one round, and their leases are freed in the next, so the new holder
   does not connect while the old connection is still up. A joining node therefore fills at
   ``(nodes - 1) * release_per_round`` accounts per round, not in one connection storm.

Only accounts in :meth:`LeaseManager.holds` reach the planner, so only the lease holder connects.
A node whose renewals fail drops every account once its last successful renewal is older than
``lease_time - lease_time / 4`` (measured on the monotonic clock from *before* that renewal
started), so it has stopped before any other node may claim its leases.

Fencing: that local deadline is not enough for a process that was paused (SIGSTOP, a VM freeze,
a partition) in the middle of a fetch. :class:`Fence` runs inside every store transaction that
moves a checkpoint (``Store.commit_batch``, ``Store.start_mailbox``, ``Store.open_mailbox`` when
it starts a folder) and checks, on the database clock, that this node still owns the account's
lease and that it has not expired. It reads the lease row ``FOR KEY SHARE``: a claimer's ``FOR
UPDATE SKIP LOCKED`` skips a row while a commit that passed the check is still open, so a lease can
never change hands under a committing batch. The weakest lock that does so: the node's own
renewals and releases (``UPDATE``s of no key column) do not wait for its open batches, which under
a backlog follow each other without a gap (with ``FOR SHARE`` a renewal queued behind them until
its statement timeout, and a node whose renewals fail drops every lease). The new holder starts from the committed checkpoint; rows
the old holder committed are no-ops for it.

Why a ``leases`` table rather than columns on ``accounts``: renewing thousands of leases every
few seconds would rewrite the wide accounts rows (settings, ciphertexts) and hold row locks that
an operator's ``UPDATE accounts`` would queue behind; the accounts triggers watch settings
columns, and keeping lease traffic off that table keeps it from ever looking like an account
change. ``leases`` rows are narrow, one per account (created by the round, removed by ``ON DELETE
CASCADE``).

With the embedded SQLite store there is one node: :class:`SingleNode` holds every account.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
from typing import Any

from ..config import Config
from .base import StoreBase
from .store import Store, StoreError

log = logging.getLogger(__name__)

SINGLE_NODE = "single-node (sqlite)"
LEASED = "postgresql leases"
NODE_FORGET_AFTER = 3600.0  # a dead node's row stays visible in status this long (seconds)
# The first round only heartbeats and surveys (so nodes started together see each other before
# claiming); the second, which claims, follows this soon rather than a whole renew_every later.
FIRST_CLAIM_AFTER = 1.0

def fair_share(accounts: int, capacity: float, other_capacity: float) -> int:
    """This node's target: its capacity's share of the accounts, rounded up so that the live
    nodes' targets together cover every account."""
    if capacity <= 0:
        return 0
    return math.ceil(accounts * capacity / (capacity + other_capacity))


class LeaseLost(StoreError):
    """This node does not hold the account's lease (any more): the transaction was rolled back."""


def node_id(config: Config) -> str:
    return config.daemon.node_id or socket.gethostname()


def clustered(config: Config) -> bool:
    return config.store_url.startswith(("postgresql://", "postgres://"))


class Fence:
    """Checks, inside a store transaction, that this node holds an account's unexpired lease.

    The transaction also gets an ``idle_in_transaction_session_timeout`` of a third of the lease:
    a process paused in the middle of a commit would otherwise keep the lease row (and the mailbox
    row) locked for as long as it is paused, and no other node could take the account over. The
    server ends such a session; the paused process finds its connection gone when it resumes.
    """

    def __init__(self, node: str, lease_time: float) -> None:
        self.node = node
        self.idle_timeout_ms = max(1000, int(lease_time * 1000 / 3))

    def check(self, store: StoreBase, cur: Any, account_id: str) -> None:
        """Raise :class:`LeaseLost` unless this node holds ``account_id``'s lease; ``cur`` is the
        transaction of ``store`` that is about to commit (one statement: the timeout is set
        transaction-locally by ``set_config`` in the same SELECT)."""
        row = store.execute(cur, "SELECT owner, expires_at > now(), "
                                 "set_config('idle_in_transaction_session_timeout', ?, true) "
                                 "FROM leases WHERE account_id = ? FOR KEY SHARE",
                            (str(self.idle_timeout_ms), account_id)).fetchone()
        if row is None or row[0] != self.node or not row[1]:
            owner = row[0] if row else None
            log.warning("event=lease_lost account=%s node=%s owner=%s expired=%s action=rollback",
                        account_id, self.node, owner, bool(row and not row[1]))
            raise LeaseLost(f"account {account_id}: lease not held by node {self.node} (owner {owner})")


def fence_for(config: Config) -> Fence | None:
    """The fence a process that commits checkpoints installs on its store (None on SQLite)."""
    return Fence(node_id(config), config.cluster.lease_time) if clustered(config) else None


class SingleNode:
    """The embedded store: this node holds every account."""

    def hurry(self) -> None:
        """Nothing to claim: this node holds every account."""

    def tick(self, now: float, state: str) -> bool:
        return False

    def holds(self, account_id: str) -> bool:
        return True

    def detail(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


class LeaseManager:
    """One node's leases: heartbeat, renew, claim and release, one round per ``renew_every``."""

    def __init__(self, store: Store, node: str, lease_time: float, capacity: float, release_per_round: int,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.node = node
        self.lease_time = lease_time
        self.renew_every = lease_time / 3
        self.margin = lease_time / 4
        self.capacity = capacity
        self.release_per_round = release_per_round
        self.rng = rng or random.Random()
        self.held: set[str] = set()
        self.releasing: set[str] = set()  # dropped from the scheduler; leases freed next round
        self.valid_until = 0.0
        self.next_round = 0.0
        self.rounds = 0
        self.failures = 0
        self.target = 0
        self.total = 0
        self.nodes: list[dict[str, Any]] = []
        self.last_round: float | None = None

    # --- the scheduler's view --------------------------------------------------------------------
    def holds(self, account_id: str) -> bool:
        return account_id in self.held

    def hurry(self) -> None:
        """Run the next lease round at the next tick (accounts changed: claim new ones now)."""
        self.next_round = 0.0

    def tick(self, now: float, state: str) -> bool:
        """Run a round when due; True when the set of held accounts changed."""
        # Called on every turn of the scheduler's loop: nothing here may cost O(accounts) unless
        # a round runs or the leases lapse (copying and comparing 10,000 ids each turn took a
        # third of the scheduler's CPU).
        changed = False
        if now >= self.next_round:
            before = set(self.held)
            self.next_round = now + self.renew_every
            self.round(now, state)
            if self.rounds == 1:
                self.next_round = now + min(self.renew_every, FIRST_CLAIM_AFTER)
            changed = self.held != before
        if self.held and now >= self.valid_until:
            log.error("event=leases_dropped node=%s count=%d reason=renewal_overdue", self.node, len(self.held))
            self.held = set()
            changed = True
        return changed

    # --- one round --------------------------------------------------------------------------------
    def round(self, started: float, state: str) -> None:
        try:
            with self.store.transaction() as cur:
                # A round must end well inside the lease it renews.
                self.store.execute(cur, f"SET LOCAL statement_timeout = {max(1, int(self.renew_every * 1000))}")
                self._heartbeat(cur, state)
                self._free(cur, self.releasing)
                released = len(self.releasing)
                self.releasing = set()
                if state == "drained":
                    self._free(cur, self._owned(cur))
                    owned: set[str] = set()
                else:
                    owned = self._renew(cur)
                self._survey(cur, state)
                if state == "running" and self.rounds > 0:
                    owned |= self._claim(cur, self.target - len(owned))
        except StoreError as exc:
            self.failures += 1
            log.error("event=lease_renewal_failed node=%s held=%d error=%s", self.node, len(self.held), exc)
            return
        self.rounds += 1
        self.last_round = started
        self.valid_until = started + self.lease_time - self.margin
        surplus = len(owned) - self.target
        if surplus > 0 and state == "running":
            self.releasing = set(self.rng.sample(sorted(owned), min(surplus, self.release_per_round)))
        if released or self.releasing or owned != self.held:
            log.info("event=leases node=%s held=%d target=%d gained=%d releasing=%d released=%d",
                     self.node, len(owned - self.releasing), self.target, len(owned - self.held),
                     len(self.releasing), released)
        self.held = owned - self.releasing

    def _heartbeat(self, cur: Any, state: str) -> None:
        self.store.execute(cur, """
            INSERT INTO nodes (node_id, capacity, state, host, pid, lease_time, started_at, heartbeat_at)
            VALUES (?, ?, ?, ?, ?, ?, now(), now())
            ON CONFLICT (node_id) DO UPDATE SET capacity = excluded.capacity, state = excluded.state,
                host = excluded.host, pid = excluded.pid, lease_time = excluded.lease_time, heartbeat_at = now()""",
                           (self.node, self.capacity, state, socket.gethostname(), os.getpid(), self.lease_time))
        # Every account gets its lease row (new accounts); deleted ones cascade away.
        self.store.execute(cur, """INSERT INTO leases (account_id) SELECT a.id FROM accounts a
                                   WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.account_id = a.id)
                                   ON CONFLICT (account_id) DO NOTHING""")

    def _owned(self, cur: Any) -> set[str]:
        self.store.execute(cur, "SELECT account_id FROM leases WHERE owner = ?", (self.node,))
        return {r[0] for r in cur.fetchall()}

    def _renew(self, cur: Any) -> set[str]:
        # Also an expired lease still in our name: nobody took it, so nobody committed meanwhile.
        self.store.execute(cur, """UPDATE leases SET expires_at = now() + make_interval(secs => ?),
                                   renewed_at = now() WHERE owner = ? RETURNING account_id""",
                           (self.lease_time, self.node))
        return {r[0] for r in cur.fetchall()}

    def _free(self, cur: Any, account_ids: set[str]) -> None:
        if account_ids:
            self.store.execute(cur, "UPDATE leases SET owner = NULL, expires_at = '-infinity' "
                                    "WHERE owner = ? AND account_id = ANY(?)", (self.node, sorted(account_ids)))

    def _survey(self, cur: Any, state: str) -> None:
        """Nodes, their leases and this node's fair share."""
        self.store.execute(cur, "DELETE FROM nodes WHERE heartbeat_at < now() - make_interval(secs => ?)",
                           (NODE_FORGET_AFTER,))
        self.store.execute(cur, """
            SELECT n.node_id, n.capacity, n.state, extract(epoch FROM now() - n.heartbeat_at)::float8,
                   n.heartbeat_at > now() - make_interval(secs => ?) AS live,
                   (SELECT count(*) FROM leases l WHERE l.owner = n.node_id AND l.expires_at > now()),
                   n.publish_rate
            FROM nodes n ORDER BY n.node_id""", (self.lease_time,))
        self.nodes = [{"node_id": r[0], "capacity": r[1], "state": r[2], "heartbeat_age": round(r[3], 1),
                       "live": bool(r[4]), "leases": int(r[5]), "publish_rate": round(float(r[6]), 1)}
                      for r in cur.fetchall()]
        self.store.execute(cur, "SELECT count(*) FROM accounts")
        self.total = int(cur.fetchone()[0])
        others = sum(n["capacity"] for n in self.nodes
                     if n["live"] and n["state"] == "running" and n["node_id"] != self.node)
        self.target = fair_share(self.total, self.capacity, others) if state == "running" else 0

    def _claim(self, cur: Any, wanted: int) -> set[str]:
        if wanted <= 0:
            return set()
        self.store.execute(cur, """SELECT account_id, owner FROM leases WHERE owner IS NULL OR expires_at <= now()
                                   ORDER BY random() LIMIT ? FOR UPDATE SKIP LOCKED""", (wanted,))
        rows = cur.fetchall()
        if not rows:
            return set()
        claimed = [r[0] for r in rows]
        self.store.execute(cur, """UPDATE leases SET owner = ?, expires_at = now() + make_interval(secs => ?),
                                       acquired_at = now(), renewed_at = now() WHERE account_id = ANY(?)""",
                           (self.node, self.lease_time, claimed))
        taken_over = sorted({r[1] for r in rows if r[1] and r[1] != self.node})
        log.info("event=leases_claimed node=%s count=%d from_expired=%s", self.node, len(claimed),
                 ",".join(taken_over) or "-")
        return set(claimed)

    # --- visibility and shutdown ----------------------------------------------------------------------
    def detail(self) -> dict[str, str]:
        """The cluster as this node last saw it, for the scheduler heartbeat (and status, metrics)."""
        now = time.monotonic()
        return {"cluster": json.dumps({
            "mode": LEASED, "node_id": self.node, "lease_time": self.lease_time, "capacity": self.capacity,
            "held": len(self.held), "target": self.target, "accounts": self.total,
            "last_renewal_age": None if self.last_round is None else round(now - self.last_round, 1),
            "renewal_failures": self.failures, "nodes": self.nodes,
        }, separators=(",", ":"))}

    def close(self) -> None:
        """Shutdown: free every lease this node holds and leave the nodes table, so the others take
        over at their next round instead of after a lease time."""
        try:
            with self.store.transaction() as cur:
                self.store.execute(cur, "UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = ?",
                                   (self.node,))
                count = cur.rowcount
                self.store.execute(cur, "DELETE FROM nodes WHERE node_id = ?", (self.node,))
            log.info("event=leases_released node=%s count=%d reason=shutdown", self.node, count)
        except StoreError as exc:
            log.error("event=lease_release_failed node=%s error=%s (the leases expire instead)", self.node, exc)
        self.held = set()


def manager_for(config: Config, store: Store) -> LeaseManager | SingleNode:
    if not clustered(config):
        return SingleNode()
    cluster = config.cluster
    return LeaseManager(store, node_id(config), cluster.lease_time, cluster.capacity, cluster.release_per_round)


def cluster_status(config: Config, detail: dict[str, str] | None) -> dict[str, Any]:
    """The ``cluster`` block of ``mailingestctl status`` from the scheduler's last heartbeat."""
    if not clustered(config):
        return {"mode": SINGLE_NODE, "node_id": node_id(config), "nodes": []}
    raw = (detail or {}).get("cluster")
    if not raw:
        return {"mode": LEASED, "node_id": node_id(config), "nodes": [], "held": 0, "target": 0}
    return json.loads(raw)


def lease_counts(config: Config, detail: dict[str, str] | None) -> dict[str, float]:
    """Unexpired leases by node (a bounded set: the cluster's nodes), for metrics."""
    return {n["node_id"]: float(n["leases"]) for n in cluster_status(config, detail).get("nodes", [])}
