"""Dependency faults mid-ingest: PostgreSQL, the SQS endpoint and Dovecot go away and come back; a
UIDVALIDITY changes; messages are expunged while fetched; the embedded store's disk fills up.

The daemon must ride every one of them out without a process restart loop, lose nothing, store
nothing twice, and recover on its own once the dependency is back.
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from harness import Daemon, wait_until
from reliability_kit import (
    Ledger,
    QueueConsumer,
    TcpProxy,
    accounts_for,
    audit,
    message,
    pick,
    queue_section,
    restarts,
)

from devtools.devservers import Dovecot

pytestmark = pytest.mark.reliability


@pytest.fixture
def users(dovecot):
    return [dovecot.new_user() for _ in range(pick(4, 8))]


def assert_no_restarts(daemon: Daemon) -> None:
    counts = restarts(daemon)
    assert not any(counts.values()), f"a dependency outage cost processes: {counts}\n{daemon.log_tail(60)}"
    assert daemon.proc.poll() is None, "the supervisor is still running"


def test_postgres_stopped_and_restarted_mid_ingest(dovecot, postgres, pg_url, users, tmp_path):
    """Workers, scheduler and publisher keep running through the outage and retry; nothing is lost.

    A worker killed during the outage cannot open the store when it starts again: it exits
    EX_UNAVAILABLE and is restarted with backoff for as long as the outage lasts, without the
    crash-loop fatal (the long outage outlasts CRASH_LOOP_LIMIT restarts).
    """
    ledger = Ledger(dovecot, users, "pg")
    outage = pick(15.0, 75.0)  # the long one is past a minute
    # The production heartbeat_timeout (15 s): the store's pool wait (5 s) is sized against it.
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                store_url=pg_url, heartbeat_timeout="15s") as daemon:
        appender = ledger.background(rate=30)
        rounds = pick(1, 2)
        killed: set[str] = set()
        for _ in range(rounds):
            time.sleep(3)
            postgres.stop(mode=pick("fast", "immediate"))
            victim = next(c for c in daemon.status()["children"] if c["role"] == "worker" and c["pid"])
            killed.add(f"worker-{victim['slot']}")
            os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(outage)
            postgres.start()
            recovered_from = time.monotonic()
        time.sleep(2)
        appender.stop()
        audit(daemon, ledger, f"PostgreSQL down {outage:.0f}s (+ a worker killed)", rounds,
              recovered_from=recovered_from)
        log = daemon.log_path.read_text(errors="replace")
        assert "event=child_store_unavailable role=worker" in log and "event=fatal" not in log
        counts = restarts(daemon)
        assert all(counts.pop(slot) >= 1 for slot in killed) and not any(counts.values()), counts
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0


def test_sqs_endpoint_down_then_back(dovecot, moto, sqs_fifo_queue, users, tmp_path):
    """The outbox grows while SQS is unreachable, drains after, every key once on the FIFO queue."""
    proxy = TcpProxy(moto.port)
    proxy.up()
    ledger = Ledger(dovecot, users, "sqs")
    consumer = QueueConsumer(moto, sqs_fifo_queue)
    with Daemon(tmp_path, accounts=accounts_for(dovecot, users), password=dovecot.password,
                sections=queue_section(sqs_fifo_queue, proxy.url)) as daemon:
        appender = ledger.background(rate=pick(12, 30))
        time.sleep(2)
        proxy.down()  # connections refused
        time.sleep(pick(6, 40))
        depth = daemon.query("SELECT COUNT(*) FROM outbox")[0][0]
        assert depth > 0, "the outbox grew while SQS was down"
        assert daemon.status()["outbox"]["publish_errors_total"] > 0
        proxy.blackhole()  # connections accepted, never answered
        time.sleep(pick(6, 40))
        assert daemon.query("SELECT COUNT(*) FROM outbox")[0][0] > depth, "the outbox keeps growing"
        proxy.down()
        proxy.up()
        recovered_from = time.monotonic()
        time.sleep(1)
        appender.stop()
        audit(daemon, ledger, "SQS endpoint refusing, then hung", 2, recovered_from=recovered_from, consumer=consumer)
        assert_no_restarts(daemon)  # a hung endpoint does not get the publisher killed as stuck
        assert daemon.stop() == 0
    proxy.down()


LOGIN_LINE = re.compile(r"^(\w{3} \d+ \d\d:\d\d:\d\d) imap-login: Info: Login: user=<")


def login_times(dovecot: Dovecot) -> list[float]:
    """Seconds (epoch, 1 s resolution) of every successful login in Dovecot's log."""
    year = datetime.date.today().year
    times = []
    for line in dovecot.log_path.read_text(errors="replace").splitlines():
        match = LOGIN_LINE.match(line)
        if match:
            stamp = datetime.datetime.strptime(f"{year} {match.group(1)}", "%Y %b %d %H:%M:%S")
            times.append(stamp.timestamp())
    return times


