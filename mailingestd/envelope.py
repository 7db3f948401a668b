"""The queue's contract: the announcement of one stored message (docs/envelope.schema.json).

Built by the store at commit time (the outbox row commits with the message row, rule 5) and sent
as-is by the publisher; a module of its own beside frames.py because it is a contract between
roles, and roles do not import each other.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from .keys import message_key


ENVELOPE_VERSION = 1


class Announced(Protocol):
    """What the envelope reads of a stored message (store/records.py's StoredMessage has it)."""
    uid: int
    message_id: str | None
    from_: str | None
    to: str | None
    cc: str | None
    subject: str | None
    date: str | None
    in_reply_to: str | None
    references: str | None
    size: int
    body_omitted: bool


def make_envelope(account_id: str, folder: str, uidvalidity: int, msg: Announced, ingested_at: float,
                  resync: bool, extra: dict[str, Any] | None = None) -> str:
    """The queue body (docs/envelope.schema.json) without the raw message: consumers claim it by key."""
    body = {
        "v": ENVELOPE_VERSION,
        "key": message_key(account_id, folder, uidvalidity, msg.uid),
        "account_id": account_id,
        "folder": folder,
        "uidvalidity": uidvalidity,
        "uid": msg.uid,
        "message_id": msg.message_id,
        "from": msg.from_,
        "to": msg.to,
        "cc": msg.cc,
        "subject": msg.subject,
        "date": msg.date,
        "in_reply_to": msg.in_reply_to,
        "references": msg.references,
        "size": msg.size,
        "ingested_at": ingested_at,
    }
    if resync:
        # Rule 1: a UIDVALIDITY change re-ingests the folder; say so instead of posing as new mail.
        body["resync"] = True
    if msg.body_omitted:
        body["body_omitted"] = True  # the store holds the header only; the body is on the server
    if extra:
        body.update(extra)  # raw bytes in S3: the payload pointer and sha256 (blobs.py)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

