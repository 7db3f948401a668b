"""The configuration's schema: one msgspec Struct per TOML section, every key with its default,
the Duration and Size value types with their parsers, and the checks of single values shared with
mailingestctl (account ids, listen addresses, folder names). Loading a file is ``loading.py``."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

DEFAULT_CONFIG_PATH = "/etc/mailingestd/mailingestd.toml"
ENV_PREFIX = "MAILINGESTD_"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is one line (logs, reload replies),
    ``problems`` has one line per problem (the commands print each on its own line)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    def for_terminal(self) -> str:
        """One line for one problem, else a count and one indented line each."""
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} configuration problems:\n  " + "\n  ".join(self.problems)


class Duration(float):
    """Seconds, written in the file as "90s", "5m", "1h30m", "2d" or a bare number."""


class Size(int):
    """Bytes, written in the file as "64MiB", "10MB", "512KiB", "1GiB" or a bare number."""


# systemd.time(7)'s spellings of the units a daemon setting can need.
_DURATION_UNITS = {
    "ms": 0.001, "msec": 0.001,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_DURATION_EXPECTED = "expected a duration like \"30s\", \"5m\", \"1h30m\" or a number of seconds"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)


def parse_duration(value: Any) -> Duration:
    """Seconds from a number or a sum of number-unit parts, as systemd reads "1h 30min" or "1h30m"."""
    if isinstance(value, bool):
        raise ValueError(_DURATION_EXPECTED)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text, seconds, position = str(value).strip(), 0.0, 0
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            text += "s"
        while position < len(text):
            match = _DURATION_PART.match(text, position)
            if not match or match.group(2).lower() not in _DURATION_UNITS:
                raise ValueError(f"{_DURATION_EXPECTED}, got {value!r}")
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
            position = match.end()
            while position < len(text) and text[position].isspace():
                position += 1
        if not text:
            raise ValueError(f"{_DURATION_EXPECTED}, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return Duration(seconds)


def parse_size(value: Any) -> Size:
    if isinstance(value, bool):
        raise ValueError("expected a size like \"64MiB\"")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValueError(f"expected a size like \"64MiB\" or \"10MB\", got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return Size(size)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Section):
    workers: int | Literal["auto"] = "auto"
    runtime_dir: str = "/run/mailingestd"
    state_dir: str = "/var/lib/mailingestd"
    pin_cpus: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout: Duration = Duration(30)
    heartbeat_interval: Duration = Duration(1)
    heartbeat_timeout: Duration = Duration(15)
    control_group: str | None = None
    memory_budget: Size = Size(512 * 1024**2)
    node_id: str = ""


class StoreConfig(_Section):
    url: str = ""
    pool_min: int = 1
    pool_max: int = 8
    # Data lifecycle (mailingestd/store/retention.py, docs/data-lifecycle.md).
    raw_retention: Duration = Duration(7 * 86400)
    metadata_retention: Duration = Duration(30 * 86400)  # 0 = keep rows and keys forever
    retention_interval: Duration = Duration(3600)
    retention_batch: int = 500
    retention_pause: Duration = Duration(0.05)
    partition_interval: Literal["day", "week"] = "day"
    partitions_ahead: int = 3


class BlobsConfig(_Section):
    kind: Literal["none", "s3"] = "none"
    bucket: str = ""
    prefix: str = "raw/"
    region: str = "us-east-1"
    endpoint_url: str | None = None
    timeout: Duration = Duration(30)
    concurrency: int = 8


# A batch goes to PostgreSQL as one multi-row INSERT of 18 parameters a message, and a statement
# takes at most 65,535 parameters (3,640 messages); batch_bytes usually ends a batch far sooner.
MAX_BATCH_MESSAGES = 3000
# SQS takes a FIFO MessageGroupId (the account id, docs/envelope.schema.json) of 1-128 characters from ASCII
# letters, digits and punctuation; '/' separates the parts of a message key, so it is refused too.
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9!\"#$%&'()*+,\-.:;<=>?@\[\\\]^_`{|}~]{1,128}")


def account_id_problem(account_id: str) -> str | None:
    """Why ``account_id`` cannot be an account id, or None. Shared by the file and mailingestctl."""
    if _ACCOUNT_ID.fullmatch(account_id) is None:
        return ("id must be 1-128 ASCII letters, digits or punctuation and contain no '/' or space (it is "
                "part of message keys and the SQS FIFO MessageGroupId)")
    return None


class ImapConfig(_Section):
    timeout: Duration = Duration(60)
    idle_renew: Duration = Duration(600)
    keepalive: Duration = Duration(300)
    batch_messages: int = 50
    batch_bytes: Size = Size(16 * 1024**2)
    max_message_size: Size = Size(64 * 1024**2)
    # A message over max_message_size: "halt" its folder below it (shown as stuck in status and
    # metrics), or "skip" its body (stored and announced with the header only, body_omitted).
    oversize: Literal["halt", "skip"] = "halt"
    max_line: Size = Size(8 * 1024**2)
    threads: int = 16


class QueueConfig(_Section):
    kind: Literal["none", "sqs"] = "none"
    url: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    inline_raw: bool = False
    batch_size: int = 10
    concurrency: int = 4
    poll_interval: Duration = Duration(0.2)
    retry_base: Duration = Duration(1)
    retry_max: Duration = Duration(300)


class SchedulerConfig(_Section):
    high_interval: Duration = Duration(60)
    medium_interval: Duration = Duration(300)
    low_interval: Duration = Duration(900)
    idle_safety_interval: Duration = Duration(900)
    backoff_base: Duration = Duration(5)
    backoff_max: Duration = Duration(900)
    auth_failure_limit: int = 3
    jitter: float = 0.1
    promote_messages: int = 5
    promote_window: Duration = Duration(900)
    demote_after: Duration = Duration(3600)
    tick: Duration = Duration(0.1)
    first_poll_spread: Duration = Duration(10)
    order_timeout: Duration = Duration(1800)


class ServerLimits(_Section):
    max_connections_per_server: int | None = None
    connects_per_minute: int | None = None
    max_connections_per_account: int | None = None


class LimitsConfig(_Section):
    max_connections_per_server: int = 100
    connects_per_minute: int = 200
    max_connections_per_account: int = 2
    connect_burst: Duration = Duration(10)
    servers: dict[str, ServerLimits] = {}

    def for_server(self, host: str) -> ServerLimits:
        """The effective limits for one server: its own table over the global keys."""
        own = self.servers.get(host, ServerLimits())
        return ServerLimits(
            max_connections_per_server=own.max_connections_per_server
            if own.max_connections_per_server is not None
            else self.max_connections_per_server,
            connects_per_minute=own.connects_per_minute
            if own.connects_per_minute is not None
            else self.connects_per_minute,
            max_connections_per_account=own.max_connections_per_account
            if own.max_connections_per_account is not None
            else self.max_connections_per_account,
        )


class ClusterConfig(_Section):
    """Scale-out over PostgreSQL leases (leases.py); ignored on the embedded SQLite store."""

    lease_time: Duration = Duration(30)
    capacity: float = 1.0
    release_per_round: int = 50


class MetricsConfig(_Section):
    textfile: str = "/var/lib/prometheus/node-exporter/mailingestd.prom"
    interval: Duration = Duration(15)
    http_listen: str | None = None


class SecretsConfig(_Section):
    key_file: str = ""
    # Where a store row's password_file / password_env may point (credentials.SecretPolicy):
    # the store is writable by other software, the configuration file only by root.
    allowed_dirs: list[str] = msgspec.field(default_factory=lambda: ["/etc/mailingestd/secrets"])
    allowed_env: list[str] = []


class OAuth2Config(_Section):
    provider: Literal["google", "microsoft", "custom"] = "custom"
    token_url: str = ""
    client_id: str = ""
    client_secret_file: str | None = None
    client_secret_env: str | None = None
    refresh_token_file: str | None = None
    refresh_token_env: str | None = None
    scopes: list[str] = []


class AccountConfig(_Section):
    id: str
    host: str
    username: str
    port: int | None = None
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    tls_ca_file: str | None = None
    tls_verify: bool = True
    # Credentials over tls = "none" to a host other than loopback; honoured only from the
    # configuration file (never from a store row), see credentials.SecretPolicy.
    allow_plaintext: bool = False
    auth: Literal["password", "oauth2"] = "password"
    password_file: str | None = None
    password_env: str | None = None
    oauth2: OAuth2Config | None = None
    folders: list[str] = msgspec.field(default_factory=lambda: ["INBOX"])
    priority: Literal["auto", "high", "medium", "low"] = "auto"
    idle: bool = True
    enabled: bool = True

    def __post_init__(self) -> None:
        self.folders = canonical_folders(self.folders)

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        return 993 if self.tls == "implicit" else 143

    @property
    def primary_folder(self) -> str:
        """The folder a connection IDLEs on when the server has no NOTIFY: INBOX when configured
        (most new mail lands there), else the first one listed."""
        return "INBOX" if "INBOX" in self.folders else self.folders[0] if self.folders else "INBOX"


def canonical_folders(folders: list[str]) -> list[str]:
    """Folder names as the server knows them: INBOX in any case is ``INBOX`` (RFC 3501 section
    5.1: the name is case-insensitive), other names exactly as given; duplicates dropped, order kept.
    So ``["Inbox"]`` is stored, keyed and announced as ``INBOX``, once."""
    seen: dict[str, None] = {}
    for folder in folders:
        seen.setdefault("INBOX" if folder.upper() == "INBOX" else folder, None)
    return list(seen)


class Config(_Section):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    imap: ImapConfig = msgspec.field(default_factory=ImapConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    secrets: SecretsConfig = msgspec.field(default_factory=SecretsConfig)
    blobs: BlobsConfig = msgspec.field(default_factory=BlobsConfig)
    accounts: list[AccountConfig] = []
    path: str = ""

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{Path(self.daemon.state_dir) / 'mailingestd.sqlite3'}"

    @property
    def worker_count(self) -> int:
        if self.daemon.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.daemon.workers



def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` into (host, port); the host is an IP address."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"expected HOST:PORT with an IPv6 address in brackets ([::1]:9853), got {value!r}")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"expected IP:PORT such as \"127.0.0.1:9853\" or \"[::1]:9853\", got {value!r}") from None
    if not sep or not 0 < number < 65536:
        raise ValueError(f"expected a port in 1..65535, got {value!r}")
    return host, number
