"""Every PromQL expression of the Grafana dashboard and of the Prometheus rules, ready to query.

``dashboard_exprs`` substitutes Grafana's template variables with values Prometheus accepts (a
dashboard variable becomes its "All" regex, ``$__rate_interval`` a fixed range) and turns the
variables' ``label_values(selector, label)`` queries into plain PromQL over the same selector.
``rule_exprs`` returns the rules' expressions as written. ``with_bool_comparisons`` makes a
threshold expression answer with 0/1 instead of an empty result, so "returns no series" can only
mean a misspelt metric or label, not a quiet system.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

# Grafana's built-in variables; the ranges are long enough for rate() over a 1 s scrape.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# $name, ${name}, ${name:format} and [[name]]
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\s*\)\s*$", re.DOTALL)
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def dashboard_exprs(path: Path | str) -> list[str]:
    """Every panel target and variable query of the dashboard at ``path``, variables substituted."""
    dashboard = json.loads(Path(path).read_text())
    variables = dashboard.get("templating", {}).get("list", [])
    values = dict(GRAFANA_BUILTINS)
    for variable in variables:
        values[variable["name"]] = variable.get("allValue") or ".*"

    raw: list[str] = []
    for variable in variables:
        if variable.get("type") == "query":
            raw.append(_label_values_as_promql(_query_text(variable["query"])))
    for panel in _panels(dashboard.get("panels", [])):
        raw.extend(target["expr"] for target in panel.get("targets", []) if target.get("expr"))
    return [_substitute(expr, values) for expr in raw]


def rule_exprs(path: Path | str) -> list[str]:
    """The ``expr`` of every recording and alerting rule in the rule file at ``path``."""
    rules = yaml.safe_load(Path(path).read_text())
    return [rule["expr"].strip() for group in rules["groups"] for rule in group["rules"]]


def with_bool_comparisons(expr: str) -> str:
    """Add ``bool`` to every comparison operator outside label matchers and strings.

    ``x > 0.1`` then returns x's series with 0 or 1 instead of filtering them out; operators that
    already carry ``bool`` are left alone.
    """
    out: list[str] = []
    depth = 0  # inside {...} label matchers, where != is a matcher, not a comparison
    index = 0
    while index < len(expr):
        char = expr[index]
        if char in "\"'`":
            end = _string_end(expr, index)
            out.append(expr[index:end])
            index = end
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0 and (match := _COMPARISON.match(expr, index)):
            out.append(match.group())
            index = match.end()
            if not re.match(r"\s*bool\b", expr[index:]):
                out.append(" bool")
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _panels(panels: list[dict]) -> list[dict]:
    """Panels, with those inside collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))
    return found


def _query_text(query: str | dict) -> str:
    """A variable's query: a string in older dashboards, an object in newer ones."""
    return query if isinstance(query, str) else query.get("query", "")


def _label_values_as_promql(query: str) -> str:
    """``label_values(sel, label)`` -> ``count by (label) (sel)``; other queries unchanged."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        return query
    selector, label = match.groups()
    if not selector:
        selector = "{%s!=\"\"}" % label
    return f"count by ({label}) ({selector})"


def _substitute(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, match.group())

    return _VARIABLE.sub(value, expr)


def _string_end(expr: str, start: int) -> int:
    """Index just past the string literal opening at ``start`` (backslash escapes honoured)."""
    quote = expr[start]
    index = start + 1
    while index < len(expr) and expr[index] != quote:
        index += 2 if expr[index] == "\\" and quote != "`" else 1
    return index + 1
