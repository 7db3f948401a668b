"""The publisher process: runs the :class:`~mailingestd.publish.publisher.Publisher` loop under the supervisor."""

from __future__ import annotations

import time

from .. import frames
from ..child import Child
from ..config import Config
from ..store.leases import node_id
from .publisher import Publisher, PublishStats, make_sqs_client
from ..store.store import open_store


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

    publisher.run(lambda: child.stop_requested or not child.parent_alive(), on_tick)
    store.close()
    child.close()
    return 0
