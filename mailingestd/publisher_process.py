"""The publisher process: runs the :class:`~mailingestd.publisher.Publisher` loop under the supervisor."""

from __future__ import annotations

import time

from .child import Child
from .config import Config
from .publisher import Publisher, PublishStats
from .store import open_store


def main(config: Config, slot: int, parent_pid: int) -> int:
    child = Child(config, "publisher", slot, parent_pid)
    store = open_store(config.store_url, 1, 2)
    publisher = Publisher(store, config.queue)

    def on_tick(stats: PublishStats) -> None:
        now = time.monotonic()
        if child.heartbeat_due(now):
            child.heartbeat("running", now, stats={"published": stats.sent, "publish_errors": stats.failed,
                                                   "outbox_depth": stats.outbox_depth})

    publisher.run(lambda: child.stop_requested or not child.parent_alive(), on_tick)
    store.close()
    child.close()
    return 0
