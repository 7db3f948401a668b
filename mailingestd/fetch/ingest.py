"""Ingest of one folder: from the checkpoint to the newest UID, in batches, exactly once.

This is the correctness core (docs/architecture.md rules 1-5), shared by every process that fetches:

1. State is keyed by UIDVALIDITY, compared with ``!=``; a change starts the folder over under the
   new value (old rows stay), is recorded, and the re-ingested messages say ``resync`` on the queue.
2. The checkpoint only advances over a contiguous run of settled UIDs: a batch is fetched whole,
   committed whole, and a failure leaves the checkpoint where it was so the UIDs are retried.
   A message over ``imap.max_message_size`` halts its folder below it (``imap.oversize =
   "halt"``, shown in status and metrics as a stuck folder with its UID) or is stored and
   announced without its body (``"skip"``).
3. ``UID FETCH n:*`` answers with the highest message even when nothing is newer, so UIDs below
   ``n`` are filtered; a UID the server stops answering for (missing from the size reply, or
   answered with ``BODY[] NIL``) was expunged and counts as settled: logged and counted, never
   stepped over in silence.
4. The folder is opened read-only (EXAMINE) and bodies are fetched with ``BODY.PEEK[]``.
5. Messages, outbox rows and the checkpoint commit in one transaction (``Store.commit_batch``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Sequence

import msgspec

from ..config import ImapConfig
from ..store.store import MailboxState, Store, StoredMessage
from . import imap
from .message import parse_headers

log = logging.getLogger(__name__)
MAX_STUCK_SHOWN = 10


class FolderHealth:
    """What this process's syncs stepped over or stopped at, for its heartbeat (``Worker.heartbeat``).

    One per process (``HEALTH``): a folder halted below an oversized message is stuck until the
    operator raises ``imap.max_message_size`` or sets ``imap.oversize = "skip"``; it is logged once
    when it gets stuck, not at every poll, and listed here (with its UID) until it moves on.
    """

    def __init__(self) -> None:
        self.stuck: dict[tuple[str, str], tuple[int, int, int]] = {}  # (account, folder) -> uid, size, limit
        self.uids_vanished = 0
        self.oversize_skipped = 0

    def stuck_lines(self) -> list[str]:
        return [f"{account}/{folder} uid={uid} size={size} limit={limit}"
                for (account, folder), (uid, size, limit) in sorted(self.stuck.items())[:MAX_STUCK_SHOWN]]

    def halted(self, account_id: str, folder: str, uid: int, size: int, limit: int) -> None:
        if self.stuck.get((account_id, folder)) != (uid, size, limit):
            log.error("event=folder_stuck account=%s folder=%s uid=%d size=%d limit=%d action=halt "
                      "(raise imap.max_message_size, or imap.oversize = \"skip\")", account_id, folder, uid, size,
                      limit)
        self.stuck[(account_id, folder)] = (uid, size, limit)

    def moving(self, account_id: str, folder: str) -> None:
        if self.stuck.pop((account_id, folder), None) is not None:
            log.info("event=folder_unstuck account=%s folder=%s", account_id, folder)

    def vanished(self, account_id: str, folder: str, uids: Sequence[int], where: str) -> None:
        self.uids_vanished += len(uids)
        log.warning("event=uids_vanished account=%s folder=%s count=%d uids=%s reason=%s action=settled_as_expunged",
                    account_id, folder, len(uids), ",".join(str(u) for u in uids[:20]), where)


HEALTH = FolderHealth()


class SyncResult(msgspec.Struct):
    folder: str
    new_messages: int = 0
    new_bytes: int = 0
    uidvalidity_changed: bool = False
    settled_uid: int = 0
    fetch_seconds: float = 0.0
    interrupted: bool = False
    oversize: int = 0
    first_sync: bool = False  # the folder's backlog, not new arrivals: not fed to adaptive priority
    searched: bool = False  # commands ran after the EXAMINE (untagged EXISTS may have gone by)


SIZE_CHUNK = 1000


def pending_sizes(client: Any, first_uid: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(uid, RFC822.SIZE) of every message at or above ``first_uid``, in UID order, and the UIDs
    the search found but the size reply left out (expunged meanwhile: not pending any more).

    ``UID SEARCH UID first:*`` (lower UIDs dropped, rule 3), then ``UID FETCH (RFC822.SIZE)`` in
    chunks so a first sync of a huge folder never sends a command line servers refuse.
    """
    uids = imap.uids_from(client, first_uid)
    sizes: list[tuple[int, int]] = []
    missing: list[int] = []
    for start in range(0, len(uids), SIZE_CHUNK):
        chunk = uids[start:start + SIZE_CHUNK]
        try:
            response = client.fetch(chunk, ["RFC822.SIZE"])
        except Exception as exc:
            raise imap.classify(exc) from exc
        sizes += [(uid, int(response[uid].get(b"RFC822.SIZE", 0))) for uid in chunk if uid in response]
        missing += [uid for uid in chunk if uid not in response]
    return sizes, missing


