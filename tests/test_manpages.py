"""The man pages render without a warning and document what the code defines.

Everything checked here is derived from the code, not from a hand-written list: configuration keys
and defaults from the msgspec Structs of mailingestd.config, commands and options from the click
objects of mailingestd.cli and mailingestd.ctl, metric names from what mailingestd.daemon.metrics
exposes, rule and alert names from etc/prometheus/mailingestd.rules.yml. A new key, option or
metric without documentation fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import msgspec
import pytest
import yaml

from mailingestd import cli, config, ctl
from mailingestd.daemon import metrics

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = ["mailingestd.8", "mailingestctl.1", "mailingestd.toml.5"]
EXAMPLE_CONFIG = ROOT / "etc" / "mailingestd.toml"
RULES = ROOT / "etc" / "prometheus" / "mailingestd.rules.yml"


def groff() -> str:
    path = shutil.which("groff")
    if path is None:
        pytest.fail("groff not found: install the Debian package groff-base (apt-get install groff-base)")
    return path


def render(page: str) -> str:
    """The page as plain text, one paragraph per line wherever it fits (long lines, no hyphenation)."""
    result = subprocess.run([groff(), "-man", "-Tascii", "-P-cbou", "-rLL=250n", "-rHY=0", str(MAN / page)],
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout


def _split(text: str, heading_pattern: str) -> dict[str, str]:
    """The text under each line that matches ``heading_pattern``, by that heading."""
    out: dict[str, str] = {}
    heading = ""
    for line in text.splitlines():
        if re.match(heading_pattern, line):
            heading = line.strip()
            out[heading] = ""
        elif heading:
            out[heading] += line + "\n"
    return out


def sections(text: str) -> dict[str, str]:
    """Top-level sections (NAME, OPTIONS...) of a rendered page, by heading."""
    return _split(text, r"^[A-Z][A-Z ]+$")


def subsections(text: str) -> dict[str, str]:
    """Subsections (.SS, indented 3 in the rendering) of a section, by heading."""
    return _split(text, r"^   \S")


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page: str) -> None:
    # -Tutf8 at the default width is what man(1) shows on a terminal; narrow lines warn there first.
    for device in ("-Tps", "-Tutf8"):
        result = subprocess.run([groff(), "-man", "-ww", "-z", device, str(MAN / page)], capture_output=True,
                                text=True, timeout=30, check=False)
        assert result.returncode == 0 and not result.stderr, \
            f"groff -man -ww {device} on man/{page}:\n{result.stderr}"


# --- configuration ---------------------------------------------------------------------------------
def struct_of(annotation: Any) -> tuple[str, type] | None:
    """("table" | "array" | "map", Struct) when a field holds a table; None for a plain value."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return "table", annotation
    if origin in (typing.Union, types.UnionType):
        found = [struct_of(a) for a in args if a is not type(None)]
        return found[0] if len(found) == 1 else None
    if origin is list and args and struct_of(args[0]):
        return "array", args[0]
    if origin is dict and len(args) == 2 and struct_of(args[1]):
        return "map", args[1]
    return None


def config_tables() -> Iterator[tuple[str, type]]:
    """Every TOML table the configuration accepts, as written in the man page, with its Struct."""

    def walk(heading: str, dotted: str, struct: type) -> Iterator[tuple[str, type]]:
        yield heading, struct
        for field in msgspec.structs.fields(struct):
            nested = struct_of(field.type)
            if nested is None:
                continue
            kind, inner = nested
            name = f"{dotted}.{field.name}" if dotted else field.name
            if kind == "table":
                yield from walk(f"[{name}]", name, inner)
            elif kind == "array":
                yield from walk(f"[[{name}]]", name, inner)
            else:
                yield from walk(f'[{name}."HOST"]', name, inner)

    for field in msgspec.structs.fields(config.Config):
        if field.name == "path":  # set by load(), refused in the file
            continue
        nested = struct_of(field.type)
        assert nested is not None, f"top-level config field {field.name} is not a table"
        kind, inner = nested
        yield from walk(f"[[{field.name}]]" if kind == "array" else f"[{field.name}]", field.name, inner)


def plain_fields(struct: type) -> list[msgspec.structs.FieldInfo]:
    return [f for f in msgspec.structs.fields(struct) if struct_of(f.type) is None]


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is config.Duration:
        return config.parse_duration(value)
    if kind is config.Size:
        return config.parse_size(value)
    raise NotImplementedError(kind)


def documented_keys() -> dict[str, dict[str, str]]:
    """{table heading: {key: default as written}} from the KEYS section of mailingestd.toml(5)."""
    keys_text = sections(render("mailingestd.toml.5"))["KEYS"]
    out: dict[str, dict[str, str]] = {}
    for heading, body in subsections(keys_text).items():
        out[heading] = {m.group(1): m.group(2).strip()
                        for m in re.finditer(r"^       (\w+) = (.*)$", body, re.MULTILINE)}
    return out


