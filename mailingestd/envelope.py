"""The queue's contract: the announcement of one stored message (docs/envelope.schema.json).

Built by the store at commit time (the outbox row commits with the message row, rule 5) and sent
as-is by the publisher; a module of its own beside frames.py because it is a contract between
roles, and roles do not import each other.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .keys import message_key


ENVELOPE_VERSION = 1
_JSON = msgspec.json.Encoder()


class Headers(msgspec.Struct, frozen=True, kw_only=True):
    """The header fields a stored message carries and its envelope announces, decoded best effort
    (fetch/message.py); None where the message has no such header or it did not parse."""
    message_id: str | None = None
    from_: str | None = None
    to: str | None = None
    cc: str | None = None
    subject: str | None = None
    date: str | None = None
    in_reply_to: str | None = None
    references: str | None = None


class Announced(Headers, frozen=True, kw_only=True):
    """What the envelope says of one stored message (store/records.py's StoredMessage adds the raw
    bytes and the server's INTERNALDATE). ``size`` is the stored bytes, or the server's size of a
    message whose body was left on the server (``body_omitted``)."""
    uid: int
    size: int
    body_omitted: bool = False


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
    # msgspec writes the JSON json.dumps(ensure_ascii=False, separators=(",", ":")) writes, at a
    # sixth of the cost (one envelope a message); a lone surrogate, which no decoded header
    # holds, raises here as it would have when the store encoded the row.
    return _JSON.encode(body).decode()

