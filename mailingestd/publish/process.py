"""The publisher process: runs the :class:`~mailingestd.publish.publisher.Publisher` loop under the supervisor."""

from __future__ import annotations

import logging
import select
import time
from typing import Any, Callable

from .. import frames
from ..child import Child
from ..config import Config
from ..store.leases import node_id
from ..store.postgres import listen_outbox
from ..store.store import open_store
from .publisher import Publisher, PublishStats, make_sqs_client

log = logging.getLogger(__name__)

SLEEP_SLICE = 0.5  # seconds: how long an idle publisher sleeps between its heartbeats and stop checks


class CommitWakeup:
    """With PostgreSQL, an idle publisher waits for the NOTIFY of a commit that queued
    announcements (store.postgres.listen_outbox), at most ``longest`` seconds (a heartbeat),
    instead of polling the outbox every ``queue.poll_interval``. Without its connection (the store
    down, or a restart broke it) it polls, and connects again at most every RECONNECT seconds."""

    RECONNECT = 30.0

    def __init__(self, url: str, longest: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.longest = longest
        self.sleep = sleep  # the wait without a connection (main: one that heartbeats)
        self.conn: Any = None
        self.retry_at = 0.0

    def wait(self, shortest: float) -> None:
        if self.conn is None and time.monotonic() >= self.retry_at:
            try:
                self.conn = listen_outbox(self.url)
            except Exception as exc:
                self.retry_at = time.monotonic() + self.RECONNECT
                log.warning("event=outbox_listen_failed error=%s action=poll",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if self.conn is None:
            self.sleep(shortest)
            return
        try:
            if select.select([self.conn.fileno()], [], [], self.longest)[0]:
                for _ in self.conn.notifies(timeout=0):
                    pass
        except Exception:
            self.close()
            self.retry_at = time.monotonic() + self.RECONNECT
            self.sleep(shortest)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def main(config: Config, slot: int, parent_pid: int) -> int:
    child = Child(config, "publisher", slot, parent_pid)
    store = open_store(config.store_url, 1, 2)
    # Every SQS call (two attempts, each a connect and a read) ends well inside heartbeat_timeout:
    # a blackholed endpoint must not get the publisher killed as stuck, over and over.
    timeout = min(10.0, config.daemon.heartbeat_timeout / 5)
    publisher = Publisher(store, config.queue, client=make_sqs_client(config.queue, timeout),
                          node=node_id(config), claim_seconds=config.cluster.lease_time)

    def on_tick(stats: PublishStats) -> None:
        now = time.monotonic()
        if child.heartbeat_due(now):
            child.heartbeat("running", now, stats=frames.PublisherStats(
                published=stats.sent, publish_errors=stats.failed, outbox_depth=stats.outbox_depth,
                parked=stats.parked, outbox_oldest_age=stats.oldest_age, publish_rate=stats.rate))

    def should_stop() -> bool:
        return child.stop_requested or not child.parent_alive()

    def sleep(seconds: float) -> None:
        """Sleep ``seconds`` (queue.poll_interval: any length) in short slices, heartbeating between
        them: a poll interval longer than daemon.heartbeat_timeout must not get the publisher
        killed as stuck, nor keep a stop waiting for it."""
        until = time.monotonic() + seconds
        while not should_stop() and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, SLEEP_SLICE))
            on_tick(publisher.stats)

    publisher.idle_wait = sleep
    wakeup = None
    if config.store_url.startswith(("postgresql:", "postgres:")):
        wakeup = CommitWakeup(config.store_url, config.daemon.heartbeat_interval, sleep)
        publisher.idle_wait = wakeup.wait
    publisher.run(should_stop, on_tick)
    if wakeup is not None:
        wakeup.close()
    store.close()
    child.close()
    return 0