def test_every_configuration_key_is_documented_with_its_default() -> None:
    documented = documented_keys()
    problems = []
    for heading, struct in config_tables():
        if heading not in documented:
            problems.append(f"{heading}: no subsection in mailingestd.toml(5)")
            continue
        fields = plain_fields(struct)
        extra = set(documented[heading]) - {f.name for f in fields}
        if extra:
            problems.append(f"{heading}: documented but not in the code: {sorted(extra)}")
        for field in fields:
            written = documented[heading].get(field.name)
            if written is None:
                problems.append(f"{heading} {field.name}: not documented")
                continue
            if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT:
                expected_text = "(required)"
            else:
                default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
                if default is None:
                    expected_text = "(inherited)" if struct is config.ServerLimits else "(unset)"
                else:
                    try:
                        value = tomllib.loads(f"v = {written}")["v"]
                        converted = msgspec.convert(value, field.type, dec_hook=_dec_hook, strict=False)
                    except (tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError) as exc:
                        problems.append(f"{heading} {field.name} = {written}: not a valid value ({exc})")
                        continue
                    if converted != default:
                        problems.append(f"{heading} {field.name}: documented {written}, code default {default!r}")
                    continue
            if written != expected_text:
                problems.append(f"{heading} {field.name}: documented {written}, expected {expected_text}")
    assert not problems, "mailingestd.toml(5) vs mailingestd/config/schema.py:\n" + "\n".join(problems)


def test_every_configuration_key_is_in_the_example_config() -> None:
    """etc/mailingestd.toml shows every key (commented where it has no useful default)."""
    shown: dict[str, set[str]] = {}
    heading = ""
    for line in EXAMPLE_CONFIG.read_text().splitlines():
        table = re.match(r"^#?\s*(\[\[?[\w.]+(?:\.\"[^\"]+\")?\]\]?)\s*$", line)
        if table:
            heading = re.sub(r'\."[^"]+"', '."HOST"', table.group(1))
            continue
        key = re.match(r"^#?\s*(\w+)\s*=", line)
        if key and heading:
            shown.setdefault(heading, set()).add(key.group(1))
    missing = [f"{heading} {field.name}" for heading, struct in config_tables() for field in plain_fields(struct)
               if field.name not in shown.get(heading, set())]
    assert not missing, f"keys missing from {EXAMPLE_CONFIG.relative_to(ROOT)}: {missing}"


def test_example_config_values_are_the_defaults() -> None:
    """The example says "every key is shown with its default": its active values must be the defaults."""
    loaded = config.load(str(EXAMPLE_CONFIG), environ={})
    assert loaded == msgspec.structs.replace(config.Config(), path=str(EXAMPLE_CONFIG))


# --- commands and options ----------------------------------------------------------------------------
CommandPath = tuple[str, ...]


