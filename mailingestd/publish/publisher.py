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

Speed (docs/scale-out.md, "Publishing"): each step claims up to ``SCAN_WINDOW`` rows
(``Store.outbox_claim``: on PostgreSQL, rows no other node is sending), packs them into
SendMessageBatch requests of up to ``queue.batch_size`` entries and the queue's maximum message
size (read from the queue, at most 1 MiB per message and per request), sends up to
``queue.concurrency`` requests at once, and deletes what SQS acknowledged in one statement. On a
FIFO queue the requests in flight at once are for different message groups (a group is one
account; each group keeps to one lane, and a lane sends its requests one after the other), so
order within a group is kept; a group whose entry failed waits for that entry's retry until
the entry is parked, so a transient failure does not reorder it either.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import logging
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgspec

from ..backoff import backoff_delay
from ..config import QueueConfig
from ..store.store import OutboxEntry, Store

log = logging.getLogger(__name__)

# SQS takes up to 1 MiB per message and per SendMessageBatch request (raised from 256 KiB in 2025;
# botocore's SQS model documents MaximumMessageSize "up to 1,048,576 bytes (1 MiB)"). A queue
# may be set lower: its MaximumMessageSize attribute is read and honoured.
SQS_MAX_BYTES = 1024 * 1024
MAX_SIZE_RECHECK = 60.0  # seconds before asking the queue for its maximum again after a failure
SCAN_WINDOW = 1000  # rows a step claims: 100 full requests; fewer leave FIFO lanes' last requests short
SCAN_PAGES = 20  # a step reads at most this many windows to find due rows behind waiting ones
PARK_AFTER = 5
# One publish_once step starts no new SendMessageBatch after this long, so the process heartbeats
# between steps even when SQS answers slowly and the outbox is deep.
STEP_SECONDS = 1.0
RATE_WINDOW = 60.0  # seconds over which PublishStats.rate is measured
# Depth and oldest age are counted at most this often while the publisher is busy: a COUNT over an
# outbox of 100,000 rows costs PostgreSQL about as much as claiming 1,000 of them (30 ms here).
SUMMARY_EVERY = 5.0

Item = tuple[OutboxEntry, dict[str, Any]]
Reply = tuple[list[Item], "dict[str, Any] | None", str, bool]


class PublishStats(msgspec.Struct):
    sent: int = 0
    failed: int = 0
    outbox_depth: int = 0
    parked: int = 0
    oldest_age: float = 0.0  # seconds the oldest outbox row has waited (0: empty)
    rate: float = 0.0  # envelopes acknowledged per second over the last RATE_WINDOW


def make_sqs_client(queue: QueueConfig, timeout: float = 10.0) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "sqs", region_name=queue.region, endpoint_url=queue.endpoint_url,
        # parameter_validation off: the entries are built here, always well-formed, and checking
        # them costs a tenth of the publisher's CPU; SQS still refuses what it does not take.
        config=BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2},
                          max_pool_connections=max(10, queue.concurrency), parameter_validation=False),
    )


