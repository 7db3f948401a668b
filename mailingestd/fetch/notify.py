"""NOTIFY (RFC 5465): one connection watches several folders.

Invariants:

* ``NOTIFY SET`` names only the configured folders it is given: no other folder is touched, and it
  runs with no folder selected (a selected folder is outside a MAILBOXES specification).
* A tagged NO or BAD to ``NOTIFY SET`` raises :class:`~.errors.NotifyRefused` and leaves the session
  usable (the caller falls back to IDLE on one folder); anything else is a broken session.
* ``client.notify_active`` is True exactly between a successful ``NOTIFY SET`` and ``NOTIFY NONE``.
"""

from __future__ import annotations

import imaplib
from typing import Any

import imapclient
from imapclient import imap_utf7
from imapclient.response_parser import parse_response

from .errors import FailureKind, NotifyRefused, raises_imap_error
from .mailbox import FolderState, folder_state
from .transport import bounded

__all__ = ["notify_none", "notify_set", "notifying", "pushed_folders"]

imaplib.Commands.setdefault("NOTIFY", ("AUTH", "SELECTED"))
# New mail and expunges must be asked for together (RFC 5465 section 5.2); MailboxName reports a
# configured folder that was created or renamed into place.
_NOTIFY_EVENTS = b"(MessageNew MessageExpunge MailboxName)"


def _folder_name(name: Any) -> str:
    """A mailbox name as imapclient parsed it (bytes in modified UTF-7, or an int for "2024")."""
    if isinstance(name, int):
        return str(name)
    if isinstance(name, bytes):
        return imap_utf7.decode(name)
    return str(name)


@raises_imap_error
def notify_set(client: imapclient.IMAPClient, folders: list[str]) -> dict[str, FolderState]:
    """``NOTIFY SET STATUS (MAILBOXES (<folders>) (MessageNew MessageExpunge MailboxName))``.

    From now on the server reports new mail in any of ``folders`` as untagged ``* STATUS folder
    (MESSAGES n UIDNEXT m)`` responses, during IDLE too (:func:`pushed_folders` reads them).
    Call it with no folder selected: a selected folder is outside a MAILBOXES specification
    and its news would not be reported. ``STATUS`` makes the server report every folder's state
    at once, returned here by folder name, so mail that arrived before the command is not
    missed. Names nothing but ``folders``: no other folder is touched.
    """
    imap = bounded(client)
    names = b" ".join(client._normalise_folder(folder) for folder in folders)
    try:
        typ, data = imap._simple_command("NOTIFY", b"SET STATUS (MAILBOXES (" + names + b") " + _NOTIFY_EVENTS + b")")
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:  # a tagged BAD: the session goes on
        raise NotifyRefused(FailureKind.PROTOCOL, f"NOTIFY SET refused: {exc}") from None
    if typ != "OK":  # a tagged NO
        raise NotifyRefused(FailureKind.PROTOCOL, f"NOTIFY SET refused: {data!r}")
    client.notify_active = True
    _, lines = imap._untagged_response(typ, data, "STATUS")
    states: dict[str, FolderState] = {}
    for line in lines:
        if line is None:
            continue
        parsed = parse_response([line])
        if len(parsed) >= 2 and isinstance(parsed[-1], tuple):
            items = dict(zip(parsed[-1][::2], parsed[-1][1::2]))
            if b"UIDVALIDITY" in items:
                states[_folder_name(parsed[0])] = folder_state(items, "NOTIFY STATUS")
    return states


@raises_imap_error
def notify_none(client: imapclient.IMAPClient) -> None:
    """``NOTIFY NONE``: no more unsolicited STATUS responses, so the replies to the commands that
    follow (STATUS of one folder in particular) cannot mix with notifications about others."""
    imap = bounded(client)
    typ, data = imap._simple_command("NOTIFY", "NONE")
    if typ != "OK":
        raise imaplib.IMAP4.error(f"NOTIFY NONE refused: {data!r}")
    client.notify_active = False


def notifying(client: imapclient.IMAPClient) -> bool:
    """True after :func:`notify_set` until :func:`notify_none` on this connection."""
    return getattr(client, "notify_active", False)


def pushed_folders(responses: list[tuple[Any, ...]]) -> dict[str, int | None]:
    """The folders a NOTIFY-ing server reported news for, with the UIDNEXT it announced.

    ``* STATUS Work (MESSAGES 3 UIDNEXT 7)`` gives ``{"Work": 7}``; a ``* LIST`` (a folder created
    or renamed) gives the folder with None. An expunge also comes as a STATUS: the caller compares
    UIDNEXT with what it knows before fetching.
    """
    folders: dict[str, int | None] = {}
    for response in responses:
        if len(response) >= 3 and response[0] == b"STATUS" and isinstance(response[2], tuple):
            items = dict(zip(response[2][::2], response[2][1::2]))
            uidnext = items.get(b"UIDNEXT")
            folders[_folder_name(response[1])] = int(uidnext) if isinstance(uidnext, int) else None
        elif len(response) >= 4 and response[0] == b"LIST":
            folders[_folder_name(response[3])] = None
    return folders