def walk_commands(command: click.Command, path: CommandPath = ()) -> Iterator[tuple[CommandPath, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk_commands(sub, (*path, name))


def options_of(command: click.Command) -> list[str]:
    return [opt for param in command.params if isinstance(param, click.Option)
            for opt in (*param.opts, *param.secondary_opts)]


def help_options(command: click.Command) -> list[str]:
    return list(command.context_settings.get("help_option_names", ["--help"]))


def test_mailingestd_options_are_documented() -> None:
    page = sections(render("mailingestd.8"))
    for opt in options_of(cli.command) + help_options(cli.command):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", page["OPTIONS"]), \
            f"mailingestd {opt} is not in OPTIONS of mailingestd(8)"
    for name, command in cli.command.commands.items():
        assert re.search(rf"^       {name}$", page["COMMANDS"], re.MULTILINE), \
            f"mailingestd {name} is not in COMMANDS of mailingestd(8)"
        for opt in options_of(command):
            assert opt in options_of(cli.command), f"mailingestd {name} {opt}: document it under the command"


def test_mailingestctl_commands_and_options_are_documented() -> None:
    page = sections(render("mailingestctl.1"))
    for opt in options_of(ctl.cli) + help_options(ctl.cli):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", page["OPTIONS"]), \
            f"mailingestctl {opt} is not in OPTIONS of mailingestctl(1)"
    commands = subsections(page["COMMANDS"])
    for path, command in walk_commands(ctl.cli):
        if not path or isinstance(command, click.Group):
            continue
        name = " ".join(path)
        heading = next((h for h in commands if h == name or h.startswith(name + " ")), None)
        assert heading is not None, f"mailingestctl {name}: no subsection in COMMANDS of mailingestctl(1)"
        body = heading + "\n" + commands[heading]
        for param in command.params:
            if isinstance(param, click.Argument):
                assert param.human_readable_name in heading, \
                    f"mailingestctl {name}: argument {param.human_readable_name} not in its heading"
        # --config is accepted after every command too: documented once, in OPTIONS.
        for opt in (o for o in options_of(command) if o != "--config"):
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", body), \
                f"mailingestctl {name} {opt} is not documented under its command in mailingestctl(1)"
    assert "Before or after the command" in words(page["OPTIONS"])
    for path, command in walk_commands(ctl.cli):
        if path:
            assert "--config" in options_of(command), f"mailingestctl {' '.join(path)}: no --config after it"


def test_shell_completion_is_documented() -> None:
    text = sections(render("mailingestctl.1"))["SHELL COMPLETION"]
    for shell in ("bash_source", "zsh_source", "fish_source"):
        assert f"_MAILINGESTCTL_COMPLETE={shell}" in text or shell in text
    assert "_MAILINGESTCTL_COMPLETE=bash_source mailingestctl" in (ROOT / "README.md").read_text()


# --- metrics --------------------------------------------------------------------------------------------
def exposed_metric_names() -> set[str]:
    """Every sample name the daemon's collector exposes (counters with _total, histogram series)."""
    snapshot = metrics.Snapshot(state="running", high_interval=60.0)
    names = set()
    for family in metrics.DaemonCollector(lambda: snapshot).collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("", "_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    assert len(names) > 20, names
    return names


def test_every_metric_is_documented() -> None:
    text = words(sections(render("mailingestd.8"))["METRICS"])
    missing = sorted(n for n in exposed_metric_names() if not re.search(rf"(?<![\w:]){n}(?![\w:])", text))
    assert not missing, f"metrics missing from METRICS in mailingestd(8): {missing}"


def test_every_rule_and_alert_name_is_documented() -> None:
    rules = yaml.safe_load(RULES.read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            names.add(rule.get("record") or rule["alert"])
            names.update(re.findall(r"(?<![\w:])mailingestd_\w+", rule["expr"]))
    text = words(sections(render("mailingestd.8"))["METRICS"])
    missing = sorted(n for n in names if not re.search(rf"(?<![\w:]){re.escape(n)}(?![\w:])", text))
    assert not missing, f"names from {RULES.relative_to(ROOT)} missing from METRICS in mailingestd(8): {missing}"


def test_exit_codes_and_signals_are_documented() -> None:
    from mailingestd import sysexits

    page = sections(render("mailingestd.8"))
    # EX_TEMPFAIL is mailingestctl's alone (drain --wait --timeout).
    codes = [value for name, value in vars(sysexits).items() if name.startswith("EX_") and name != "EX_TEMPFAIL"]
    for code in codes:
        assert re.search(rf"^       {code}(\s|$)", page["EXIT STATUS"], re.MULTILINE), \
            f"exit {code} not in mailingestd(8)"
    for code in (sysexits.EX_OK, sysexits.EX_USAGE, sysexits.EX_UNAVAILABLE, sysexits.EX_TEMPFAIL,
                 sysexits.EX_CONFIG):
        assert re.search(rf"^       {code}(\s|$)", sections(render("mailingestctl.1"))["EXIT STATUS"], re.MULTILINE)
    for name in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP"):
        assert name in page["SIGNALS"]
    for name in ("MAILINGESTD_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        assert name in page["ENVIRONMENT"]


# --- statements that went stale once: each check below failed on the pages it was written for ------
def test_every_section_with_environment_overrides_is_listed() -> None:
    text = words(subsections(sections(render("mailingestd.toml.5"))["DESCRIPTION"])["Environment overrides"])
    listed = text.split("overrides one key of the sections", 1)[1].split(", for example", 1)[0]
    assert sorted(re.findall(r"[a-z]+", listed.replace(" and ", " "))) == sorted(config.SECTIONS)


def test_worst_case_shutdown_time_agrees_everywhere() -> None:
    """The supervisor: drain up to shutdown_timeout, 5 s for drained children, SIGKILL, 5 s to reap."""
    promise = "shutdown_timeout + 10 s"
    places = {
        "mailingestd.toml(5)": words(render("mailingestd.toml.5")),
        "mailingestd(8)": words(render("mailingestd.8")),
        "README.md": words((ROOT / "README.md").read_text()),
        "systemd/mailingestd.service": words((ROOT / "systemd" / "mailingestd.service").read_text()),
    }
    for where, text in places.items():
        assert promise in text.replace("`", "").replace("daemon.", ""), f"{where} does not say {promise}"
        assert "2 \N{MULTIPLICATION SIGN} shutdown_timeout" not in text and "2 x shutdown_timeout" not in text


def test_every_account_state_is_listed() -> None:
    from mailingestd.sched.planner import AccountState

    # The scheduler reports held accounts as reauth_required besides the planner's states.
    states = {state.name.lower() for state in AccountState} | {"reauth_required"}
    text = words(sections(render("mailingestd.8"))["METRICS"])
    listed = set(re.search(r"accounts by labels state \(([^)]*)\)", text).group(1).split(", "))
    assert listed == states


def test_no_page_says_oauth2_does_not_work() -> None:
    for page in PAGES:
        text = words(render(page))
        assert "fails to log in" not in text and "does not yet obtain access tokens" not in text, page
        assert "BUGS" not in sections(render(page)) or "oauth2" not in sections(render(page))["BUGS"], page