def dedup_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Publisher:
    """Moves outbox rows to the queue; ``publish_once`` is one bounded step of that.

    ``node`` names this publisher's claims on a shared PostgreSQL outbox; ``claim_seconds`` (the
    cluster's lease time) is how long a claim lasts if this node dies holding it."""

    def __init__(self, store: Store, queue: QueueConfig, client: Any = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 node: str = "", claim_seconds: float = 30.0) -> None:
        self.store = store
        self.queue = queue
        self.client = client if client is not None else make_sqs_client(queue)
        self.fifo = queue.url.endswith(".fifo")
        self.node = node
        self.claim_seconds = claim_seconds
        self.concurrency = max(1, queue.concurrency)
        # Requests go out on the pool even with one lane, so the store work of a step overlaps them.
        self.pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="sqs-send")
        self.rng = rng or random.Random()
        # How the loop waits when nothing was due: a sleep, or (PostgreSQL) a wait for the commit's
        # NOTIFY that process.py installs.
        self.idle_wait: Callable[[float], None] = time.sleep
        self.clock = clock
        self.max_bytes: int | None = None  # the queue's MaximumMessageSize, once read
        self.max_bytes_checked = -MAX_SIZE_RECHECK
        self.max_bytes_warned = False
        self.attempts: dict[int, int] = {}
        self.retry_at: dict[int, float] = {}
        self.group_of: dict[int, str] = {}  # message group of each entry waiting for a retry
        self.alone: set[int] = set()  # entries of a batch refused as a whole: sent one per request
        self.sent_log: list[tuple[float, int]] = []  # (when, sent) of recent steps, for the rate
        self.stats = PublishStats()

    # --- what one request holds -------------------------------------------------------------------
    def message_limit(self) -> int:
        """The queue's MaximumMessageSize (at most SQS_MAX_BYTES), asked once; SQS_MAX_BYTES until known."""
        now = self.clock()
        if self.max_bytes is None and now - self.max_bytes_checked >= MAX_SIZE_RECHECK:
            self.max_bytes_checked = now
            try:
                attributes = self.client.get_queue_attributes(QueueUrl=self.queue.url,
                                                              AttributeNames=["MaximumMessageSize"])["Attributes"]
                self.max_bytes = min(SQS_MAX_BYTES, int(attributes["MaximumMessageSize"]))
                log.info("event=queue_limits max_message_bytes=%d fifo=%s concurrency=%d", self.max_bytes,
                         self.fifo, self.concurrency)
            except Exception as exc:  # endpoint down, no sqs:GetQueueAttributes: the documented maximum
                # Logged once: a policy that grants only sqs:SendMessage works, with 1 MiB assumed.
                (log.debug if self.max_bytes_warned else log.warning)(
                    "event=queue_limits_unknown assumed=%d retry_in=%.0fs error=%s", SQS_MAX_BYTES, MAX_SIZE_RECHECK,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.max_bytes_warned = True
        return self.max_bytes or SQS_MAX_BYTES

    def _body(self, entry: OutboxEntry, limit: int) -> str:
        if not self.queue.inline_raw:
            return entry.envelope
        raw = self.store.message_raw(entry.key)
        if raw is None:
            return entry.envelope
        body = json.loads(entry.envelope)
        body["raw_base64"] = base64.b64encode(raw).decode()
        inlined = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        # Inline only when it fits; otherwise the key is the claim check.
        return inlined if len(inlined.encode()) <= limit else entry.envelope

    def _request(self, entries: list[OutboxEntry], limit: int) -> list[Item]:
        out = []
        for entry in entries:
            item: dict[str, Any] = {"Id": str(entry.id), "MessageBody": self._body(entry, limit)}
            if self.fifo:
                item["MessageGroupId"] = entry.account_id
                item["MessageDeduplicationId"] = dedup_id(entry.key)
            out.append((entry, item))
        return out

    def _batches(self, items: list[Item], limit: int) -> list[list[Item]]:
        """Up to batch_size entries and ``limit`` bytes of bodies per SendMessageBatch, in order."""
        batches: list[list[Item]] = []
        current: list[Item] = []
        size = 0
        for entry, item in items:
            body_size = len(item["MessageBody"].encode())
            if entry.id in self.alone:
                batches.append([(entry, item)])
                continue
            if current and (len(current) >= self.queue.batch_size or size + body_size > limit):
                batches.append(current)
                current, size = [], 0
            current.append((entry, item))
            size += body_size
        if current:
            batches.append(current)
        return batches

    def lanes(self, items: list[Item], limit: int) -> list[list[list[Item]]]:
        """The step's requests split into at most ``concurrency`` lanes that run side by side; a
        lane sends its requests one after the other. FIFO: a message group (an account) always
        falls in the same lane, so its entries leave in order; standard: requests dealt in turn."""
        if not self.fifo:
            lanes: list[list[list[Item]]] = [[] for _ in range(self.concurrency)]
            for index, batch in enumerate(self._batches(items, limit)):
                lanes[index % self.concurrency].append(batch)
            return [lane for lane in lanes if lane]
        by_lane: dict[int, list[Item]] = {}
        for entry, item in items:
            by_lane.setdefault(zlib.crc32(entry.account_id.encode()) % self.concurrency, []).append((entry, item))
        return [self._batches(lane_items, limit) for _, lane_items in sorted(by_lane.items())]

    # --- one step -------------------------------------------------------------------------------------
    def _failed(self, entry: OutboxEntry, reason: str, now: float) -> None:
        attempt = self.attempts.get(entry.id, 0) + 1
        self.attempts[entry.id] = attempt
        self.group_of[entry.id] = entry.account_id
        delay = backoff_delay(attempt, self.queue.retry_base, self.queue.retry_max, self.rng)
        self.retry_at[entry.id] = now + delay
        self.stats.failed += 1
        if attempt == PARK_AFTER:
            log.error("event=publish_parked key=%s attempts=%d retry_every=%.0fs error=%s", entry.key, attempt,
                      self.queue.retry_max, reason)
        else:
            log.warning("event=publish_failed key=%s attempt=%d retry_in=%.1fs error=%s", entry.key, attempt, delay,
                        reason)

    def due_entries(self, now: float, exclude: list[int] | None = None) -> list[OutboxEntry]:
        """Up to SCAN_WINDOW entries due now, oldest first, read (and claimed) past the ones waiting
        for a retry and leaving out ``exclude``. FIFO: an entry behind one of its group's that
        waits for a retry (and is not parked) waits too, so a transient failure does not reorder
        the group."""
        due: list[OutboxEntry] = []
        after = 0
        for _ in range(SCAN_PAGES):
            window = self.store.outbox_claim(self.node, SCAN_WINDOW, after, self.claim_seconds, exclude or ())
            due += window
            if len(window) < SCAN_WINDOW or len(self.still_due(due, now)) >= SCAN_WINDOW:
                break
            after = window[-1].id
        return self.still_due(due, now)[:SCAN_WINDOW]

    def still_due(self, entries: list[OutboxEntry], now: float) -> list[OutboxEntry]:
        """``entries`` less those waiting for a retry (FIFO: and those behind one in their group)."""
        held = ({self.group_of[i] for i, attempts in self.attempts.items() if attempts < PARK_AFTER
                 and self.retry_at.get(i, 0.0) > now} if self.fifo else set())
        return [e for e in entries if self.retry_at.get(e.id, 0.0) <= now and e.account_id not in held]

    def publish_once(self) -> int:
        """Send what is due in the oldest part of the outbox; returns how many were acknowledged."""
        now = self.clock()
        sending = self._submit(self.due_entries(now), now)
        done = self._settle(sending, now)
        self._delete(done)
        return len(done)

    def _submit(self, due: list[OutboxEntry], now: float) -> list[concurrent.futures.Future[list[Reply]]]:
        """Start sending ``due`` in lanes on the pool: one future per lane."""
        limit = self.message_limit()
        lanes = self.lanes(self._request(due, limit), limit)
        deadline = now + STEP_SECONDS
        return [self.pool.submit(self._send_lane, lane, deadline) for lane in lanes]

    def _settle(self, sending: list[concurrent.futures.Future[list[Reply]]], now: float) -> list[int]:
        """Wait for the lanes, book failures for their retry; the ids SQS acknowledged."""
        done: list[int] = []
        for lane in sending:
            for batch, reply, reason, sender_fault in lane.result():
                if reply is None:  # endpoint down, credentials, throttling: the whole request waits
                    for entry, _ in batch:
                        self._failed(entry, reason, now)
                        if sender_fault and len(batch) > 1:
                            self.alone.add(entry.id)
                    continue
                by_id = {item["Id"]: entry for entry, item in batch}
                done += [by_id[ok["Id"]].id for ok in reply.get("Successful", [])]
                for failure in reply.get("Failed", []):
                    self._failed(by_id[failure["Id"]], f"{failure.get('Code')}: {failure.get('Message', '')}", now)
        for outbox_id in done:
            self.attempts.pop(outbox_id, None)
            self.retry_at.pop(outbox_id, None)
            self.group_of.pop(outbox_id, None)
            self.alone.discard(outbox_id)
        self.stats.sent += len(done)
        self.stats.parked = sum(1 for attempts in self.attempts.values() if attempts >= PARK_AFTER)
        self._measure_rate(len(done))
        return done

    def _delete(self, done: list[int]) -> None:
        if done:
            self.store.outbox_delete(done)  # one statement for a whole step

    def _measure_rate(self, sent: int) -> None:
        now = self.clock()
        self.sent_log.append((now, sent))
        while self.sent_log and now - self.sent_log[0][0] > RATE_WINDOW:
            self.sent_log.pop(0)
        span = now - self.sent_log[0][0] if len(self.sent_log) > 1 else 0.0
        counted = sum(n for _, n in self.sent_log[1:])
        self.stats.rate = round(counted / span, 1) if span > 0 else 0.0

    def _send_lane(self, lane: list[list[Item]], deadline: float) -> list[Reply]:
        """One lane's requests in order; none started after ``deadline``. FIFO: a request that
        failed as a whole stops the lane, so no later entry of its groups overtakes it."""
        replies: list[Reply] = []
        for batch in lane:
            if replies and self.clock() > deadline:
                break
            reply, reason, sender_fault = self._send(batch)
            replies.append((batch, reply, reason, sender_fault))
            if reply is None and self.fifo:
                break
        return replies

    def _send(self, batch: list[Item]) -> tuple[dict[str, Any] | None, str, bool]:
        """One SendMessageBatch: (the reply, "", False) or (None, the reason it failed as one line,
        whether SQS refused the request itself as the sender's fault: an entry of it is bad)."""
        try:
            return self.client.send_message_batch(QueueUrl=self.queue.url,
                                                  Entries=[item for _, item in batch]), "", False
        except Exception as exc:
            response = getattr(exc, "response", None) or {}  # botocore's ClientError; others have none
            code = str(response.get("Error", {}).get("Code", ""))
            sender_fault = (response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 400
                            and "Throttl" not in code and "Credential" not in code and "Signature" not in code)
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", sender_fault

    def run(self, should_stop: Callable[[], bool], on_tick: Callable[[PublishStats], None] | None = None) -> None:
        """Publish until ``should_stop``; idles ``poll_interval`` when the outbox has nothing due.

        Steps overlap their store work with SQS: while a step's requests are in flight, the rows the
        previous step got acknowledged are deleted and the next window is claimed (leaving out the
        rows in flight). A prefetched window is sent only after the current step is settled, so
        a FIFO group's later entries never overtake its earlier ones. On the way out, this node's
        claims are given back so that other nodes need not wait them out."""
        summarized = -SUMMARY_EVERY
        rate_shared = -SUMMARY_EVERY
        acknowledged: list[int] = []  # sent, not yet deleted: left out of every claim until deleted
        prefetched: list[OutboxEntry] | None = None
        sent_last = 0
        while not should_stop():
            sent = 0
            try:
                now = self.clock()
                due = (self.still_due(prefetched, now) if prefetched is not None
                       else self.due_entries(now, exclude=acknowledged))
                sending = self._submit(due, now)
                prefetched = None
                try:
                    self._delete(acknowledged)
                    acknowledged = []
                    if len(due) >= SCAN_WINDOW // 2:  # a backlog: the next window is there already
                        prefetched = self.due_entries(now, exclude=[e.id for e in due])
                finally:
                    acknowledged += self._settle(sending, now)
                sent_before, sent = sent_last, len(acknowledged)
                sent_last = sent
                # Idle with an outbox known empty: counted every SUMMARY_EVERY, not at every poll
                # (a quiet daemon's publisher would otherwise query twice per poll_interval).
                if (time.monotonic() - summarized >= SUMMARY_EVERY
                        or (not sent and (sent_before or self.stats.outbox_depth))):
                    summarized = time.monotonic()
                    self.stats.outbox_depth, self.stats.oldest_age = self.store.outbox_summary()
                if time.monotonic() - rate_shared >= SUMMARY_EVERY:
                    rate_shared = time.monotonic()
                    self.store.set_publish_rate(self.node, self.stats.rate)
            except Exception as exc:  # a store outage must not kill the publisher: wait and retry
                log.error("event=publisher_error error=%s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                prefetched = None
                time.sleep(min(self.queue.retry_max, 2.0))
            if on_tick is not None:
                on_tick(self.stats)
            if not sent:
                self.idle_wait(self.queue.poll_interval)
        try:
            self._delete(acknowledged)
            self.store.outbox_release(self.node)
        except Exception as exc:
            log.warning("event=outbox_release_failed node=%s error=%s (rows are sent again or the claims lapse)",
                        self.node, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.pool.shutdown(wait=False)
