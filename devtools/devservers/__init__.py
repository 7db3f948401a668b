"""Real throwaway servers for the demo, the tests and the benchmarks.

Every class here starts a real server process on 127.0.0.1 and a free high port, with all of its
files under one directory you give it: Dovecot and Cyrus (IMAP), PostgreSQL, moto_server (SQS),
Prometheus's node_exporter and Prometheus itself. Nothing here is mocked and nothing imports pytest,
so the same code serves ``tests/conftest.py``, ``bench/`` and ``python -m devtools.devservers``
(the README demo).

Common contract: ``start()`` waits until the server answers and raises :class:`ServerStartError` with
the tail of the server's log when it does not within its timeout; ``stop()`` waits until the process
is gone; ``restart()`` is stop + start on the same port; every instance is also a context manager, and
an ``atexit`` hook kills whatever is still running when the interpreter exits (a failed test must not
leave a Dovecot behind). A missing binary raises :class:`MissingBinaryError` naming the Debian or PyPI
package to install.

Dovecot, Cyrus and PostgreSQL need root: the Dovecot and Cyrus masters start as root and drop to the
``dovecot`` and ``cyrus`` users, and ``initdb`` refuses root, so PostgreSQL runs as the ``postgres``
system user.
"""

from ._common import _CAPABILITIES_WITHOUT_IDLE, LOOPBACK, MissingBinaryError, ServerStartError, free_port  # noqa: F401
from .cyrus import Cyrus
from .dovecot import Dovecot
from .moto import MotoServer
from .postgres import Postgres
from .prometheus import NodeExporter, Prometheus

__all__ = [
    "Cyrus",
    "Dovecot",
    "MissingBinaryError",
    "MotoServer",
    "NodeExporter",
    "Postgres",
    "Prometheus",
    "ServerStartError",
    "free_port",
]
