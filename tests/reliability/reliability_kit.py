"""What every reliability test shares: a ledger of appended mail, store and queue audits, the table.

A test appends a known set of messages (unique Message-IDs) while it injects a fault, then audits
the store (and the FIFO queue, when one is configured) against that set with :func:`audit`, which
also adds one row to the run's table (printed at the end of the run by ``conftest.py``):
fault, times injected, appended, stored, duplicated in the store, missing, duplicate queue
deliveries, recovery time.

``RELIABILITY_LONG=1`` (``./dev test-long``) selects the long version: more rounds, longer
outages, bigger volumes. Not ``MAILINGESTD_LONG``: every ``MAILINGESTD_*`` variable is a
configuration override for the daemon the tests start, and unknown ones are refused.
"""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from harness import Daemon, account_toml, wait_until

LONG = os.environ.get("RELIABILITY_LONG") == "1"


def pick(short: Any, long: Any) -> Any:
    """The short suite's value, or the long one's under RELIABILITY_LONG=1."""
    return long if LONG else short


@dataclass
class Row:
    fault: str
    injected: int
    appended: int
    stored: int
    duplicated: int
    missing: int
    queue_duplicates: int | None
    queue_repeats: int | None  # re-sent with the same deduplication id inside the window: SQS drops them
    recovery_s: float | None


ROWS: list[Row] = []


