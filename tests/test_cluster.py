"""Scale-out: several daemons share the accounts through PostgreSQL leases (mailingestd/store/leases.py).

Real daemons as subprocesses (each its own root, runtime_dir and node_id) against one PostgreSQL
and the session Dovecot. Leases are short (6 s, renewed every 2 s) so failover fits in a test.
What each test proves is in its docstring; the store is read directly, and PostgreSQL triggers
installed by the test record who wrote what and when (each daemon connects with its own
``application_name``), so "a node that lost its lease commits nothing" is checked by the
database, not by the daemon's own word.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psycopg
import pytest
from harness import Daemon, account_toml, wait_until

from bench.sqs_sink import SqsSink
from devtools.devservers import Dovecot
from mailingestd.store.leases import fair_share

pytestmark = pytest.mark.slow

LEASE = 6.0
ACCOUNTS = 150


def cluster_sections(connects_per_minute: int = 600, batch_messages: int = 10) -> str:
    return f"""
[cluster]
lease_time = "{LEASE:g}s"
release_per_round = 25

[limits]
connects_per_minute = {connects_per_minute}
max_connections_per_server = 2000

[imap]
batch_messages = {batch_messages}
"""


def node_url(pg_url: str, node: str) -> str:
    return f"{pg_url}{'&' if '?' in pg_url else '?'}application_name={node}"


def make_accounts(dovecot: Dovecot, count: int) -> tuple[list[str], str]:
    users = [dovecot.new_user() for _ in range(count)]
    return users, "".join(account_toml(u, "127.0.0.1", dovecot.port, id=f"acct{i:04d}")
                          for i, u in enumerate(users))


def start_node(tmp_path: Path, pg_url: str, node: str, accounts: str, wait: bool = True,
               heartbeat_timeout: str = "5s", extra: str = "", env: dict[str, str] | None = None,
               **sections: int) -> Daemon:
    daemon = Daemon(tmp_path / node, accounts=accounts, store_url=node_url(pg_url, node), workers=1,
                    sections=cluster_sections(**sections) + extra,
                    env={"MAILINGESTD_DAEMON_NODE_ID": node, **(env or {})}, heartbeat_timeout=heartbeat_timeout)
    daemon.start(wait=wait)
    return daemon


def sample_message(n: int) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: cluster {n}\r\n"
            f"Message-ID: <{n}.{time.monotonic_ns()}@example.org>\r\n\r\nbody {n}\r\n").encode()


def lease_rows(pg_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows from the lease tables; none while the first daemon has not migrated the store yet."""
    with psycopg.connect(pg_url) as conn:
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def leases_by_node(pg_url: str) -> dict[str, int]:
    rows = lease_rows(pg_url, "SELECT owner, count(*) FROM leases WHERE owner IS NOT NULL AND expires_at > now() "
                              "GROUP BY owner")
    return {owner: int(count) for owner, count in rows}


def owned_by(pg_url: str, node: str) -> set[str]:
    return {r[0] for r in lease_rows(pg_url, "SELECT account_id FROM leases WHERE owner = %s", (node,))}


def balanced(pg_url: str, nodes: list[str], total: int = ACCOUNTS) -> dict[str, int] | None:
    """The split when every account is leased and each node is within 10 % of its fair share."""
    split = leases_by_node(pg_url)
    share = total / len(nodes)
    if sum(split.get(n, 0) for n in nodes) != total or set(split) - set(nodes):
        return None
    return split if all(abs(split.get(n, 0) - share) <= 0.1 * share for n in nodes) else None


def idling(daemon: Daemon) -> int:
    status = daemon.try_status()
    return int(status["traffic"]["idle_connections"]) if status else 0


