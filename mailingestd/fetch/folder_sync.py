"""A job's folder work: which configured folders have news, their ingest, and what the job reports.

Invariants:

- Only configured folders are ever named to the server (rule 9): a push names folders, and
  :meth:`FolderChecks.pushed` drops every one the account does not list.
- ``current`` remembers, per account and folder, the (UIDVALIDITY, UIDNEXT) seen at the last
  check that found the folder complete; a STATUS or NOTIFY saying the same again means no news
  and costs no store round trip. Anything else asks the store's checkpoint (rules 1 and 2).
- One :class:`JobOutcome` per job carries its ``frames.Result`` (the frame the scheduler reads,
  filled in place, never copied field by field) and what only the worker's loop needs besides.
- Everything here runs on a pool thread that owns the connection; ``current`` and ``missing`` are
  dicts updated per key, which the loop thread reads without a lock (no compound invariant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .. import frames
from ..config import AccountConfig, ImapConfig
from ..store.store import Store
from . import imap
from .ingest import SyncResult, sync_folder


class JobOutcome(msgspec.Struct):
    """What a pool job hands back to the loop: ``result`` is the frame to report (the loop fills
    in ``connected`` and ``idling`` from the session it ends with); the rest is the loop's own.

    ``result.new_messages`` counts arrivals only; ``backlog`` the messages a folder's first sync
    (or a resync) stored, which are not a burst of mail for adaptive priority.
    """

    result: frames.Result
    client: Any = None
    idle_capable: bool = False
    pushed_pending: tuple[str, ...] = ()  # folders announced as IDLE began: check them at once
    checked_all: bool = False
    backlog: int = 0
    fetch_seconds: float = 0.0
    connected_now: bool = False
    notified_at: float | None = None
    primary_current: bool = False  # the primary folder was EXAMINEd last and nothing ran since
    idle_folder: str | None = None  # the folder selected for IDLE (None: NOTIFY, nothing selected)
    idle_folder_behind: bool = False  # mail kept arriving through the catch-up: check again at once

    @property
    def stored(self) -> int:
        """Messages this job stored, arrivals and backlog."""
        return self.result.new_messages + self.backlog

    def add(self, synced: SyncResult) -> None:
        """Count one folder's ingest into the job's result."""
        if synced.first_sync:
            self.backlog += synced.new_messages
        else:
            self.result.new_messages += synced.new_messages
        self.result.new_bytes += synced.new_bytes
        self.result.uidvalidity_changed |= synced.uidvalidity_changed
        self.fetch_seconds += synced.fetch_seconds


class FolderChecks:
    """The folder checks every job runs, and the worker's memory of folders found complete.

    ``stopping``: a drain or a stop was asked (no further folder is started); ``fast_stop``: stop
    between batches too (passed to ``ingest.sync_folder``).
    """

    def __init__(self, store: Store, settings: ImapConfig, announce: bool, stopping: Callable[[], bool],
                 fast_stop: Callable[[], bool]) -> None:
        self.store = store
        self.settings = settings
        self.announce = announce
        self.stopping = stopping
        self.fast_stop = fast_stop
        self.current: dict[str, dict[str, tuple[int, int]]] = {}
        self.missing: dict[str, frozenset[str]] = {}  # configured folders the server does not have

    def forget(self, account_id: str) -> None:
        """The account left this worker or its settings changed: nothing known about its folders."""
        self.current.pop(account_id, None)

    def check(self, client: Any, account: AccountConfig, outcome: JobOutcome, folders: list[str],
              examine_primary: bool) -> None:
        """Check ``folders`` and fetch those with news; a folder the server does not have goes to
        ``outcome.result.missing_folders`` and the others go on.

        Folders are asked with STATUS first (a quiet poll is one STATUS per folder), except the
        primary folder on a connection about to IDLE on it (``examine_primary``): IDLE needs it
        selected anyway, so it is EXAMINEd straight away, last, so that it stays selected (its
        UIDNEXT answers the question). When that EXAMINE found nothing newer,
        ``outcome.primary_current`` lets IDLE follow at once.
        """
        primary = account.primary_folder if examine_primary else None
        folders = sorted(folders, key=lambda folder: folder == primary)
        if any(folder != primary for folder in folders):
            imap.unselect(client)  # so that STATUS sees the folder afresh (see imap.unselect)
        for folder in folders:
            if self.stopping():
                return
            try:
                if folder != primary and not self.has_news(client, account.id, folder):
                    continue
                synced = self.sync(client, account, folder, outcome)
            except imap.ImapError as exc:
                if exc.kind is not imap.FailureKind.MAILBOX:
                    raise
                outcome.result.missing_folders.append(folder)
                continue
            outcome.primary_current = folder == primary and not synced.searched

    def unchanged(self, account_id: str, folder: str, state: imap.FolderState) -> bool:
        """The folder's (UIDVALIDITY, UIDNEXT) is what it was at the last check that found it complete."""
        return state.uidnext is not None and self.current.get(account_id, {}).get(folder) == (state.uidvalidity,
                                                                                                state.uidnext)

    def sync(self, client: Any, account: AccountConfig, folder: str, outcome: JobOutcome) -> SyncResult:
        """EXAMINE the folder and ingest what is new (ingest.sync_folder); when that completed,
        remember its (UIDVALIDITY, UIDNEXT) so the next STATUS, NOTIFY or EXAMINE saying the same
        costs no store round trip and fetches nothing (an IDLE renewal, a reconnect, a rotating
        account's poll). A checkpoint changed behind the worker's back (``mailingestctl account
        resync``) is seen when the folder next changes, as with STATUS (mailingestctl(1))."""
        state = imap.examine(client, folder)
        if self.unchanged(account.id, folder, state):
            return SyncResult(folder=folder)
        synced = sync_folder(client, self.store, account.id, folder, self.settings, announce=self.announce,
                             state=state, should_stop=self.fast_stop)
        if state.uidnext is not None and not synced.interrupted and not synced.oversize:
            self.current.setdefault(account.id, {})[folder] = (state.uidvalidity, state.uidnext)
        outcome.add(synced)
        return synced

    def catch_up_idle_folder(self, client: Any, account: AccountConfig, outcome: JobOutcome) -> str:
        """Select the folder to IDLE on (the primary one, else the first configured folder the
        server has) and ingest what arrived in it during the checks just done: a message
        appended in that gap would otherwise wait for the next safety poll. Returns the folder.

        A folder still receiving mail after the last try is marked ``idle_folder_behind``: the
        EXISTS of what arrived during that try's FETCH went by unread, and IDLE does not repeat
        it, so the job announces the folder as pushed and the loop checks it right away."""
        missing = set(outcome.result.missing_folders)
        if not outcome.checked_all:
            missing |= self.missing.get(account.id, frozenset())
        candidates = [account.primary_folder, *account.folders]
        folder = next((f for f in candidates if f not in missing), account.primary_folder)
        if outcome.primary_current and folder == account.primary_folder:
            return folder
        for _ in range(3):
            state = imap.examine(client, folder)
            if self.unchanged(account.id, folder, state):
                return folder
            mailbox = self.store.get_mailbox(account.id, folder)
            if (mailbox is not None and mailbox.uidvalidity == state.uidvalidity
                    and (state.uidnext is None or state.uidnext <= mailbox.last_uid + 1)):
                return folder
            self.sync(client, account, folder, outcome)  # leaves the folder selected
        outcome.idle_folder_behind = True
        return folder

    def watch(self, client: Any, account: AccountConfig) -> tuple[str, ...]:
        """NOTIFY on every configured folder, with none selected (a selected folder would be left
        out of the notifications). Returns the folders whose state, as NOTIFY's first STATUS
        reports it, shows mail not yet ingested (arrived during the checks just done)."""
        imap.unselect(client)
        states = imap.notify_set(client, account.folders)
        return tuple(folder for folder in account.folders
                     if folder in states and self.has_news(client, account.id, folder, states[folder]))

    def has_news(self, client: Any, account_id: str, folder: str, state: imap.FolderState | None = None) -> bool:
        """STATUS the folder (unless ``state`` says it already); news when UIDNEXT is above the
        store's checkpoint. A folder whose (UIDVALIDITY, UIDNEXT) is what it was at the last check
        that found it complete has none, without asking the store: a quiet poll is one STATUS
        and no database round trip."""
        if state is None:
            state = imap.status(client, folder)
        if self.unchanged(account_id, folder, state):
            return False
        mailbox = self.store.get_mailbox(account_id, folder)
        if mailbox is None or mailbox.uidvalidity != state.uidvalidity or state.uidnext is None:
            return True
        if state.uidnext > mailbox.last_uid + 1:
            return True
        self.current.setdefault(account_id, {})[folder] = (state.uidvalidity, state.uidnext)
        return False

    def pushed(self, account: AccountConfig, idle_folder: str | None,
               responses: list[tuple[Any, ...]]) -> tuple[str, ...]:
        """The configured folders an idling connection's responses announce news for: the folder
        IDLE runs on for ``EXISTS``/``RECENT``/``FETCH``, and each folder a NOTIFY ``STATUS``
        names, unless its UIDNEXT is the one the last complete check saw (an expunge)."""
        folders: list[str] = []
        if idle_folder is not None and imap.has_new_mail(responses):
            folders.append(idle_folder)
        known = self.current.get(account.id, {})
        for folder, uidnext in imap.pushed_folders(responses).items():
            if folder not in account.folders or folder in folders:
                continue  # never act on a folder the account does not configure
            if uidnext is not None and folder in known and known[folder][1] == uidnext:
                continue
            folders.append(folder)
        return tuple(folders)
