"""Loading the configuration: the TOML file, the ``MAILINGESTD_<SECTION>_<KEY>`` overrides from
the environment, and every problem reported at once, each with its source and the closest known
key for a misspelt one (the schema is ``schema.py``)."""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import msgspec

from .schema import (DEFAULT_CONFIG_PATH, ENV_PREFIX, MAX_BATCH_MESSAGES, AccountConfig, Config, ConfigError,
                     Duration, Size, account_id_problem, parse_duration, parse_listen, parse_size)


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Duration:
        return parse_duration(value)
    if kind is Size:
        return parse_size(value)
    raise NotImplementedError(kind)


SECTIONS = {f.name: f.type for f in msgspec.structs.fields(Config) if f.name not in ("accounts", "path")}


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
        if section not in SECTIONS or not key:
            problems.append(f"environment {name}: unknown setting (expected MAILINGESTD_<SECTION>_<KEY> "
                            f"with SECTION one of {', '.join(sorted(SECTIONS))}){_did_you_mean(section, SECTIONS)}")
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


@functools.cache
def _fields(kind: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """A Struct's fields by their name in the file (msgspec evaluates the annotations on every
    call: memoised, for a file of 10,000 accounts checks the same table kind 10,000 times)."""
    return {f.encode_name: f for f in msgspec.structs.fields(kind) if f.name != "path"}


def _check_table(table: Any, kind: type[msgspec.Struct], prefix: str, problems: list[str]) -> bool:
    """Every unknown key, missing required key and badly typed value of one table, where msgspec
    stops at the first: an operator fixes them all in one round. Bad keys are removed so that
    the rest can still be decoded and validated; False when the table itself cannot be used."""
    if not isinstance(table, dict):
        problems.append(f"{prefix or '(top level)'}: expected a table")
        return False
    fields = _fields(kind)
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
