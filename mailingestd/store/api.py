"""The one :class:`Store` interface every role uses, composed of one part per concern.

Why mixins: the roles call one object (``store.commit_batch``, ``store.upsert_account``,
``store.outbox_claim``) and a backend overrides single methods of any part (PostgreSQL's batch
statement, its outbox claims), which is plain method resolution with mixins and would need
forwarding methods with composition. Each part sees only :class:`~.base.StoreBase` (connections
and the execution API), so the parts do not call each other.
"""

from __future__ import annotations

from .accounts import Accounts
from .messages import Messages
from .outbox import Outbox
from .schema import Schema


class Store(Schema, Accounts, Messages, Outbox):
    """What the daemon and mailingestctl need from a store; sqlite.py and postgres.py supply the
    connections (:meth:`~.base.StoreBase.transaction`)."""
