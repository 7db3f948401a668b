"""Fixtures over real throwaway servers (devtools.devservers): nothing here is a mock.

Session-scoped servers are started once on loopback high ports; per-test isolation comes from
fresh names on them: a new Dovecot user (``mailbox``), a new database (``pg_url``), a new queue
(``sqs_queue``, ``sqs_fifo_queue``). A missing server binary fails the test with the package to
install; nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hostile_imap import HostileServer

from devtools.devservers import (
    Cyrus,
    Dovecot,
    MissingBinaryError,
    MotoServer,
    NodeExporter,
    Postgres,
    Prometheus,
    ServerStartError,
)


ServerT = TypeVar("ServerT", Cyrus, Dovecot, Postgres, MotoServer, NodeExporter, Prometheus)


def _started(server_factory: Callable[[], ServerT]) -> ServerT:
    """Build and start a server, turning setup problems into one clear failure line."""
    try:
        server = server_factory()
        server.start()
    except (MissingBinaryError, ServerStartError) as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """Dovecot with IDLE and 20 users (user1..user20); prefer ``mailbox`` for a private one."""
    server = _started(lambda: Dovecot(tmp_path_factory.mktemp("dovecot"), users=20))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot_noidle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """Dovecot without IDLE in its capabilities: clients must poll."""
    server = _started(lambda: Dovecot(tmp_path_factory.mktemp("dovecot-noidle"), users=20, idle=False))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cyrus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cyrus]:
    """Cyrus IMAP 3.6: IDLE but no NOTIFY; ``cyrus.new_user()`` for a user of your own."""
    server = _started(lambda: Cyrus(tmp_path_factory.mktemp("cyrus")))
    yield server
    server.stop()


@pytest.fixture
def mailbox(dovecot: Dovecot) -> str:
    """A username on the session ``dovecot`` that no other test uses: its INBOX starts empty."""
    return dovecot.new_user()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """PostgreSQL 15 run as the postgres user; use ``pg_url`` for a database of your own."""
    server = _started(lambda: Postgres(tmp_path_factory.mktemp("postgres")))
    yield server
    server.stop(mode="immediate")  # throwaway data: no shutdown checkpoint needed


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """URL of a fresh, empty database on the session PostgreSQL."""
    return postgres.create_database(f"test_{uuid.uuid4().hex}")


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto_server for SQS; dummy AWS credentials are put in the environment for boto3."""
    server = _started(lambda: MotoServer(tmp_path_factory.mktemp("moto")))
    # The code under test builds its boto3 client the production way, from the environment.
    for name, value in server.env.items():
        if name != "AWS_ENDPOINT_URL":
            os.environ.setdefault(name, value)
    yield server
    server.stop()


@pytest.fixture
def sqs_queue(moto: MotoServer) -> str:
    """URL of a fresh standard SQS queue."""
    return moto.create_queue(f"test-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def sqs_fifo_queue(moto: MotoServer) -> str:
    """URL of a fresh FIFO SQS queue (explicit deduplication ids, no content-based dedup)."""
    return moto.create_queue(f"test-{uuid.uuid4().hex[:20]}", fifo=True)


def _per_test(make: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The body of a factory fixture: ``make(n, *args)`` builds the test's n-th server, ``start``
    starts it (setup problems become one clear failure), and every one is stopped after the test."""
    started: list[Any] = []

    def start(*args: Any, **kwargs: Any) -> Any:
        server = _started(lambda: make(len(started), *args, **kwargs))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[Callable[[Path], NodeExporter]]:
    """Factory: ``node_exporter(textfile_dir)`` starts one on that directory; stopped after the test."""
    yield from _per_test(lambda n, textfile_dir: NodeExporter(textfile_dir, root=tmp_path / f"node_exporter-{n}"))


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Factory: ``prometheus(["127.0.0.1:9100"], scrape_interval="1s")``; stopped after the test."""
    yield from _per_test(lambda n, scrape_targets, scrape_interval="1s":
                         Prometheus(tmp_path / f"prometheus-{n}", scrape_targets, scrape_interval=scrape_interval))


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    """Factory: ``hostile(scenario, host="127.0.0.2")`` starts a scripted server (tests/hostile_imap.py,
    for misbehaviour no real server produces on demand); every one is stopped after the test."""
    yield from _per_test(lambda n, scenario, **options: HostileServer(scenario, **options))
