"""Commands on one folder: its state (EXAMINE, STATUS), leaving it, and fetching its messages.

Invariants:

* Read-only towards the mailbox (rule 4): folders are selected with ``EXAMINE``, bodies fetched
  with ``BODY.PEEK[]`` (no \\Seen), and ``CLOSE`` only ever runs on a folder selected read-only,
  where it expunges nothing.
* ``FolderState.uidnext`` is a hint, never a promise (rule 3): :func:`uids_from` searches from a
  UID and drops what ``first:*`` returns below it.
* Every function lets only :class:`~.errors.ImapError` out; a reply without UIDVALIDITY is a
  ``PROTOCOL`` error, a missing folder a ``MAILBOX`` error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import imapclient

from .errors import FailureKind, ImapError, raises_imap_error
from .transport import bounded

__all__ = ["Fetched", "FolderState", "examine", "fetch_messages", "folder_state", "noop", "status",
           "uids_from", "unselect"]

_FETCH_ITEMS = [b"UID", b"RFC822.SIZE", b"INTERNALDATE", b"BODY.PEEK[]"]


@dataclass(frozen=True, slots=True)
class FolderState:
    """What the server says about a folder. ``uidnext`` is a hint, never a promise (rule 3);
    ``highestmodseq`` is None without CONDSTORE; ``uidnext`` is None if the server omitted it."""

    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None = None


@dataclass(frozen=True, slots=True)
class Fetched:
    """One fetched message: ``raw`` is the RFC 5322 bytes exactly as the server sent them,
    ``size`` the server's RFC822.SIZE, ``internaldate`` time-zone aware (None if missing)."""

    uid: int
    raw: bytes
    size: int
    internaldate: datetime | None


def folder_state(response: dict[bytes, Any], command: str) -> FolderState:
    if b"UIDVALIDITY" not in response:
        raise ImapError(FailureKind.PROTOCOL, f"{command} reply has no UIDVALIDITY")
    modseq = response.get(b"HIGHESTMODSEQ")
    return FolderState(
        uidvalidity=int(response[b"UIDVALIDITY"]),
        uidnext=int(response[b"UIDNEXT"]) if b"UIDNEXT" in response else None,
        exists=int(response.get(b"EXISTS", response.get(b"MESSAGES", 0))),
        highestmodseq=int(modseq) if modseq is not None else None,
    )


@raises_imap_error
def examine(client: imapclient.IMAPClient, folder: str) -> FolderState:
    """Select ``folder`` read-only (``EXAMINE``) and return its state.

    Read-only so that nothing we do can change the mailbox (rule 4). HIGHESTMODSEQ is present when
    :func:`connect` enabled CONDSTORE. A missing folder raises ``ImapError(MAILBOX)``.
    """
    state = folder_state(client.select_folder(folder, readonly=True), "EXAMINE")
    bounded(client).forget_untagged()  # read above; a session idling on the folder keeps none of it
    return state


@raises_imap_error
def status(client: imapclient.IMAPClient, folder: str) -> FolderState:
    """``STATUS folder (UIDVALIDITY UIDNEXT MESSAGES [HIGHESTMODSEQ])`` without selecting it."""
    items = ["UIDVALIDITY", "UIDNEXT", "MESSAGES"]
    if client.has_capability("CONDSTORE"):
        items.append("HIGHESTMODSEQ")
    return folder_state(client.folder_status(folder, items), "STATUS")


@raises_imap_error
def unselect(client: imapclient.IMAPClient) -> None:
    """Leave the selected folder, if any: ``UNSELECT`` (RFC 3691), or ``CLOSE`` without it.

    Dovecot answers STATUS on the selected folder from the session's own view, which only NOOP or
    a new selection refreshes: a poll that keeps INBOX selected would never see new mail by
    STATUS. Both commands leave a folder selected read-only (EXAMINE) untouched.
    """
    if bounded(client).state != "SELECTED":
        return
    if client.has_capability("UNSELECT"):
        client.unselect_folder()
    else:
        client.close_folder()


@raises_imap_error
def uids_from(client: imapclient.IMAPClient, first_uid: int) -> list[int]:
    """UIDs >= ``first_uid`` in the selected folder, ascending: ``UID SEARCH UID first:*``.

    ``first:*`` also matches the highest existing UID when nothing is newer (rule 3), so UIDs
    below ``first_uid`` are dropped here.
    """
    found = client.search(["UID", f"{first_uid}:*"])
    return sorted(uid for uid in found if uid >= first_uid)


@raises_imap_error
def fetch_messages(client: imapclient.IMAPClient, uids: list[int]) -> dict[int, Fetched]:
    """``UID FETCH <uids> (UID RFC822.SIZE INTERNALDATE BODY.PEEK[])`` in the selected folder.

    ``BODY.PEEK[]`` does not set \\Seen (rule 4). Returns the messages by UID; a UID missing from
    the result was expunged (or the server answered OK without it) and is the caller's to retry or
    settle. Memory: each message is held once as bytes, up to ``max_literal`` each.
    """
    if not uids:
        return {}
    response = client.fetch(uids, _FETCH_ITEMS)
    fetched: dict[int, Fetched] = {}
    for uid, items in response.items():
        raw = items.get(b"BODY[]")
        if raw is None:  # an unsolicited FETCH (flags) for a message we did not get
            continue
        fetched[uid] = Fetched(
            uid=uid,
            raw=bytes(raw),
            size=int(items.get(b"RFC822.SIZE", len(raw))),
            internaldate=items.get(b"INTERNALDATE"),
        )
    return fetched


@raises_imap_error
def noop(client: imapclient.IMAPClient) -> list[tuple[Any, ...]]:
    """``NOOP``: keeps the session alive and returns the untagged updates the server had queued,
    parsed as by imapclient, e.g. ``[(4, b'EXISTS')]``."""
    _text, responses = client.noop()
    return responses
