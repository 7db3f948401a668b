"""PNG plots of one run (matplotlib, no display): latency distributions and progress over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _label(axis: Any, title: str, xlabel: str, ylabel: str) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)


def _over_time(path: Path, points: list[tuple[float, float]], title: str, xlabel: str, ylabel: str,
               twin: tuple[str, list[tuple[float, float]]] | None = None) -> Path:
    """One line over time; ``twin`` a second series on its own axis, (its label, its points)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p[0] for p in points], [p[1] for p in points])
    if twin is not None:
        other = axis.twinx()
        other.plot([p[0] for p in twin[1]], [p[1] for p in twin[1]], color="tab:orange")
        other.set_ylabel(twin[0], color="tab:orange")
    _label(axis, title, xlabel, ylabel)
    return _save(figure, path)


def render(plots: dict[str, Any], directory: Path, mode: str) -> list[str]:
    """Write every plot whose data the run produced; return the file names."""
    written: list[Path] = []
    suffix = "" if mode == "full" else f"-{mode}"
    for name in ("latency", "latency_light"):
        if name not in plots:
            continue
        figure, (cdf, timeline) = plt.subplots(1, 2, figsize=(12, 4.5))
        for label, values in (("append -> IDLE EXISTS (bare client, floor)", plots[name]["floor"]),
                              ("append -> store commit (daemon)", plots[name]["store"]),
                              ("append -> SQS receive (daemon)", plots[name]["sqs"])):
            if values:
                ordered = sorted(values)
                cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=f"{label}, n={len(ordered)}")
        cdf.set_xscale("log")
        cdf.set_xlabel("seconds after APPEND acknowledged")
        cdf.set_ylabel("fraction of messages")
        cdf.set_title(f"{name}: latency distribution (CDF)")
        cdf.grid(True, which="both", alpha=0.3)
        cdf.legend(fontsize=8)
        points = plots.get(f"{name}_timeline", [])
        timeline.scatter([p[0] for p in points], [p[1] for p in points], s=4)
        _label(timeline, "Per-message latency over the run", "seconds into the load", "append -> store commit (s)")
        written.append(_save(figure, directory / f"{name}{suffix}.png"))
    if "hold_idle_over_time" in plots:
        samples = plots["hold_idle_over_time"]
        written.append(_over_time(directory / f"hold{suffix}.png", [(s[0], s[1]) for s in samples],
                                  "hold: accounts idling over time", "seconds since mailingestd was started",
                                  "connections in IDLE (mailingestctl status)"))
    if "backlog_rows_over_time" in plots:
        samples = plots["backlog_rows_over_time"]
        written.append(_over_time(directory / f"backlog{suffix}.png", [(s[0], s[1]) for s in samples],
                                  "backlog: rows committed over time", "seconds since the daemon was running",
                                  "message rows in PostgreSQL",
                                  twin=("MB stored", [(s[0], s[2] / 1e6) for s in samples])))
    if "polling_polls_over_time" in plots:
        rates, previous = [], (0.0, 0.0)
        for at, polls in plots["polling_polls_over_time"]:
            if at > previous[0]:
                rates.append((at, (polls - previous[1]) / (at - previous[0]) * 60))
            previous = (at, polls)
        written.append(_over_time(directory / f"polling{suffix}.png", rates, "polling: throughput over time",
                                  "seconds into the measuring window", "polls per minute (mailingestd_polls_total)"))
    return [path.name for path in written]
