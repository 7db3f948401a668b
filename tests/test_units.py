"""Pure pieces without servers: configuration, header parsing, batching, the SQLite store's invariants."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from mailingestd import config as cfg
from mailingestd.frames import Heartbeat, Poll, WorkerStats, decode, encode
from mailingestd.fetch.ingest import plan_batches
from mailingestd.fetch.message import parse_headers
from mailingestd.store.store import StoredMessage, open_store


def test_durations_and_sizes():
    assert cfg.parse_duration("90s") == 90 and cfg.parse_duration("5m") == 300
    assert cfg.parse_duration("1.5h") == 5400 and cfg.parse_duration(7) == 7
    assert cfg.parse_duration("250ms") == 0.25
    assert cfg.parse_size("64MiB") == 64 * 1024**2 and cfg.parse_size("10MB") == 10_000_000
    for bad in ("soon", "-1s", "5 parsecs", True):
        with pytest.raises(ValueError):
            cfg.parse_duration(bad)


def test_defaults_from_empty_file(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    c = cfg.load(str(path), environ={})
    assert c.scheduler.high_interval == 60 and c.scheduler.medium_interval == 300 and c.scheduler.low_interval == 900
    assert c.limits.max_connections_per_server == 100 and c.limits.connects_per_minute == 200
    assert c.limits.max_connections_per_account == 2 and c.queue.kind == "none"
    assert c.store_url == "sqlite:////var/lib/mailingestd/mailingestd.sqlite3"


def test_environment_overrides_single_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[store]\nurl = "sqlite:///a"\n')
    c = cfg.load(str(path), environ={"MAILINGESTD_STORE_URL": "postgresql://x@h/db", "MAILINGESTD_DAEMON_WORKERS": "3",
                                     "MAILINGESTD_SCHEDULER_HIGH_INTERVAL": "30s", "MAILINGESTD_DAEMON_PIN_CPUS": "false"})
    assert c.store_url == "postgresql://x@h/db" and c.daemon.workers == 3 and c.scheduler.high_interval == 30
    assert c.daemon.pin_cpus is False


@pytest.mark.parametrize("text,env,needle", [
    ('[daemon]\nworkers = "lots"\n', {}, "daemon.workers"),
    ("[scheduler]\nhigh_intervall = 5\n", {}, "high_intervall"),
    ('[[accounts]]\nid = "a"\nhost = "h"\nusername = "u"\n', {}, "password_file or password_env"),
    ('[[accounts]]\nid = "a/b"\nhost = "h"\nusername = "u"\npassword_env = "P"\n', {}, "contain no '/'"),
    ("[limits]\nconnects_per_minute = 'x'\n", {}, "limits.connects_per_minute"),
    ("", {"MAILINGESTD_NOPE_X": "1"}, "MAILINGESTD_NOPE_X"),
    ("not toml =", {}, "not valid TOML"),
])
def test_configuration_errors_name_file_key_and_expectation(tmp_path, text, env, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(str(path), environ=env)
    message = str(err.value)
    assert needle in message and "\n" not in message
    if not env:
        assert str(path) in message


def test_limits_per_server_override_global():
    limits = cfg.LimitsConfig(servers={"imap.gmail.com": cfg.ServerLimits(max_connections_per_server=500)})
    assert limits.for_server("imap.gmail.com").max_connections_per_server == 500
    assert limits.for_server("imap.gmail.com").connects_per_minute == 200
    assert limits.for_server("other").max_connections_per_server == 100


def test_secret_sources_never_echo_the_secret(tmp_path):
    secret_file = tmp_path / "pw"
    secret_file.write_text("s3cr3t\n")
    account = cfg.AccountConfig(id="a", host="h", username="u", password_file=str(secret_file))
    assert cfg.read_secret(account) == "s3cr3t"
    with pytest.raises(cfg.ConfigError) as err:
        cfg.read_secret(cfg.AccountConfig(id="a", host="h", username="u", password_env="NOPE"), environ={})
    assert "NOPE" in str(err.value)


def test_headers_best_effort_on_broken_input():
    raw = (b"From: =?utf-8?B?SsO8cmdlbg==?= <j@example.com>\r\nSubject: =?iso-8859-1?q?caf=E9?=\r\n"
           b"To: a@b\x00c\r\nDate: not a date\r\nSubject: =?bogus?X?zz?=\r\n\r\nbody")
    headers = parse_headers(raw)
    assert headers.from_.startswith("Jürgen") and headers.subject == "café"
    assert headers.date == "not a date" and "\x00" not in headers.to
    assert parse_headers(b"").message_id is None
    huge = b"Subject: " + b"x" * 2_000_000 + b"\r\n\r\n"
    assert len(parse_headers(huge).subject or "") <= 2048


@given(st.lists(st.integers(min_value=1, max_value=5_000_000), max_size=60),
       st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=10_000_000))
def test_batches_keep_uid_order_and_caps(sizes, max_messages, max_bytes):
    pending = list(enumerate(sizes, start=1))
    batches = plan_batches(pending, max_messages, max_bytes)
    assert [uid for batch in batches for uid in batch] == [uid for uid, _ in pending]
    size_of = dict(pending)
    for batch in batches:
        assert 1 <= len(batch) <= max_messages
        assert len(batch) == 1 or sum(size_of[u] for u in batch) <= max_bytes


def _msg(uid: int) -> StoredMessage:
    return StoredMessage(uid=uid, raw=f"Subject: {uid}\r\n\r\n".encode(), size=14, internaldate=None, message_id=None,
                         from_=None, to=None, cc=None, subject=str(uid), date=None, in_reply_to=None, references=None)


def test_store_commit_is_idempotent_and_checkpoint_never_goes_back(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    box = store.start_mailbox("a", "INBOX", 7)
    assert store.commit_batch(box, [_msg(1), _msg(2)], settled_uid=2) == 2
    assert store.commit_batch(box, [_msg(1), _msg(2)], settled_uid=2) == 0
    assert store.outbox_depth() == 2
    store.commit_batch(box, [], settled_uid=1)
    assert store.get_mailbox("a", "INBOX").last_uid == 2
    stale = store.get_mailbox("a", "INBOX")
    store.start_mailbox("a", "INBOX", 8)  # UIDVALIDITY changed under a batch in flight
    with pytest.raises(Exception):
        store.commit_batch(stale, [_msg(3)], settled_uid=3)
    assert store.get_mailbox("a", "INBOX").last_uid == 0 and store.counts()["messages"] == 2
    envelope = json.loads(store.outbox_batch(1)[0].envelope)
    assert envelope["key"] == "a/INBOX/7/1" and envelope["v"] == 1


def test_frames_roundtrip_and_garbage_is_none():
    assert decode(encode(Poll(account_id="a", order_id=3, may_connect=True))) == Poll(account_id="a", order_id=3,
                                                                                      may_connect=True)
    beat = Heartbeat(role="worker", slot=1, pid=2, state="running",
                     stats=WorkerStats(messages_ingested=3, bytes_ingested=9, idle_connections=1, accounts=2,
                                       busy=0, last_ingest=1.5, stuck_folders=0, uids_vanished=0,
                                       oversize_skipped=0))
    assert decode(encode(beat)) == beat
    for garbage in (b"", b"\xc1", b"\x92\x01\x02", json.dumps({"type": "Poll"}).encode()):
        assert decode(garbage) is None


def test_control_commands_skip_account_tables_but_keep_the_rest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nruntime_dir = "/r"\n[[accounts]]\nid = "a"\nhost = "h"\nusername = "u"\n'
                    'password_env = "P"\n[accounts.oauth2]\nprovider = "google"\n[metrics]\ninterval = "7s"\n'
                    '[[accounts]]\nid = "b"\nhost = "h"\nusername = "u"\npassword_env = "P"\n')
    light = cfg.load(str(path), environ={}, accounts=False)
    assert light.accounts == [] and light.daemon.runtime_dir == "/r" and light.metrics.interval == 7
    assert [a.id for a in cfg.load(str(path), environ={}).accounts] == ["a", "b"]


def test_message_key_formats_and_parses_in_one_place() -> None:
    from mailingestd.keys import MessageKey, message_key, sql_key

    key = message_key("acme", "Projects/2026/Q1", 1700000000, 42)
    assert key == "acme/Projects/2026/Q1/1700000000/42"
    assert MessageKey.parse(key) == ("acme", "Projects/2026/Q1", 1700000000, 42)  # a folder may hold '/'
    assert sql_key("m") == "m.account_id || '/' || m.folder || '/' || m.uidvalidity || '/' || m.uid"


def test_a_send_error_without_a_response_is_one_failed_batch_not_a_crash(tmp_path):
    """Exceptions from botocore or the network carry ``response = None`` or none at all: the batch
    fails with its reason and is retried; reading the missing reply must not raise."""
    from mailingestd.config import QueueConfig
    from mailingestd.publish.publisher import Publisher

    class NoReply(Exception):
        response = None

    class Client:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def send_message_batch(self, **_: object) -> None:
            raise self.exc

    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    queue = QueueConfig(kind="sqs", url="https://sqs.eu-west-1.amazonaws.com/123456789012/mail")
    for exc in (NoReply("connection reset"), OSError("no route")):
        reply, reason, sender_fault = Publisher(store, queue, client=Client(exc))._send([(None, {"Id": "0"})])
        assert reply is None and not sender_fault
        assert reason.startswith(type(exc).__name__ + ": ")