def install_audit(pg_url: str) -> None:
    """Triggers that record every checkpoint move, message row and lease change, with the writer
    (application_name = node id) and the database clock at the time of the write."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("""CREATE TABLE audit (kind TEXT, account_id TEXT, writer TEXT, old_value TEXT,
                        new_value TEXT, at TIMESTAMPTZ DEFAULT clock_timestamp())""")
        conn.execute("""CREATE FUNCTION audit_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            INSERT INTO audit (kind, account_id, writer, old_value, new_value) VALUES ('checkpoint',
              NEW.account_id, current_setting('application_name'),
              OLD.uidvalidity || '/' || OLD.last_uid, NEW.uidvalidity || '/' || NEW.last_uid);
            RETURN NULL; END $$""")
        conn.execute("CREATE TRIGGER audit_checkpoint AFTER UPDATE ON mailboxes FOR EACH ROW "
                     "EXECUTE FUNCTION audit_checkpoint()")
        conn.execute("""CREATE FUNCTION audit_key() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            INSERT INTO audit (kind, account_id, writer, new_value) VALUES ('message', NEW.account_id,
              current_setting('application_name'), NEW.uid::text);
            RETURN NULL; END $$""")
        conn.execute("CREATE TRIGGER audit_key AFTER INSERT ON message_keys FOR EACH ROW "
                     "EXECUTE FUNCTION audit_key()")
        conn.execute("""CREATE FUNCTION audit_lease() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            IF NEW.owner IS DISTINCT FROM OLD.owner THEN
              INSERT INTO audit (kind, account_id, writer, old_value, new_value) VALUES ('lease',
                NEW.account_id, current_setting('application_name'), OLD.owner, NEW.owner);
            END IF; RETURN NULL; END $$""")
        conn.execute("CREATE TRIGGER audit_lease AFTER UPDATE ON leases FOR EACH ROW EXECUTE FUNCTION audit_lease()")


def audit(pg_url: str, kind: str) -> list[tuple]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT account_id, writer, old_value, new_value, at FROM audit WHERE kind = %s "
                            "ORDER BY at", (kind,)).fetchall()


def assert_checkpoints_never_moved_back(pg_url: str) -> None:
    for account_id, writer, old, new, _ in audit(pg_url, "checkpoint"):
        old_validity, old_uid = map(int, old.split("/"))
        new_validity, new_uid = map(int, new.split("/"))
        assert new_validity != old_validity or new_uid >= old_uid, \
            f"{writer} moved the checkpoint of {account_id} back from {old} to {new}"


def assert_stored_once(daemon: Daemon, expected: set[tuple[str, int]]) -> None:
    rows = daemon.query("SELECT account_id, uid, count(*) FROM messages GROUP BY account_id, folder, uidvalidity, uid")
    assert all(r[2] == 1 for r in rows), [r for r in rows if r[2] != 1][:5]
    stored = {(r[0], r[1]) for r in rows}
    assert expected <= stored, f"missing: {sorted(expected - stored)[:10]}"


def stop_all(*daemons: Daemon) -> None:
    for daemon in daemons:
        try:
            daemon.stop(signal.SIGINT, timeout=20)
        finally:
            daemon.kill()


def test_nodes_split_accounts_a_joiner_fills_gradually_and_drain_hands_over(
        dovecot: Dovecot, pg_url: str, tmp_path: Path) -> None:
    """Two nodes split 150 accounts within 10 % of fair share; a third joins and takes its share
    without exceeding its connects_per_minute against the server, and without any account that
    stays put being reconnected; status and metrics show the cluster; a drained node hands all of
    its accounts to the others."""
    _, accounts = make_accounts(dovecot, ACCOUNTS)
    a = start_node(tmp_path, pg_url, "node-a", accounts, wait=False)
    b = start_node(tmp_path, pg_url, "node-b", accounts, wait=False)
    c = None
    try:
        for daemon in (a, b):
            wait_until(lambda d=daemon: (d.try_status() or {}).get("supervisor", {}).get("state") == "running",
                       30, 0.3, f"{daemon.root.name} running\n{daemon.log_tail()}")
        wait_until(lambda: balanced(pg_url, ["node-a", "node-b"]), 40, 0.5,
                   f"a two-node split (have {leases_by_node(pg_url)})")
        wait_until(lambda: idling(a) + idling(b) == ACCOUNTS, 40, 0.5, "every account idling")

        status = a.status()["cluster"]
        assert status["mode"] == "postgresql leases" and status["node_id"] == "node-a"
        assert {n["node_id"] for n in status["nodes"]} == {"node-a", "node-b"}
        assert all(n["live"] and n["heartbeat_age"] < LEASE for n in status["nodes"])
        text = a.ctl("status").stdout
        assert re.search(r"CLUSTER  postgresql leases  node node-a  holds \d+ of 150 accounts", text), text
        assert re.search(r"^  node-b\s+running", text, re.M), text
        prom = (a.metrics_dir / "mailingestd.prom")
        wait_until(lambda: prom.exists() and re.search(r'mailingestd_leases\{node="node-b"\} \d', prom.read_text()),
                   10, 0.5, "lease counts per node in the metrics")

        # A third node joins with a slow connect bucket; it must take its share at that pace.
        rate = 90
        stayers = {"node-a": owned_by(pg_url, "node-a"), "node-b": owned_by(pg_url, "node-b")}
        logins_before = dovecot.login_count()
        c = start_node(tmp_path, pg_url, "node-c", accounts, wait=False, connects_per_minute=rate)
        samples: list[tuple[float, int]] = []

        def joined() -> bool:
            samples.append((time.monotonic(), dovecot.login_count() - logins_before))
            return bool(balanced(pg_url, ["node-a", "node-b", "node-c"])) and idling(c) >= len(owned_by(pg_url, "node-c"))

        wait_until(joined, 90, 0.5, f"the joiner's share (have {leases_by_node(pg_url)})")
        moved = len(owned_by(pg_url, "node-c"))
        assert moved >= 45
        # Only the moved accounts connected again (nobody reshuffled the accounts that stayed) ...
        kept = {n: stayers[n] & owned_by(pg_url, n) for n in stayers}
        assert samples[-1][1] <= moved + 5, (samples[-1], moved)
        assert all(len(kept[n]) >= 45 for n in kept)
        # ... and at the joiner's connects_per_minute: any window of W seconds sees at most
        # rate * (W + burst 10 s) / 60 logins (ratelimit.TokenBucket), +2 for sampling.
        for i, (t0, n0) in enumerate(samples):
            for t1, n1 in samples[i + 1:]:
                window = t1 - t0
                assert n1 - n0 <= rate * (window + 10 + 0.5) / 60 + 2, (window, n1 - n0)

        # Drain one node: the other two take every account it held.
        c.ctl("drain", "--wait", "--timeout", "30")
        wait_until(lambda: balanced(pg_url, ["node-a", "node-b"]), 30, 0.5,
                   f"the drained node's accounts handed over (have {leases_by_node(pg_url)})")
        assert owned_by(pg_url, "node-c") == set()
        nodes = {n["node_id"]: n for n in a.status()["cluster"]["nodes"]}
        assert nodes["node-c"]["state"] == "drained" and nodes["node-c"]["leases"] == 0
        wait_until(lambda: idling(a) + idling(b) == ACCOUNTS, 40, 0.5, "every account idling again")
    finally:
        stop_all(*(d for d in (a, b, c) if d is not None))
    # A clean stop gives every lease back at once.
    assert leases_by_node(pg_url) == {}


def test_sigkill_moves_accounts_within_lease_time_and_stores_every_message_once(
        dovecot: Dovecot, pg_url: str, tmp_path: Path) -> None:
    """SIGKILL of a node and its children: the others hold all its accounts within the lease
    time plus 10 s, and every message appended to them during the failover is stored exactly once."""
    users, accounts = make_accounts(dovecot, ACCOUNTS)
    user_of = {f"acct{i:04d}": u for i, u in enumerate(users)}
    nodes = [start_node(tmp_path, pg_url, f"node-{n}", accounts, wait=False) for n in "abc"]
    try:
        names = [d.root.name for d in nodes]
        wait_until(lambda: balanced(pg_url, names), 60, 0.5, f"a three-node split (have {leases_by_node(pg_url)})")
        wait_until(lambda: sum(idling(d) for d in nodes) == ACCOUNTS, 40, 0.5, "every account idling")
        victim, survivors = nodes[0], nodes[1:]
        lost = sorted(owned_by(pg_url, "node-a"))
        expected: set[tuple[str, int]] = set()
        for account_id in lost[:10]:  # mail that arrives before the kill, stored by the victim
            expected.add((account_id, dovecot.append(user_of[account_id], sample_message(1))))
        wait_until(lambda: len(victim.stored_keys()) >= len(expected), 20, 0.2, "the victim ingesting")

        victim.kill()
        killed = time.monotonic()
        moved_at = None
        round_no = 0
        while time.monotonic() - killed < LEASE + 10 and moved_at is None:
            round_no += 1
            for account_id in lost[:20]:  # mail that arrives while nobody holds the accounts
                expected.add((account_id, dovecot.append(user_of[account_id], sample_message(100 + round_no))))
            if not owned_by(pg_url, "node-a") and sum(leases_by_node(pg_url).values()) == ACCOUNTS:
                moved_at = time.monotonic() - killed
            time.sleep(0.5)
        assert moved_at is not None, f"accounts still with the dead node: {leases_by_node(pg_url)}"
        assert moved_at <= LEASE + 10
        for account_id in lost[20:40]:  # mail after the failover, to the new holders
            expected.add((account_id, dovecot.append(user_of[account_id], sample_message(999))))
        wait_until(lambda: len(survivors[0].stored_keys()) >= len(expected), 40, 0.5,
                   f"{len(expected)} messages stored")
        time.sleep(2)  # a second copy, if any, would show up now
        assert_stored_once(survivors[0], expected)
        assert len(survivors[0].stored_keys()) == len(expected)
        status = survivors[0].status()["cluster"]
        dead = next(n for n in status["nodes"] if n["node_id"] == "node-a")
        assert not dead["live"] and dead["leases"] == 0
    finally:
        stop_all(*nodes)


def test_three_nodes_send_each_outbox_row_once_and_take_over_a_dead_nodes_rows(
        dovecot: Dovecot, pg_url: str, tmp_path: Path) -> None:
    """Three nodes announce on one queue (bench/sqs_sink.py, which counts every arrival by key): while
    all run, every stored message reaches the queue exactly once (each outbox row is claimed by one
    publisher at a time; before, every node sent every row). Then one node's publisher is stopped,
    mail arrives for that node's accounts and is stored by it, and the node is SIGKILLed: the
    others send those rows within lease_time + 10 s, and still nothing twice."""
    accounts_count = 30
    users, accounts = make_accounts(dovecot, accounts_count)
    user_of = {f"acct{i:04d}": u for i, u in enumerate(users)}
    with SqsSink(record=True) as sink:
        url = sink.create_queue(f"cluster-{time.monotonic_ns()}")
        queue = f"""
