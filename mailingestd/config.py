"""Configuration: one TOML file decoded into msgspec Structs, with environment overrides.

Every key has a default, so an empty file is a valid configuration for the embedded store.
Durations are written "30s", "5m", "1h", "2d", "1h30m" (systemd style, or a bare number of
seconds); sizes "64MiB", "10MB", "512KiB" (or a bare number of bytes). A single key is overridden
from the environment with ``MAILINGESTD_<SECTION>_<KEY>`` (for example ``MAILINGESTD_STORE_URL``).
Every problem is reported at once, each naming where the value came from (the file or the
environment variable), the key and what was expected, with the closest known key for a
misspelt one; the commands exit 78 (EX_CONFIG) on them.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

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


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        return parse_duration(value)
    if kind is Size:
        return parse_size(value)
    raise NotImplementedError(kind)


_SECTIONS = {f.name: f.type for f in msgspec.structs.fields(Config) if f.name not in ("accounts", "path")}


def _env_value(raw: str) -> Any:
    """An environment value is read as a TOML value when it is one ("4", "true", "[1]"), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> dict[str, str]:
    """Merge ``MAILINGESTD_<SECTION>_<KEY>`` variables into ``data``; returns each key it set
    ("store.url") with the variable that set it, and adds a line to ``problems`` for a variable
    naming no section."""
    applied = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in _SECTIONS or not key:
            problems.append(f"environment {name}: unknown setting (expected MAILINGESTD_<SECTION>_<KEY> "
                            f"with SECTION one of {', '.join(sorted(_SECTIONS))}){_did_you_mean(section, _SECTIONS)}")
            continue
        data.setdefault(section, {})[key] = _env_value(raw)
        applied[f"{section}.{key}"] = name
    return applied


def _did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _describe_path(msg: str) -> str:
    """Turn msgspec's ``... - at `$.daemon.workers` `` into ``daemon.workers: ...``."""
    match = re.search(r" - at `\$\.?(.*)`$", msg)
    if not match:
        return msg
    key = re.sub(r"\[(\d+)\]", r"[\1]", match.group(1)) or "(top level)"
    return f"{key}: {msg[: match.start()]}"


