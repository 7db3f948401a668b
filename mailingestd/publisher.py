"""The publisher: announce committed messages from the outbox on SQS, then forget them.

An outbox row is deleted only after SQS acknowledged its entry, so a crash anywhere repeats an
announcement (at-least-once) and never loses one; FIFO queues deduplicate on the key's sha256
within their five-minute window, and consumers dedupe on the key beyond it. Entries SQS refuses
are retried with exponential backoff and jitter, each on its own clock, without holding back
the rest of the outbox: the scan reads past rows still waiting for their retry (500 rows that
always fail once stopped all publishing), a batch SQS refused as a whole for a fault of the
sender is retried one entry per request so that one bad entry does not hold back nine good
ones, and an entry that failed ``PARK_AFTER`` times is counted as parked (``parked`` in the
heartbeat, status and metrics; it is still retried every ``queue.retry_max``, never dropped).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import logging
import random
import time
from typing import Any, Callable

import msgspec

from .backoff import backoff_delay
from .config import QueueConfig
from .store import OutboxEntry, Store

log = logging.getLogger(__name__)

SQS_MAX_BYTES = 256 * 1024  # per message and per SendMessageBatch request
SCAN_WINDOW = 500
SCAN_PAGES = 20  # a step reads at most this many windows to find due rows behind waiting ones
PARK_AFTER = 5
# One publish_once step starts no new SendMessageBatch after this long, so the process heartbeats
# between steps even when SQS answers slowly and the outbox is deep.
STEP_SECONDS = 1.0


class PublishStats(msgspec.Struct):
    sent: int = 0
    failed: int = 0
    outbox_depth: int = 0
    parked: int = 0


def make_sqs_client(queue: QueueConfig, timeout: float = 10.0) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "sqs", region_name=queue.region, endpoint_url=queue.endpoint_url,
        config=BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2}),
    )


def dedup_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Publisher:
    """Moves outbox rows to the queue; ``publish_once`` is one bounded step of that."""

    def __init__(self, store: Store, queue: QueueConfig, client: Any = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.queue = queue
        self.client = client if client is not None else make_sqs_client(queue)
        self.fifo = queue.url.endswith(".fifo")
        # Several SendMessageBatch calls in flight on a standard queue: one at a time, each a
        # network round trip, caps the publisher at a few hundred envelopes a second. A FIFO
        # queue sends one at a time so that no message group is reordered.
        self.concurrency = 1 if self.fifo else max(1, queue.concurrency)
        self.pool = (concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="sqs-send")
                     if self.concurrency > 1 else None)
        self.rng = rng or random.Random()
        self.clock = clock
        self.attempts: dict[int, int] = {}
        self.retry_at: dict[int, float] = {}
        self.alone: set[int] = set()  # entries of a batch refused as a whole: sent one per request
        self.stats = PublishStats()

    def _body(self, entry: OutboxEntry) -> str:
        if not self.queue.inline_raw:
            return entry.envelope
        raw = self.store.message_raw(entry.key)
        if raw is None:
            return entry.envelope
        body = json.loads(entry.envelope)
        body["raw_base64"] = base64.b64encode(raw).decode()
        inlined = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        # Inline only when it fits; otherwise the key is the claim check.
        return inlined if len(inlined.encode()) < SQS_MAX_BYTES else entry.envelope

    def _request(self, entries: list[OutboxEntry]) -> list[tuple[OutboxEntry, dict[str, Any]]]:
        out = []
        for entry in entries:
            item: dict[str, Any] = {"Id": str(entry.id), "MessageBody": self._body(entry)}
            if self.fifo:
                item["MessageGroupId"] = entry.account_id
                item["MessageDeduplicationId"] = dedup_id(entry.key)
            out.append((entry, item))
        return out

    def _groups(self, items: list[tuple[OutboxEntry, dict[str, Any]]]) -> list[list[tuple[OutboxEntry, dict]]]:
        """Up to batch_size entries and 256 KiB of bodies per SendMessageBatch."""
        groups: list[list[tuple[OutboxEntry, dict]]] = []
        current: list[tuple[OutboxEntry, dict]] = []
        size = 0
        for entry, item in items:
            body_size = len(item["MessageBody"].encode())
            if entry.id in self.alone:
                groups.append([(entry, item)])
                continue
            if current and (len(current) >= self.queue.batch_size or size + body_size > SQS_MAX_BYTES):
                groups.append(current)
                current, size = [], 0
            current.append((entry, item))
            size += body_size
        if current:
            groups.append(current)
        return groups

    def _failed(self, entry: OutboxEntry, reason: str, now: float) -> None:
        attempt = self.attempts.get(entry.id, 0) + 1
        self.attempts[entry.id] = attempt
        delay = backoff_delay(attempt, self.queue.retry_base, self.queue.retry_max, self.rng)
        self.retry_at[entry.id] = now + delay
        self.stats.failed += 1
        if attempt == PARK_AFTER:
            log.error("event=publish_parked key=%s attempts=%d retry_every=%.0fs error=%s", entry.key, attempt,
                      self.queue.retry_max, reason)
        else:
            log.warning("event=publish_failed key=%s attempt=%d retry_in=%.1fs error=%s", entry.key, attempt, delay,
                        reason)

    def due_entries(self, now: float) -> list[OutboxEntry]:
        """Up to SCAN_WINDOW entries due now, oldest first, read past the ones waiting for a retry."""
        due: list[OutboxEntry] = []
        after = 0
        for _ in range(SCAN_PAGES):
            window = self.store.outbox_batch(SCAN_WINDOW, after_id=after)
            due += [e for e in window if self.retry_at.get(e.id, 0.0) <= now]
            if len(due) >= SCAN_WINDOW or len(window) < SCAN_WINDOW:
                break
            after = window[-1].id
        return due[:SCAN_WINDOW]

    def publish_once(self) -> int:
        """Send what is due in the oldest part of the outbox; returns how many were acknowledged."""
        now = self.clock()
        due = self.due_entries(now)
        sent = 0
        groups = self._groups(self._request(due))
        for start in range(0, len(groups), self.concurrency):
            if self.clock() - now > STEP_SECONDS:
                break
            wave = groups[start:start + self.concurrency]
            replies = (list(self.pool.map(self._send, wave)) if self.pool is not None and len(wave) > 1
                       else [self._send(group) for group in wave])
            done: list[int] = []
            for group, (reply, reason, sender_fault) in zip(wave, replies):
                if reply is None:  # endpoint down, credentials, throttling: the whole group waits
                    for entry, _ in group:
                        self._failed(entry, reason, now)
                        if sender_fault and len(group) > 1:
                            self.alone.add(entry.id)
                    continue
                by_id = {item["Id"]: entry for entry, item in group}
                done += [by_id[ok["Id"]].id for ok in reply.get("Successful", [])]
                for failure in reply.get("Failed", []):
                    self._failed(by_id[failure["Id"]], f"{failure.get('Code')}: {failure.get('Message', '')}", now)
            if done:
                self.store.outbox_delete(done)
                for outbox_id in done:
                    self.attempts.pop(outbox_id, None)
                    self.retry_at.pop(outbox_id, None)
                    self.alone.discard(outbox_id)
                sent += len(done)
        self.stats.sent += sent
        self.stats.parked = sum(1 for attempts in self.attempts.values() if attempts >= PARK_AFTER)
        return sent

    def _send(self, group: list[tuple[OutboxEntry, dict]]) -> tuple[dict[str, Any] | None, str, bool]:
        """One SendMessageBatch: (the reply, "", False) or (None, the reason it failed as one line,
        whether SQS refused the request itself as the sender's fault: an entry of it is bad)."""
        try:
            return self.client.send_message_batch(QueueUrl=self.queue.url,
                                                  Entries=[item for _, item in group]), "", False
        except Exception as exc:
            error = getattr(exc, "response", {}).get("Error", {})  # botocore's ClientError
            code = str(error.get("Code", ""))
            sender_fault = (getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") == 400
                            and "Throttl" not in code and "Credential" not in code and "Signature" not in code)
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", sender_fault

    def run(self, should_stop: Callable[[], bool], on_tick: Callable[[PublishStats], None] | None = None) -> None:
        """Publish until ``should_stop``; idles ``poll_interval`` when the outbox has nothing due."""
        while not should_stop():
            try:
                sent = self.publish_once()
                self.stats.outbox_depth = self.store.outbox_depth()
            except Exception as exc:  # a store outage must not kill the publisher: wait and retry
                log.error("event=publisher_error error=%s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                sent = 0
                time.sleep(min(self.queue.retry_max, 2.0))
            if on_tick is not None:
                on_tick(self.stats)
            if not sent:
                time.sleep(self.queue.poll_interval)
