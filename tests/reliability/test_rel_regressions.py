"""Regression tests for bugs the reliability suite found, each reduced to its smallest failing case."""

from __future__ import annotations

import socket
import time

import pytest
from harness import Daemon

from mailingestd.config import QueueConfig
from devtools.devservers import free_port
from mailingestd.publish.publisher import STEP_SECONDS, Publisher
from mailingestd.store.store import PostgresStore, StoredMessage, StoreError, open_store

pytestmark = pytest.mark.reliability


def stored(uid: int) -> StoredMessage:
    raw = f"Message-ID: <{uid}@r>\r\n\r\nbody\r\n".encode()
    return StoredMessage(uid=uid, raw=raw, size=len(raw), internaldate=None, message_id=f"<{uid}@r>", from_=None,
                         to=None, cc=None, subject=None, date=None, in_reply_to=None, references=None)


class SlowSqs:
    """An SQS client whose every SendMessageBatch takes ``seconds`` of a fake clock (moto under load)."""

    def __init__(self, clock: list[float], seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.calls = 0

    def send_message_batch(self, QueueUrl: str, Entries: list[dict]) -> dict:
        self.calls += 1
        self.clock[0] += self.seconds
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}


def test_a_publish_step_is_bounded_in_time_so_the_publisher_keeps_heartbeating(tmp_path):
    """Found by SIGKILL of the publisher with a deep outbox: the next publisher sent 500 entries
    (50 SendMessageBatch calls, seconds each on a slow endpoint) before its first heartbeat, and
    the supervisor killed it as stuck, again and again."""
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    mailbox = store.start_mailbox("acct", "INBOX", 1)
    store.commit_batch(mailbox, [stored(uid) for uid in range(1, 201)], settled_uid=200)
    clock = [0.0]
    sqs = SlowSqs(clock, seconds=0.4)
    publisher = Publisher(store, QueueConfig(kind="sqs", url="https://sqs.example/q.fifo"), client=sqs,
                          clock=lambda: clock[0])
    sent = publisher.publish_once()
    assert clock[0] <= STEP_SECONDS + sqs.seconds, "one step stops starting calls after STEP_SECONDS"
    assert 0 < sent < 200 and store.outbox_depth() == 200 - sent
    while store.outbox_depth():
        publisher.publish_once()
    assert sqs.calls == 20


def test_silent_control_clients_do_not_stall_the_supervisor(tmp_path):
    """Found by the control-socket garbage test: the supervisor read each control client with a 2 s
    blocking timeout inside its loop, so 8 clients that connected and said nothing stalled it for
    16 s, and it then killed every child as stuck (heartbeats stamped with the stale loop time)."""
    with Daemon(tmp_path, heartbeat_timeout="3s") as daemon:
        silent = []
        for _ in range(8):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.runtime_dir / "control.sock"))
            silent.append(sock)
        asked = time.monotonic()
        assert daemon.status()["supervisor"]["state"] == "running"
        assert time.monotonic() - asked < 3, "status answers beside silent clients"
        time.sleep(4)  # past heartbeat_timeout
        assert all(c["restarts"] == 0 for c in daemon.status()["children"]), daemon.log_tail()
        for sock in silent:
            sock.close()


def test_an_unreachable_postgres_costs_one_wait_per_interval_not_one_per_call():
    """Found by PostgreSQL stopped (immediate) in the long suite: the scheduler makes several store
    calls per turn (lease round, accounts revision, account states); each waited the full pool
    timeout, the turn took over 15 s, and the supervisor killed the scheduler as stuck."""
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.get_mailbox("acct", "INBOX")
        assert time.monotonic() - started >= 0.9
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(StoreError):
                store.get_mailbox("acct", "INBOX")
        assert time.monotonic() - started < 0.5, "later calls fail at once while the outage is fresh"
    finally:
        store.close()