def _struct_in(annotation: Any) -> type[msgspec.Struct] | None:
    """The Struct type of a field typed ``SomeStruct`` or ``SomeStruct | None``."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _check_table(table: Any, kind: type[msgspec.Struct], prefix: str, problems: list[str]) -> bool:
    """Every unknown key, missing required key and badly typed value of one table, where msgspec
    stops at the first: an operator fixes them all in one round. Bad keys are removed so that
    the rest can still be decoded and validated; False when the table itself cannot be used."""
    if not isinstance(table, dict):
        problems.append(f"{prefix or '(top level)'}: expected a table")
        return False
    fields = {f.encode_name: f for f in msgspec.structs.fields(kind) if f.name != "path"}
    for key, value in list(table.items()):
        where = f"{prefix}.{key}" if prefix else key
        field = fields.get(key)
        if field is None:
            problems.append(f"{where}: unknown key{_did_you_mean(key, fields)}")
            del table[key]
            continue
        nested = _struct_in(field.type)
        origin, args = typing.get_origin(field.type), typing.get_args(field.type)
        if nested is not None and value is not None:
            usable = _check_table(value, nested, where, problems)
        elif origin is list and args and _struct_in(args[0]) and isinstance(value, list):
            value[:] = [item for index, item in enumerate(value)
                        if _check_table(item, args[0], f"{where}[{index}]", problems)]
            usable = True
        elif origin is dict and args and _struct_in(args[1]) and isinstance(value, dict):
            usable = all([_check_table(item, args[1], f"{where}.{name}", problems) for name, item in value.items()])
        else:
            try:
                msgspec.convert(value, field.type, dec_hook=_dec_hook, strict=False)
                usable = True
            except msgspec.ValidationError as exc:
                problems.append(f"{where}: {_describe_path(str(exc)).removesuffix(' - at `$`')}")
                usable = False
        if not usable:
            del table[key]
    missing = [f.encode_name for f in fields.values() if f.required and f.encode_name not in table]
    for name in missing:
        problems.append(f"{prefix}: missing required key `{name}`")
    return not missing


def _source_of(problem: str, path: str, env_keys: Mapping[str, str]) -> str:
    """Where the value a problem line is about came from: its environment variable, else the file."""
    key = problem.split(":", 1)[0]
    return f"environment {env_keys[key]}" if key in env_keys else path


def _error(path: str, problems: list[str], env_keys: Mapping[str, str]) -> ConfigError:
    lines = [p if p.startswith("environment ") else f"{_source_of(p, path, env_keys)}: {p}" for p in problems]
    message = lines[0] if len(lines) == 1 else f"{len(lines)} problems: " + "; ".join(lines)
    return ConfigError(message, lines)


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


def _validate(config: Config, where: str, env_keys: Mapping[str, str] | None = None) -> None:
    problems = []
    if config.metrics.http_listen is not None:
        try:
            parse_listen(config.metrics.http_listen)
        except ValueError as exc:
            problems.append(f"metrics.http_listen: {exc}")
    if config.daemon.workers != "auto" and config.daemon.workers < 1:
        problems.append("daemon.workers: expected \"auto\" or a number of at least 1")
    if not (config.store_url.startswith("sqlite:///") or config.store_url.startswith(("postgresql://", "postgres://"))):
        problems.append("store.url: expected sqlite:///PATH or postgresql://...")
    if config.queue.kind == "sqs" and not config.queue.url:
        problems.append("queue.url: required when queue.kind = \"sqs\"")
    if not 1 <= config.queue.batch_size <= 10:
        problems.append("queue.batch_size: expected 1..10 (SQS SendMessageBatch takes at most 10)")
    if not 1 <= config.queue.concurrency <= 64:
        problems.append("queue.concurrency: expected 1..64")
    if config.imap.idle_renew > 29 * 60:
        problems.append("imap.idle_renew: IDLE must be renewed before 29 minutes (RFC 2177)")
    lifecycle = config.store
    if lifecycle.metadata_retention and lifecycle.metadata_retention < max(lifecycle.raw_retention, 86400):
        problems.append("store.metadata_retention: expected 0 (keep forever) or at least raw_retention and 1d "
                        "(keys must outlive every batch in flight)")
    if lifecycle.retention_batch < 1 or lifecycle.partitions_ahead < 1:
        problems.append("store: retention_batch and partitions_ahead must be at least 1")
    if config.blobs.kind == "s3" and not config.blobs.bucket:
        problems.append("blobs.bucket: required when blobs.kind = \"s3\"")
    if not 1 <= config.imap.batch_messages <= MAX_BATCH_MESSAGES:
        problems.append(f"imap.batch_messages: expected 1..{MAX_BATCH_MESSAGES} (a batch is one PostgreSQL "
                        "statement, at most 65,535 parameters)")
    cluster = config.cluster
    if cluster.lease_time < 3 or cluster.capacity < 0 or cluster.release_per_round < 1:
        problems.append("cluster: expected lease_time of at least 3s, capacity >= 0 and release_per_round >= 1")
    sched = config.scheduler
    if not sched.high_interval <= sched.medium_interval <= sched.low_interval:
        problems.append("scheduler: expected high_interval <= medium_interval <= low_interval")
    if not 0 <= sched.jitter < 1:
        problems.append("scheduler.jitter: expected a fraction in [0, 1)")
    seen: set[str] = set()
    for index, account in enumerate(config.accounts):
        label = f"accounts[{index}] (id {account.id!r})"
        if account.id in seen:
            problems.append(f"{label}: duplicate account id")
        seen.add(account.id)
        id_problem = account_id_problem(account.id)
        if id_problem:
            problems.append(f"{label}: {id_problem}")
        if account.auth == "password" and not (account.password_file or account.password_env):
            problems.append(f"{label}: needs password_file or password_env")
        if account.auth == "oauth2" and account.oauth2 is None:
            problems.append(f"{label}: auth = \"oauth2\" needs an [accounts.oauth2] table")
        if not account.folders:
            problems.append(f"{label}: folders must list at least one folder")
    if problems:
        raise _error(where, problems, env_keys or {})


_TABLE_HEADER = re.compile(rb"^\s*\[\[?\s*([A-Za-z0-9_.\"-]+?)\s*\]\]?\s*(#.*)?$")


def _without_accounts(text: bytes) -> bytes:
    """The file minus its ``[[accounts]]`` tables (and their sub-tables), line by line.

    A control command needs runtime_dir, not 10,000 account tables; TOML parsing is pure Python
    and costs about a second for those. The line scan keeps every other table wherever it is.
    """
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = _TABLE_HEADER.match(line)
        if header:
            skipping = header.group(1) == b"accounts" or header.group(1).startswith(b"accounts.")
        if not skipping:
            kept.append(line)
    return b"".join(kept)


def load(path: str | None = None, environ: Mapping[str, str] | None = None, accounts: bool = True) -> Config:
    """Read, override from the environment, decode and validate the configuration.

    ``path`` None means ``$MAILINGESTD_CONFIG`` or the default path; a missing default file is an
    empty configuration, a missing file that was asked for is an error. ``accounts`` False skips
    the ``[[accounts]]`` tables (for commands that only talk to the running daemon).
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or "MAILINGESTD_CONFIG" in environ
    path = path or environ.get("MAILINGESTD_CONFIG") or DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    try:
        with open(path, "rb") as handle:
            text = handle.read()
        data = tomllib.loads((text if accounts else _without_accounts(text)).decode("utf-8"))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    problems: list[str] = []
    if "path" in data:
        problems.append("path: unknown key")
    env_keys = apply_env(data, environ, problems)
    _check_table(data, Config, "", problems)  # removes what it reports: the rest is validated too
    try:
        config = msgspec.convert(data, Config, dec_hook=_dec_hook, strict=False)
    except msgspec.ValidationError as exc:
        raise _error(str(path), [*problems, _describe_path(str(exc))], env_keys) from None
    config = msgspec.structs.replace(config, path=str(path))
    try:
        _validate(config, str(path), env_keys)
    except ConfigError as exc:
        problems += [line.removeprefix(f"{path}: ") for line in exc.problems]
    if problems:
        raise _error(str(path), problems, env_keys)
    return config


def read_secret(account: AccountConfig, environ: Mapping[str, str] | None = None) -> str:
    """The account's password from its file or environment variable (never logged)."""
    environ = os.environ if environ is None else environ
    if account.password_env:
        if account.password_env not in environ:
            raise ConfigError(f"account {account.id}: environment variable {account.password_env} is not set")
        return environ[account.password_env]
    if account.password_file:
        try:
            return Path(account.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"account {account.id}: cannot read password_file {account.password_file}: "
                              f"{exc.strerror}") from None
    raise ConfigError(f"account {account.id}: no password source")