def header_only(client: Any, uid: int, size: int) -> imap.Fetched:
    """The oversized message ``uid`` as metadata: its header (``BODY.PEEK[HEADER]``), no body;
    ``size`` stays the server's RFC822.SIZE (see :func:`to_stored`)."""
    try:
        response = client.fetch([uid], ["RFC822.SIZE", "INTERNALDATE", "BODY.PEEK[HEADER]"])
    except Exception as exc:
        raise imap.classify(exc) from exc
    items = response.get(uid, {})
    return imap.Fetched(uid=uid, raw=bytes(items.get(b"BODY[HEADER]") or b""), size=size,
                        internaldate=items.get(b"INTERNALDATE"))


def plan_batches(pending: Sequence[tuple[int, int]], max_messages: int, max_bytes: int) -> list[list[int]]:
    """Group (uid, size) pairs, in UID order, into batches capped by count and by bytes.

    A message larger than ``max_bytes`` travels alone rather than never.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for uid, size in pending:
        if current and (len(current) >= max_messages or current_bytes + size > max_bytes):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(uid)
        current_bytes += size
    if current:
        batches.append(current)
    return batches


def to_stored(fetched: imap.Fetched, body_omitted: bool = False) -> StoredMessage:
    """The row to commit: the header fields parsed from ``raw``; ``size`` is the bytes stored, or
    the server's size of a message whose body was left on the server (``body_omitted``)."""
    headers = parse_headers(fetched.raw)
    internaldate = fetched.internaldate.isoformat() if fetched.internaldate is not None else None
    return StoredMessage(uid=fetched.uid, raw=fetched.raw, size=fetched.size if body_omitted else len(fetched.raw),
                         internaldate=internaldate, body_omitted=body_omitted, **msgspec.structs.asdict(headers))


def open_mailbox(store: Store, account_id: str, folder: str,
                 state: imap.FolderState) -> tuple[MailboxState, bool, bool]:
    """The folder's checkpoint under the server's current UIDVALIDITY, whether UIDVALIDITY changed,
    and whether the folder is new to the store (its first sync): one transaction
    (``Store.open_mailbox``); after a change the UIDs below UIDNEXT are announced as a resync."""
    opened = store.open_mailbox(account_id, folder, state.uidvalidity, state.uidnext)
    changed = opened.previous_uidvalidity is not None
    if changed:
        log.warning("event=uidvalidity_changed account=%s folder=%s old=%s new=%s action=resync",
                    account_id, folder, opened.previous_uidvalidity, state.uidvalidity)
    return opened.state, changed, opened.created