def busiest_minute(times: list[float]) -> int:
    times = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= 60:
            start += 1
        best = max(best, end - start + 1)
    return best


def deliver(dovecot: Dovecot, ledger: Ledger, count_per_user: int) -> None:
    """Deliver into each user's Maildir as an MDA would (no IMAP login that would count as the daemon's)."""
    owner = pwd.getpwnam("dovecot")
    for user in ledger.users:
        new_dir = dovecot.mail_root / user / "new"
        for _ in range(count_per_user):
            n = ledger.next_n
            ledger.next_n += 1
            final = new_dir / f"{time.time_ns()}.{n}.reliability"
            staged = dovecot.mail_root / user / "tmp" / final.name
            staged.write_bytes(message(ledger.tag, n))
            os.chown(staged, owner.pw_uid, owner.pw_gid)
            staged.rename(final)
            ledger.appended[f"<{ledger.tag}-{n}@reliability>"] = user


def test_dovecot_restarted_and_stopped(tmp_path):
    """Reconnects after an IMAP server outage respect connects_per_minute, then everything recovers.
    The short suite: 10 accounts, one restart and an 8 s outage; the long one: 40, two rounds, 40 s."""
    per_minute = 60
    down = pick(8, 40)
    dovecot = Dovecot(tmp_path / "dovecot", users=0)
    dovecot.start()
    users = [dovecot.new_user() for _ in range(pick(10, 40))]
    ledger = Ledger(dovecot, users, "dovecot")
    limits = f"\n[limits]\nconnects_per_minute = {per_minute}\n\n[imap]\ntimeout = \"5s\"\n"
    try:
        ledger.append(len(users))  # creates every Maildir (these logins happen before the daemon starts)
        with Daemon(tmp_path / "d", accounts=accounts_for(dovecot, users), password=dovecot.password,
                    sections=limits) as daemon:
            daemon_started = time.time()
            wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == len(users), 150, 0.5,
                       "every account idling\n" + daemon.log_tail())
            injected = 0
            for _ in range(pick(1, 2)):
                dovecot.restart()
                injected += 1
                deliver(dovecot, ledger, 1)
                time.sleep(2)
                dovecot.stop()
                injected += 1
                deliver(dovecot, ledger, 1)
                time.sleep(down)
                dovecot.start()
                recovered_from = time.monotonic()
                deliver(dovecot, ledger, 1)
            audit(daemon, ledger, f"Dovecot restarted, then down {down}s", injected, recovered_from=recovered_from,
                  timeout=300)
            wait_until(lambda: daemon.status()["traffic"]["idle_connections"] == len(users), 150, 0.5,
                       "every account idling again\n" + daemon.log_tail())
            assert_no_restarts(daemon)
            # The bucket grants at most rate * (60 + 10 s burst) / 60 in any minute; +1 s for the
            # log's one-second resolution. Only the daemon logs in after it started.
            allowed = per_minute * (60 + 10 + 1) / 60
            busiest = busiest_minute([t for t in login_times(dovecot) if t >= int(daemon_started)])
            assert busiest <= allowed, f"{busiest} logins in one minute, limit {per_minute}/min"
            assert daemon.stop() == 0
    finally:
        dovecot.stop()


