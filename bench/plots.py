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
        timeline.set_xlabel("seconds into the load")
        timeline.set_ylabel("append -> store commit (s)")
        timeline.set_title("Per-message latency over the run")
        timeline.grid(True, alpha=0.3)
        written.append(_save(figure, directory / f"{name}{suffix}.png"))
    if "hold_idle_over_time" in plots:
        figure, axis = plt.subplots(figsize=(6, 4))
        samples = plots["hold_idle_over_time"]
        axis.plot([s[0] for s in samples], [s[1] for s in samples])
        axis.set_xlabel("seconds since mailingestd was started")
        axis.set_ylabel("connections in IDLE (mailingestctl status)")
        axis.set_title("hold: accounts idling over time")
        axis.grid(True, alpha=0.3)
        written.append(_save(figure, directory / f"hold{suffix}.png"))
    if "backlog_rows_over_time" in plots:
        figure, axis = plt.subplots(figsize=(6, 4))
        samples = plots["backlog_rows_over_time"]
        axis.plot([s[0] for s in samples], [s[1] for s in samples], label="messages")
        axis.set_xlabel("seconds since the daemon was running")
        axis.set_ylabel("message rows in PostgreSQL")
        twin = axis.twinx()
        twin.plot([s[0] for s in samples], [s[2] / 1e6 for s in samples], color="tab:orange", label="MB")
        twin.set_ylabel("MB stored", color="tab:orange")
        axis.set_title("backlog: rows committed over time")
        axis.grid(True, alpha=0.3)
        written.append(_save(figure, directory / f"backlog{suffix}.png"))
    if "polling_polls_over_time" in plots:
        figure, axis = plt.subplots(figsize=(6, 4))
        samples = plots["polling_polls_over_time"]
        rates, previous = [], (0.0, 0.0)
        for at, polls in samples:
            if at > previous[0]:
                rates.append((at, (polls - previous[1]) / (at - previous[0]) * 60))
            previous = (at, polls)
        axis.plot([r[0] for r in rates], [r[1] for r in rates])
        axis.set_xlabel("seconds into the measuring window")
        axis.set_ylabel("polls per minute (mailingestd_polls_total)")
        axis.set_title("polling: throughput over time")
        axis.grid(True, alpha=0.3)
        written.append(_save(figure, directory / f"polling{suffix}.png"))
    return [path.name for path in written]