class InOrderCommits:
    """Commits a folder's batches one at a time, in UID order, on one helper thread, while the
    caller fetches the next batch on the IMAP connection (rule 5 per batch, rule 2 across them).

    Invariants: at most one commit is in flight; batch N+1 is handed over only after batch N's
    commit returned, so the checkpoint moves in UID order and a failed commit stops every later
    one (its error is raised to the caller at the next hand-over or at :meth:`finish`, and the
    checkpoint stays below the failed batch). Header parsing runs on the helper too, off the
    fetch path. Without a helper (``pipelined`` False: one batch only) the commit runs inline.
    """

    def __init__(self, store: Store, mailbox: MailboxState, highestmodseq: int | None, announce: bool,
                 result: SyncResult, pipelined: bool) -> None:
        self.store, self.mailbox, self.highestmodseq, self.announce = store, mailbox, highestmodseq, announce
        self.result = result
        self.helper = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
                       if pipelined else None)
        self.in_flight: concurrent.futures.Future[None] | None = None

    def commit(self, fetched: list[imap.Fetched], omitted: set[int], settled_uid: int) -> None:
        """Hand over one batch (its messages in UID order; ``settled_uid``: its last UID asked for)."""
        self.wait()
        if self.helper is None:
            self._commit(fetched, omitted, settled_uid)
        else:
            self.in_flight = self.helper.submit(self._commit, fetched, omitted, settled_uid)

    def wait(self) -> None:
        """Block until the commit in flight (if any) is done; raise its error."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.result()

    def finish(self, failing: bool = False) -> None:
        """Wait for the last commit, also when the caller is failing (no commit outlives the
        sync), then let the helper thread go. ``failing``: the caller raises its own error, so a
        commit error is logged instead of replacing it."""
        try:
            self.wait()
        except Exception:
            if not failing:
                raise
            log.exception("event=commit_failed account=%s folder=%s during=failed_sync",
                          self.mailbox.account_id, self.mailbox.folder)
        finally:
            if self.helper is not None:
                self.helper.shutdown(wait=True)

    def _commit(self, fetched: list[imap.Fetched], omitted: set[int], settled_uid: int) -> None:
        messages = [to_stored(f, body_omitted=f.uid in omitted) for f in fetched]
        inserted = self.store.commit_batch(self.mailbox, messages, settled_uid=settled_uid,
                                           highestmodseq=self.highestmodseq, announce=self.announce)
        self.result.new_messages += inserted
        self.result.new_bytes += sum(m.size for m in messages)
        self.result.settled_uid = settled_uid


def sync_folder(client: object, store: Store, account_id: str, folder: str, settings: ImapConfig, *,
                announce: bool = True, should_stop: Callable[[], bool] | None = None,
                state: imap.FolderState | None = None) -> SyncResult:
    """Fetch and commit every message above the folder's checkpoint.

    ``state`` is the folder as just EXAMINEd (the caller may already have it selected); without it
    the folder is EXAMINEd here. ``should_stop`` is asked between batches: a drain finishes the
    batch in flight, commits it and returns with ``interrupted``. Batch N commits while batch N+1
    is fetched (:class:`InOrderCommits`).
    """
    if state is None:
        state = imap.examine(client, folder)
    mailbox, changed, fresh = open_mailbox(store, account_id, folder, state)
    result = SyncResult(folder=folder, uidvalidity_changed=changed, settled_uid=mailbox.last_uid,
                        first_sync=fresh or changed)
    if state.uidnext is not None and state.uidnext <= mailbox.last_uid + 1 and not changed:
        return result  # UIDNEXT says nothing is newer; a hint only, the next poll searches again
    result.searched = True
    pending, missing = pending_sizes(client, mailbox.last_uid + 1)
    if missing:
        HEALTH.vanished(account_id, folder, missing, "not_in_size_reply")
    limit = settings.max_message_size
    too_big = {uid: size for uid, size in pending if size > limit}
    if too_big and settings.oversize == "halt":
        # Rule 2: never skip silently. Oversized UIDs stop the checkpoint below them; the folder
        # shows as stuck until the operator raises imap.max_message_size or chooses "skip".
        result.oversize = len(too_big)
        first_big = min(too_big)
        HEALTH.halted(account_id, folder, first_big, too_big[first_big], limit)
        pending = [(uid, size) for uid, size in pending if uid < first_big]
    else:
        HEALTH.moving(account_id, folder)
    batches = plan_batches(pending, settings.batch_messages, settings.batch_bytes)
    commits = InOrderCommits(store, mailbox, state.highestmodseq, announce, result, pipelined=len(batches) > 1)
    try:
        for batch in batches:
            if should_stop is not None and should_stop():
                result.interrupted = True
                break
            started = time.monotonic()
            fetched = imap.fetch_messages(client, [uid for uid in batch if uid not in too_big])
            result.fetch_seconds += time.monotonic() - started
            messages = []
            for uid in batch:
                if uid in too_big:  # imap.oversize = "skip": announced, its body left on the server
                    log.warning("event=message_too_large account=%s folder=%s uid=%d size=%d limit=%d "
                                "action=skip_body", account_id, folder, uid, too_big[uid], limit)
                    HEALTH.oversize_skipped += 1
                    messages.append(header_only(client, uid, too_big[uid]))
                elif uid in fetched:
                    messages.append(fetched[uid])
            vanished = [uid for uid in batch if uid not in fetched and uid not in too_big]
            if vanished:
                HEALTH.vanished(account_id, folder, vanished, "no_body_in_fetch")
            # UIDs asked for and not answered were expunged meanwhile: settled (rule 3).
            commits.commit(messages, too_big.keys() & set(batch), settled_uid=batch[-1])
    except BaseException:
        commits.finish(failing=True)
        raise
    commits.finish()
    return result