def table(rows: list[Row]) -> str:
    header = ("fault", "injected", "appended", "stored", "dup in store", "missing", "dup queue (resent, deduped)",
              "recovery s")
    lines = [header] + [(r.fault, str(r.injected), str(r.appended), str(r.stored), str(r.duplicated),
                         str(r.missing), "-" if r.queue_duplicates is None else str(r.queue_duplicates),
                         "-" if r.recovery_s is None else f"{r.recovery_s:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def message(tag: str, n: int, body_bytes: int = 2048) -> bytes:
    body = (f"{tag} {n} ".encode() * (body_bytes // 8 + 1))[:body_bytes]
    return (f"Message-ID: <{tag}-{n}@reliability>\r\nFrom: a@example.com\r\nTo: b@example.com\r\n"
            f"Subject: {tag} {n}\r\n\r\n").encode() + body + b"\r\n"


@dataclass
class Ledger:
    """Messages appended to Dovecot by this test: Message-ID -> user."""

    dovecot: Any
    users: list[str]
    tag: str
    body_bytes: int = 2048
    appended: dict[str, str] = field(default_factory=dict)
    next_n: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, count: int) -> None:
        """Append ``count`` messages spread over the users (one IMAP connection per user)."""
        per_user: dict[str, list[int]] = collections.defaultdict(list)
        with self.lock:
            for _ in range(count):
                n = self.next_n
                self.next_n += 1
                per_user[self.users[n % len(self.users)]].append(n)
        for user, numbers in per_user.items():
            self.dovecot.append_many(user, [message(self.tag, n, self.body_bytes) for n in numbers])
            with self.lock:
                for n in numbers:
                    self.appended[f"<{self.tag}-{n}@reliability>"] = user

    def background(self, rate: float, batch: int = 5) -> Appender:
        return Appender(self, rate, batch).start()


class Appender:
    """Appends ``rate`` messages per second in a thread until :meth:`stop` (heavy ingest)."""

    def __init__(self, ledger: Ledger, rate: float, batch: int) -> None:
        self.ledger = ledger
        self.rate = rate
        self.batch = batch
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.errors: list[str] = []

    def start(self) -> Appender:
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.ledger.append(self.batch)
            except Exception as exc:  # noqa: BLE001 - surfaced by stop(): appends must not fail here
                self.errors.append(repr(exc))
                return
            self.stopping.wait(max(0.0, self.batch / self.rate - (time.monotonic() - started)))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)
        assert not self.errors, f"appending failed: {self.errors}"


def store_census(daemon: Daemon, message_ids: set[str] | None = None) -> tuple[set[str], int]:
    """(Message-IDs stored, duplicates): a Message-ID under two keys of one UIDVALIDITY is a duplicate."""
    rows = daemon.query("SELECT account_id, folder, uidvalidity, message_id FROM messages")
    counts = collections.Counter(rows)
    stored = {r[3] for r in rows if message_ids is None or r[3] in message_ids}
    duplicated = sum(c - 1 for key, c in counts.items() if message_ids is None or key[3] in message_ids)
    return stored, duplicated


DEDUP_WINDOW_MS = 300_000  # SQS FIFO: a repeated MessageDeduplicationId within 5 minutes is dropped


class QueueConsumer:
    """Receives (and deletes) everything on a FIFO queue in a thread, recording each delivery.

    Runs for the whole test like a real consumer would; it also keeps moto's FIFO queue short,
    which moto needs (its send time grows with the queue's length). moto deduplicates only
    against messages still in the queue, while SQS remembers a MessageDeduplicationId for five
    minutes whatever happened to the message; so a repeat is counted as a duplicate only when SQS
    would have delivered it too: another deduplication id, or sent after the window.
    """

    def __init__(self, moto: Any, queue_url: str) -> None:
        self.client = moto.client("sqs")
        self.queue_url = queue_url
        self.deliveries: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def receive(self) -> int:
        reply = self.client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                            VisibilityTimeout=60, AttributeNames=["All"])
        batch = reply.get("Messages", [])
        for item in batch:
            attributes = item.get("Attributes", {})
            self.deliveries[json.loads(item["Body"])["key"]].append(
                (attributes.get("MessageDeduplicationId", ""), int(attributes.get("SentTimestamp", 0))))
        if batch:
            self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": item["ReceiptHandle"]} for i, item in enumerate(batch)])
        return len(batch)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.receive()
            except Exception:  # noqa: BLE001 - moto busy or briefly unreachable: a consumer tries again
                self.stopping.wait(0.5)

    def finish(self, quiet_polls: int = 3) -> tuple[set[str], int, int]:
        """Stop the thread, receive until the queue stays empty; (keys, duplicates, repeats SQS drops)."""
        self.stopping.set()
        self.thread.join(30)
        quiet = 0
        while quiet < quiet_polls:
            quiet = 0 if self.receive() else quiet + 1
        duplicates = repeats = 0
        for sends in self.deliveries.values():
            first_id, first_at = sends[0]
            for dedup_id, sent_at in sends[1:]:
                if dedup_id == first_id and dedup_id and sent_at - first_at < DEDUP_WINDOW_MS:
                    repeats += 1
                else:
                    duplicates += 1
        return set(self.deliveries), duplicates, repeats


def audit(daemon: Daemon, ledger: Ledger, fault: str, injected: int, *, recovered_from: float | None = None,
          timeout: float = 120, consumer: QueueConsumer | None = None, expected: set[str] | None = None) -> Row:
    """Wait until every appended message is stored, then count: stored, duplicated, missing, queue.

    ``recovered_from``: monotonic time the fault ended; the row's recovery time runs from there
    to the moment the store held everything. ``expected`` narrows what must be stored (messages
    expunged before they were fetched may or may not be).
    """
    wanted = set(ledger.appended) if expected is None else expected
    try:
        wait_until(lambda: wanted <= store_census(daemon, wanted)[0], timeout, 0.25,
                   f"every appended message stored\n{daemon.log_tail()}")
    except AssertionError:
        pass  # counted as missing below, and the assertion there says what is missing
    recovery = None if recovered_from is None else time.monotonic() - recovered_from
    stored, duplicated = store_census(daemon, set(ledger.appended))
    queue_dups = repeats = None
    if consumer is not None:
        wait_until(lambda: daemon.query("SELECT COUNT(*) FROM outbox")[0][0] == 0, timeout, 0.25,
                   f"an empty outbox\n{daemon.log_tail()}")
        delivered, queue_dups, repeats = consumer.finish()
        keys = {f"{a}/{f}/{v}/{u}" for a, f, v, u in daemon.stored_keys()}
        assert keys <= delivered, f"{len(keys - delivered)} stored messages never announced"
    row = Row(fault, injected, len(ledger.appended), len(stored), duplicated, len(wanted - stored),
              queue_dups, repeats, recovery)
    ROWS.append(row)
    assert row.duplicated == 0, f"{fault}: {duplicated} messages stored twice"
    assert row.missing == 0, f"{fault}: missing {sorted(wanted - stored)[:10]}\n{daemon.log_tail()}"
    assert not queue_dups, f"{fault}: {queue_dups} duplicate deliveries on a FIFO queue"
    return row


def queue_section(url: str, endpoint: str) -> str:
    """A [queue] table for SQS at ``endpoint`` with quick retries."""
    return (f'\n[queue]\nkind = "sqs"\nurl = "{url}"\nendpoint_url = "{endpoint}"\n'
            'retry_base = "0.5s"\nretry_max = "2s"\n')


def control_outputs(daemon: Daemon) -> dict[str, str]:
    """Everything an operator sees of the daemon: log, status (text and JSON), metrics, accounts."""
    outputs = {"log": daemon.log_path.read_text(errors="replace"),
               "status --json": daemon.ctl("status", "--json").stdout,
               "status": daemon.ctl("status").stdout,
               "metrics": (daemon.metrics_dir / "mailingestd.prom").read_text(),
               "messages": daemon.ctl("messages", "--limit", "50").stdout}
    listing = daemon.ctl("account", "list", "--json").stdout
    outputs["account list"] = listing + daemon.ctl("account", "list").stdout
    for entry in json.loads(listing):
        account_id = entry["id"] if isinstance(entry, dict) else entry
        outputs[f"account show {account_id}"] = daemon.ctl("account", "show", account_id).stdout
    return outputs


def assert_no_secrets(daemon: Daemon, secrets: Any) -> None:
    """No password of the run in any output of the daemon or of mailingestctl."""
    outputs = control_outputs(daemon)
    assert len(outputs) > 5
    for secret in secrets:
        for name, text in outputs.items():
            assert secret not in text, f"a password appears in {name}"


def restarts(daemon: Daemon) -> dict[str, int]:
    return {f"{c['role']}-{c['slot']}": c["restarts"] for c in daemon.status()["children"]}


def accounts_for(dovecot: Any, users: list[str], **extra: Any) -> str:
    return "".join(account_toml(u, dovecot.host, dovecot.port, **extra) for u in users)


def random_moments(count: int, spread: float, rng: random.Random) -> list[float]:
    """``count`` sleeps adding up to about ``count * spread`` seconds, each in [0.2, spread*2)."""
    return [rng.uniform(0.2, spread * 2) for _ in range(count)]


class TcpProxy:
    """A loopback TCP forwarder that can be taken down (connections refused) and brought back.

    Stands in front of moto_server so that "the SQS endpoint is down" without losing moto's
    in-memory queue, which a restart of moto would.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.listener: socket.socket | None = None
        self.swallow = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def blackhole(self) -> None:
        """Accept connections and never answer (a hung endpoint, not a refusing one)."""
        self.down()
        self.swallow = True
        self.up()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self.lock:
            if self.listener is not None:
                try:
                    self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(): the port is free at once
                except OSError:
                    pass
                self.listener.close()
                self.listener = None
            self.swallow = False
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.swallow:
                with self.lock:
                    self.conns.append(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
