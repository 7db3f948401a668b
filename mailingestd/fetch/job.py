"""The blocking work of a worker's job, on a pool thread that owns the account's connection.

Every trigger (an order, a push, a renewal, a broken connection) runs :meth:`Jobs.run` and ends
in one :class:`~.folder_sync.JobOutcome` (rule 10). Invariants:

- A new connection is opened only when the scheduler granted it (``may_connect``).
- Only configured folders are named to the server (rule 9); a job that ends in a failure closes
  its connection (LOGOUT, or a plain close when the stream is broken or silent) and reports it.
- ``secrets`` is replaced whole by the loop on every Assign (never mutated in place), so a job
  reads one consistent mapping.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import frames
from ..auth.credentials import Credentials, ReauthRequired, TokenEndpointError
from ..config import AccountConfig, ConfigError, ImapConfig
from . import imap
from .folder_sync import FolderChecks, JobOutcome

log = logging.getLogger("mailingestd.fetch.worker")  # the worker's lines keep one logger name


class Jobs:
    """What a worker's pool threads run: connect if granted, check folders, ingest, re-enter IDLE."""

    def __init__(self, slot: int, settings: ImapConfig, credentials: Credentials, folders: FolderChecks) -> None:
        self.slot = slot
        self.settings = settings
        self.credentials = credentials
        self.folders = folders
        self.secrets: dict[str, dict[str, str]] = {}
        self.notify_refused: set[str] = set()  # servers that advertise NOTIFY but refused NOTIFY SET

    def outcome(self, account_id: str, order_id: int, trigger: frames.Trigger, ok: bool = False,
                notified: float | None = None) -> JobOutcome:
        """A job's outcome, its Result frame not yet connected nor idling (the loop says at the end)."""
        return JobOutcome(result=frames.Result(slot=self.slot, account_id=account_id, order_id=order_id, ok=ok,
                                               connected=False, idling=False, trigger=trigger),
                          notified_at=notified)

    def run(self, account: AccountConfig, client: Any, trigger: frames.Trigger, order_id: int, may_connect: bool,
            was_idling: bool, notified: float | None, failure: imap.ImapError | None,
            pushed: tuple[str, ...], release: bool) -> JobOutcome:
        """Connect if granted, check the folders, ingest what is new, and re-enter IDLE.

        An order, a renewal or a connection not idling checks every configured folder; a push
        checks the folders it named (``pushed``). ``failure``: the loop found the connection
        broken; report it and close. ``release``: others wait for this server's connection cap,
        so LOGOUT instead of keeping the connection (time-sharing the cap). Only configured
        folders are ever named to the server.

        How a connection waits for news: with NOTIFY (RFC 5465) and several folders, no folder
        selected and the server reports every configured folder; otherwise IDLE on the primary
        folder (``AccountConfig.primary_folder``), the others checked at the tier interval by
        the scheduler's orders (``Result.watches_all`` False).
        """
        outcome = self.outcome(account.id, order_id, trigger, notified=notified)
        result = outcome.result
        timeout = self.settings.timeout
        try:
            if failure is not None:
                raise failure
            if client is None:
                if not may_connect:
                    result.failure_kind = frames.FailureKind.DISCONNECTED
                    result.detail = "no open connection; waiting for a connect grant"
                    return outcome
                client = self.login(account)
                outcome.connected_now = True
            elif was_idling:
                imap.idle_stop(client, timeout)
            outcome.client = client
            capabilities = imap.capabilities(client)
            outcome.idle_capable = account.idle and "IDLE" in capabilities
            use_notify = (outcome.idle_capable and len(account.folders) > 1 and "NOTIFY" in capabilities
                          and account.host not in self.notify_refused)
            if imap.notifying(client):
                imap.notify_none(client)  # replies to our own commands must not mix with notifications
            outcome.checked_all = trigger in (frames.Trigger.ORDER, frames.Trigger.RENEWAL) or not was_idling
            folders = account.folders if outcome.checked_all else [f for f in account.folders if f in pushed]
            self.folders.check(client, account, outcome, folders,
                               examine_primary=outcome.idle_capable and not use_notify)
            if outcome.checked_all and len(result.missing_folders) == len(account.folders):
                raise imap.ImapError(imap.FailureKind.MAILBOX,
                                     f"none of the configured folders exists: {', '.join(account.folders)}")
            if self.folders.stopping():
                result.ok = True
                return outcome
            if release:
                imap.logout(client, min(timeout, 5.0))
                outcome.client = None
                result.ok = True
                return outcome
            if account.auth == "oauth2":
                # Keep the token fresh ahead of expiry: by the next renewal it must still be valid,
                # for a provider that ends the session when its token expires makes us log in again.
                self.credentials.access_token(account, self.secrets.get(account.id, {}),
                                              valid_for=self.settings.idle_renew)
            if outcome.idle_capable:
                pending: tuple[str, ...] = ()
                if use_notify:
                    try:
                        pending = self.folders.watch(client, account)
                        result.watches_all = True
                    except imap.NotifyRefused as exc:
                        # A server advertising NOTIFY that refuses our request: IDLE from now on.
                        self.notify_refused.add(account.host)
                        log.warning("event=notify_refused account=%s server=%s error=%s action=idle_on_primary",
                                    account.id, account.host, exc.detail)
                        use_notify = False
                if not use_notify:
                    outcome.idle_folder = self.folders.catch_up_idle_folder(client, account, outcome)
                    result.watches_all = len(account.folders) == 1
                early = imap.idle_start(client)
                result.idling = True
                # Mail that arrived since the last look is announced as IDLE starts, often in the
                # continuation's own segment: those lines already sit in our buffer, where the
                # selector cannot see them, so read them now.
                early += imap.idle_read(client)
                announced = self.folders.pushed(account, outcome.idle_folder, early)
                if imap.literal_waiting(client):
                    announced = tuple(account.folders)
                elif outcome.idle_folder_behind and outcome.idle_folder is not None:
                    announced = (*announced, outcome.idle_folder)
                outcome.pushed_pending = tuple(dict.fromkeys((*pending, *announced)))
            result.ok = True
        except ConfigError as exc:
            result.failure_kind, result.detail = frames.FailureKind.AUTH, str(exc)
        except ReauthRequired as exc:
            result.failure_kind, result.detail = frames.FailureKind.REAUTH, str(exc)
        except TokenEndpointError as exc:
            result.failure_kind, result.detail = frames.FailureKind.NETWORK, str(exc)
        except Exception as exc:
            failure = imap.classify(exc)
            result.failure_kind = failure.kind
            result.detail = failure.detail
            result.retry_after = failure.retry_after
            if outcome.client is not None or client is not None:
                if failure.kind in (imap.FailureKind.TIMEOUT, imap.FailureKind.NETWORK, imap.FailureKind.PROTOCOL):
                    imap.close(outcome.client or client)  # nobody listening, or the stream is broken
                else:
                    imap.logout(outcome.client or client, min(timeout, 5.0))
            outcome.client = None
            result.idling = False
            outcome.idle_folder = None
        return outcome

    def login(self, account: AccountConfig) -> Any:
        """Connect and log in; an OAuth2 token the server rejects is refreshed once and retried once."""
        secrets = self.secrets.get(account.id, {})

        def attempt(force_refresh: bool) -> Any:
            return imap.connect(account, self.credentials.secret_for_login(account, secrets, force_refresh),
                                timeout=self.settings.timeout, max_line=self.settings.max_line,
                                max_literal=self.settings.max_message_size + 65536)

        try:
            return attempt(False)
        except imap.ImapError as exc:
            if account.auth != "oauth2" or exc.kind != imap.FailureKind.AUTH:
                raise
            self.credentials.forget(account.id)
            return attempt(True)
