"""Configuration errors an operator fixes in one round: every problem at once, where each value
came from, the closest known key; systemd-style durations; metrics.http_listen checked at load."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from mailingestd import config as cfg
from mailingestd.daemon.metrics import serve_http


def load_problems(tmp_path: Path, text: str, environ: dict[str, str]) -> list[str]:
    path = tmp_path / "mailingestd.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(str(path), environ=environ)
    assert "\n" not in str(err.value)  # logs and reload replies keep one line
    return err.value.problems


def test_every_problem_at_once_with_its_source_and_the_closest_key(tmp_path: Path) -> None:
    path = tmp_path / "mailingestd.toml"
    problems = load_problems(tmp_path, """
[daemon]
wrokers = 3
shutdown_timeout = "soon"
[deamon]
workers = 2
[limits.servers."imap.gmail.com"]
max_conections_per_server = 3
[[accounts]]
id = "a"
hots = "imap.example.com"
username = "u"
password_env = "P"
""", {"MAILINGESTD_QUEUE_BATCH_SIZE": "11", "MAILINGESTD_STORE_URLL": "sqlite:///x"})
    assert f"{path}: daemon.wrokers: unknown key (did you mean `workers`?)" in problems
    assert any(p.startswith(f"{path}: daemon.shutdown_timeout: expected a duration") for p in problems)
    assert f"{path}: deamon: unknown key (did you mean `daemon`?)" in problems
    assert (f"{path}: limits.servers.imap.gmail.com.max_conections_per_server: unknown key "
            "(did you mean `max_connections_per_server`?)") in problems
    assert f"{path}: accounts[0].hots: unknown key (did you mean `host`?)" in problems
    assert f"{path}: accounts[0]: missing required key `host`" in problems
    assert "environment MAILINGESTD_STORE_URLL: store.urll: unknown key (did you mean `url`?)" in problems
    # A value check that needs the decoded configuration still runs next to the key problems.
    assert any(p.startswith("environment MAILINGESTD_QUEUE_BATCH_SIZE: queue.batch_size: expected 1..10")
               for p in problems)
    assert len(problems) == 8, problems


def test_one_problem_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mailingestd.toml"
    assert load_problems(tmp_path, "[imap]\ntimeout = 5\nthreads = \"many\"\n", {}) == [
        f"{path}: imap.threads: Expected `int`, got `str`"]


@pytest.mark.parametrize("text,seconds", [
    ("1h30m", 5400), ("1h 30min", 5400), ("2d12h", 216000), ("1.5h", 5400), ("250ms", 0.25),
    ("90", 90), (" 5m ", 300), ("1w", 604800), ("2 hours", 7200),
])
def test_durations_read_like_systemd(text: str, seconds: float) -> None:
    assert cfg.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30 1h", "1h30", "1x", "", "5 m s", "-1s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        cfg.parse_duration(text)


def test_duration_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mailingestd.toml"
    path.write_text('[scheduler]\nlow_interval = "1h30m"\n')
    assert cfg.load(str(path), environ={}).scheduler.low_interval == 5400


@pytest.mark.parametrize("listen", ["localhost:9853", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000",
                                    "::1:9853", "[::1]", "127.0.0.1:http"])
def test_bad_http_listen_is_refused_at_load(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "mailingestd.toml"
    problems = load_problems(tmp_path, f'[metrics]\nhttp_listen = "{listen}"\n', {})
    assert len(problems) == 1 and problems[0].startswith(f"{path}: metrics.http_listen: expected")


def _free_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_http_listen_on_ipv6_loopback_serves_health(tmp_path: Path) -> None:
    port = _free_port(socket.AF_INET6, "::1")
    listen = f"[::1]:{port}"
    path = tmp_path / "mailingestd.toml"
    path.write_text(f'[metrics]\nhttp_listen = "{listen}"\n')
    assert cfg.load(str(path), environ={}).metrics.http_listen == listen
    server = serve_http(listen, CollectorRegistry(), lambda: True)
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/health", timeout=5) as response:
            assert (response.status, response.read()) == (200, b"ok\n")
    finally:
        server.shutdown()
        server.server_close()