def test_uidvalidity_changes_while_running(dovecot, users, tmp_path):
    """Old rows stay, the folder starts over under the new UIDVALIDITY, the change is recorded."""
    user = users[0]
    folder = "Archive"
    ledger = Ledger(dovecot, [user], "uidv")
    dovecot.append_many(user, [message("uidv-old", n) for n in range(5)], folder=folder)
    with Daemon(tmp_path, accounts=accounts_for(dovecot, [user], folders=["INBOX", folder]),
                password=dovecot.password) as daemon:
        daemon.wait_stored(5)
        before = set(daemon.stored_keys())
        injected = pick(1, 3)
        for round_ in range(injected):
            dovecot.recreate_folder(user, folder)
            dovecot.append_many(user, [message(f"uidv-new{round_}", n) for n in range(5)], folder=folder)
            ledger.append(5)  # INBOX mail keeps flowing meanwhile
        recovered_from = time.monotonic()
        expected = {f"<uidv-new{injected - 1}-{n}@reliability>" for n in range(5)}
        wait_until(lambda: expected <= {r[0] for r in daemon.query("SELECT message_id FROM messages")}, 60, 0.25,
                   "the recreated folder's mail\n" + daemon.log_tail())
        audit(daemon, ledger, "UIDVALIDITY changed", injected, recovered_from=recovered_from)
        assert before <= set(daemon.stored_keys()), "rows of the old UIDVALIDITY stay"
        changes = daemon.query("SELECT COUNT(*) FROM uidvalidity_changes WHERE account_id = ?", (user,))[0][0]
        assert changes >= 1
        assert daemon.stop() == 0


def test_messages_expunged_while_being_fetched(dovecot, users, tmp_path):
    """Expunged UIDs are settled, the rest is stored, and the folder keeps moving afterwards."""
    user = users[0]
    ledger = Ledger(dovecot, [user], "expunge", body_bytes=20_000)
    count = pick(400, 2000)
    sections = '\n[imap]\nbatch_messages = 5\n'
    with Daemon(tmp_path, accounts=accounts_for(dovecot, [user]), password=dovecot.password,
                sections=sections) as daemon:
        ledger.append(20)
        daemon.wait_stored(20)
        ledger.append(count)
        expunged: list[int] = []
        with dovecot.client(user) as imap:
            imap.select_folder("INBOX")
            uids = sorted(imap.search(["ALL"]))[20:]
            doomed = uids[::7]
            for start in range(0, len(doomed), 10):
                imap.delete_messages(doomed[start:start + 10])
                imap.uid_expunge(doomed[start:start + 10])
                expunged += doomed[start:start + 10]
                time.sleep(0.05)
            survivors = imap.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        alive = {data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().split(":", 1)[1].strip()
                 for data in survivors.values()}
        recovered_from = time.monotonic()
        ledger.append(10)  # after the expunges: must still arrive
        late = {m for m in ledger.appended if int(m.split("-")[1].split("@")[0]) >= 20 + count}
        audit(daemon, ledger, "expunge during fetch", len(expunged), recovered_from=recovered_from,
              expected=alive | late | {m for m in ledger.appended if int(m.split("-")[1].split("@")[0]) < 20})
        assert daemon.stop() == 0


def mount_small_fs(path: Path, size_mb: int) -> str:
    """A small filesystem at ``path``: tmpfs if mount allows it, else a loop-mounted ext4 image."""
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                      capture_output=True, check=False).returncode == 0:
        return "tmpfs"
    image = path.with_suffix(".img")
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(path)], capture_output=True,
                      check=False).returncode == 0:
        return "loop"
    pytest.fail("neither a tmpfs nor a loop mount is permitted here: cannot fill a disk", pytrace=False)


def test_disk_full_on_the_embedded_store(dovecot, users, tmp_path):
    """A full disk is a clear error, not corruption and not a crash loop; freeing space resumes ingest."""
    state = tmp_path / "state"
    kind = mount_small_fs(state, 8)
    try:
        ballast = state / "ballast"
        ledger = Ledger(dovecot, users[:2], "disk", body_bytes=100_000)
        with Daemon(tmp_path, accounts=accounts_for(dovecot, users[:2]), password=dovecot.password) as daemon:
            ledger.append(4)
            daemon.wait_stored(4)
            free = shutil.disk_usage(state).free
            ballast.write_bytes(b"\0" * max(0, free - 600_000))
            ledger.append(40)  # 4 MB: fits the 8 MB filesystem once the ballast is gone
            wait_until(lambda: "full" in daemon.log_path.read_text(errors="replace"), 60, 0.5,
                       "a disk-full error in the log\n" + daemon.log_tail())
            time.sleep(3)
            assert_no_restarts(daemon)
            errors = " ".join(daemon.status()["errors"])
            assert "full" in errors, f"status shows the disk-full error: {errors}"
            ballast.unlink()
            recovered_from = time.monotonic()
            audit(daemon, ledger, f"disk full ({kind} 8 MB)", 1, recovered_from=recovered_from)
            assert daemon.stop() == 0
        with sqlite3.connect(state / "mailingestd.sqlite3") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, check=False)