[queue]
kind = "sqs"
url = "{url}"
endpoint_url = "{sink.endpoint_url}"
region = "{sink.region}"
poll_interval = "0.1s"
"""
        nodes = [start_node(tmp_path, pg_url, f"node-{n}", accounts, wait=False, extra=queue, env=sink.env)
                 for n in "abc"]
        try:
            names = [d.root.name for d in nodes]
            wait_until(lambda: balanced(pg_url, names, accounts_count), 60, 0.5,
                       f"a three-node split (have {leases_by_node(pg_url)})")
            wait_until(lambda: sum(idling(d) for d in nodes) == accounts_count, 40, 0.5, "every account idling")
            expected: set[tuple[str, int]] = set()
            for round_no in range(4):
                for account_id, user in user_of.items():
                    expected.add((account_id, dovecot.append(user, sample_message(round_no))))

            def arrived() -> dict[tuple[str, int], int]:
                """(account, uid) of each envelope key the queue got, and how often."""
                keys = sink.stats(url).get("keys", {})
                return {(key.split("/")[0], int(key.rsplit("/", 1)[1])): n for key, n in keys.items()}

            wait_until(lambda: set(arrived()) >= expected, 40, 0.5,
                       f"{len(expected)} envelopes on the queue (have {len(arrived())})")
            time.sleep(2)  # a second copy, if any, would arrive now
            twice = {k: n for k, n in arrived().items() if n != 1}
            assert twice == {}, f"sent more than once: {sorted(twice.items())[:10]}"
            senders = {d.root.name: d.status()["outbox"]["published_total"] for d in nodes}
            assert all(senders.values()), f"a node published nothing: {senders}"

            victim, survivors = nodes[0], nodes[1:]
            publisher = next(c["pid"] for c in victim.status()["children"] if c["role"] == "publisher")
            os.kill(publisher, signal.SIGSTOP)
            lost = sorted(owned_by(pg_url, "node-a"))
            stranded = {(account_id, dovecot.append(user_of[account_id], sample_message(99))) for account_id in lost}
            wait_until(lambda: victim.query("SELECT count(*) FROM outbox")[0][0] >= len(stranded), 30, 0.2,
                       "the victim storing mail it cannot announce")
            assert not stranded & set(arrived()), "announced while the publisher was stopped"
            victim.kill()
            killed = time.monotonic()
            wait_until(lambda: set(arrived()) >= stranded, LEASE + 10, 0.2,
                       f"the dead node's {len(stranded)} rows sent by the others "
                       f"(outbox {survivors[0].query('SELECT count(*) FROM outbox')[0][0]})")
            taken_over = time.monotonic() - killed
            assert taken_over <= LEASE + 10
            time.sleep(2)
            twice = {k: n for k, n in arrived().items() if n != 1}
            assert twice == {}, f"sent more than once: {sorted(twice.items())[:10]}"
            assert survivors[0].query("SELECT count(*) FROM outbox")[0][0] == 0
            out = survivors[0].status()["outbox"]
            assert out["depth"] == 0 and out["node_id"] == "node-b" and "oldest_age" in out
            assert re.search(r"outbox depth 0   oldest [\d.]+s   published \d+ \([\d.]+/s on this node\)",
                             survivors[0].ctl("status").stdout)
            # Every node's publish rate, in any node's CLUSTER block (from the nodes table).
            wait_until(lambda: all(n["publish_rate"] > 0 for n in survivors[0].status()["cluster"]["nodes"]
                                   if n["node_id"] != "node-a"), 15, 0.5, "the survivors' publish rates")
            assert re.search(r"^  node-c\s+running .* [\d.]+$", survivors[0].ctl("status").stdout, re.M)
        finally:
            stop_all(*nodes)


def test_paused_node_commits_nothing_after_losing_its_lease(dovecot: Dovecot, pg_url: str, tmp_path: Path) -> None:
    """SIGSTOP a node in the middle of a backlog past its lease; SIGCONT it as soon as the other
    node holds the lease: the paused worker's in-flight batch is refused by the fence, so nothing
    it writes lands after the takeover, no row is stored twice and no checkpoint moves backwards
    (checked by triggers in PostgreSQL), and the new holder finishes from the committed checkpoint."""
    users, accounts = make_accounts(dovecot, 20)
    a = start_node(tmp_path, pg_url, "node-a", accounts, heartbeat_timeout="120s", batch_messages=1)
    install_audit(pg_url)
    b = None
    try:
        wait_until(lambda: len(owned_by(pg_url, "node-a")) == 20, 20, 0.3, "node-a holding every account")
        b = start_node(tmp_path, pg_url, "node-b", accounts, batch_messages=1)
        wait_until(lambda: balanced(pg_url, ["node-a", "node-b"], 20), 30, 0.5, "a two-node split")
        account_id = sorted(owned_by(pg_url, "node-a"))[0]
        user = users[int(account_id[4:])]
        backlog = 600
        uids = dovecot.append_many(user, (sample_message(i) for i in range(backlog)))
        stored = lambda: a.query("SELECT count(*) FROM messages WHERE account_id = ?", (account_id,))[0][0]  # noqa: E731
        wait_until(lambda: stored() > 0, 20, 0.02, "node-a ingesting the backlog")
        pids = [*a.child_pids(), a.proc.pid]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            at_pause = stored()
            assert at_pause < backlog, "the backlog was already stored: nothing in flight to fence"
            # Resume the moment node-b holds the lease, before it has fetched anything: node-a's
            # worker holds a fetched batch that nobody has committed yet, and tries at once.
            wait_until(lambda: account_id in owned_by(pg_url, "node-b"), LEASE + 10, 0.02, "node-b taking over")
        finally:
            for pid in reversed(pids):  # children first: the supervisor then sees fresh heartbeats
                os.kill(pid, signal.SIGCONT)
        wait_until(lambda: stored() == backlog, 60, 0.5, "node-b finishing the backlog")
        time.sleep(LEASE / 2)  # anything node-a still had in flight has been tried by now
        # Every write of node-a must fall while it held the lease: the last change of owner before
        # the write gave the lease to node-a (it may win the account back when the two rebalance).
        changes = [(at, new) for acct, _, _, new, at in audit(pg_url, "lease") if acct == account_id]
        assert any(new == "node-b" for _, new in changes), "node-b never took the lease over"
        late = [r for r in audit(pg_url, "message") + audit(pg_url, "checkpoint") if r[0] == account_id
                and r[1] == "node-a" and [new for at, new in changes if at <= r[4]][-1:] not in ([], ["node-a"])]
        assert late == [], f"node-a wrote while not holding the lease: {late[:5]}"
        assert_checkpoints_never_moved_back(pg_url)
        assert_stored_once(a, {(account_id, uid) for uid in uids})
        assert a.query("SELECT last_uid FROM mailboxes WHERE account_id = ?", (account_id,))[0][0] == uids[-1]
        # The paused worker did try, and was refused: by the fence, or (paused inside a commit) by
        # PostgreSQL ending its idle transaction, which is what let node-b take the lease at all.
        log_text = a.log_path.read_text(errors="replace")
        # The refused commit shows as the fence's LeaseLost, or as the database ending the paused
        # transaction (its idle_in_transaction_session_timeout is a third of the lease).
        assert any(sign in log_text for sign in ("event=lease_lost", "server closed the connection",
                                                  "idle-in-transaction timeout")), a.log_tail()
        assert a.status()["supervisor"]["state"] == "running"
    finally:
        stop_all(*(d for d in (a, b) if d is not None))


def test_sqlite_store_runs_single_node(dovecot: Dovecot, mailbox: str, tmp_path: Path) -> None:
    """With the embedded store there is no lease: the daemon says it runs single-node."""
    with Daemon(tmp_path / "solo", accounts=account_toml(mailbox, "127.0.0.1", dovecot.port), workers=1) as daemon:
        cluster = daemon.status()["cluster"]
        assert cluster["mode"] == "single-node (sqlite)" and cluster["nodes"] == []
        assert "CLUSTER  single-node (sqlite)" in daemon.ctl("status").stdout
        dovecot.append(mailbox, sample_message(1))
        daemon.wait_stored(1)


def test_fair_share_rounds_up_so_every_account_has_a_holder() -> None:
    """Each node's target is its capacity's share rounded up: together the live nodes' targets
    cover every account (no account left without a holder), and no node targets more than one
    account above its exact share."""
    for total in (0, 1, 149, 150, 151, 3000):
        for capacities in ([1.0], [1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.5], [1.0, 0.0]):
            targets = [fair_share(total, c, sum(capacities) - c) for c in capacities]
            assert sum(targets) >= total
            for target, c in zip(targets, capacities):
                assert target - total * c / sum(capacities) < 1
    assert fair_share(100, 0.0, 2.0) == 0


def test_a_renewal_never_waits_for_a_committing_batch_and_a_claimer_still_skips_it(pg_url: str) -> None:
    """A batch's fence locks its account's lease row until the batch commits. The node's own
    renewal must not queue behind it (a backlog keeps batches open back to back: the renewal hit
    its statement timeout, and a node whose renewals keep failing drops every lease); another
    node's claim must still skip the row until the batch is over."""
    from mailingestd.config import AccountConfig
    from mailingestd.store.leases import Fence, LeaseManager
    from mailingestd.store.store import open_store

    store = open_store(pg_url)
    store.upsert_account(AccountConfig(id="busy", host="127.0.0.1", port=1, tls="none", username="u",
                                       password_env="UNUSED"))
    ours = LeaseManager(store, "node-a", lease_time=3.0, capacity=1.0, release_per_round=1)
    ours.round(time.monotonic(), "running")
    ours.round(time.monotonic(), "running")  # the first round only looks; the second claims
    assert ours.held == {"busy"}
    with store.transaction() as batch:  # a batch in flight: fence checked, not yet committed
        Fence("node-a", 3.0).check(store, batch, "busy")
        started = time.monotonic()
        ours.round(started, "running")  # renew_every 1 s: its statement timeout
        assert ours.failures == 0 and ours.held == {"busy"}
        assert time.monotonic() - started < 0.9
        theirs = LeaseManager(open_store(pg_url), "node-b", lease_time=3.0, capacity=1.0, release_per_round=1)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE leases SET expires_at = now() - interval '1 second'")  # as if expired
        theirs.round(time.monotonic(), "running")
        theirs.round(time.monotonic(), "running")
        assert theirs.held == set()  # the row is skipped while the batch that passed the fence is open
    theirs.round(time.monotonic(), "running")
    assert theirs.held == {"busy"}  # once it committed, the expired lease moves
