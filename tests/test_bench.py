"""The bench's own instruments: the CPU-by-process meter, and the published figures generated from
the committed reports (bench/summarize.py), not typed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import summarize, tables
from bench.cpu import CpuMeter, server_roots

ROOT = Path(__file__).resolve().parent.parent
SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"


def test_results_and_readme_table_are_what_summarize_generates() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.summarize", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr + "\nrun `python -m bench.summarize --write`"


def test_the_meter_counts_processes_born_and_reaped_inside_the_window() -> None:
    """A child born and reaped inside the window is counted in the bench's group (through this
    process's cutime); a process named as a group of its own, started inside the window, is counted
    there and not in the bench's."""
    started: dict[str, list[int]] = {}
    meter = CpuMeter(lambda: {**server_roots(), **started}).start()
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=0.5) + "print('spun', flush=True)\ninput()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        started["spinner"] = [spinner.pid]
        subprocess.run([sys.executable, "-c", SPIN.format(seconds=0.3)], check=True, timeout=60)
        assert spinner.stdout is not None and spinner.stdout.readline() == b"spun\n"
        result = meter.stop()
    finally:
        spinner.kill()
        spinner.wait(10)
    window = result["window_seconds"]
    spun, bench = result["cores"]["spinner"] * window, result["cores"]["bench"] * window
    assert 0.5 <= spun < 0.9, result
    assert 0.3 <= bench < 0.75, result  # the short-lived child; the spinner is not counted twice
    assert result["cores"]["machine"] * window >= spun + bench - 0.05, result
    assert result["machine_cpus"] == os.cpu_count()


def test_cpu_rows_and_contended_rows_render() -> None:
    report = json.loads((ROOT / "bench/results/2026-12-01/report.json").read_text())
    contended = copy.deepcopy(report["full"]["scenarios"]["contended"])
    contended["cpu_by_process"] = {"window": {
        "window_seconds": 90.0, "machine_cpus": 2, "queue": None, "workers_each": [0.2, 0.3],
        "cores": {"supervisor": 0.01, "scheduler": 0.1, "workers": 0.5, "publisher": 0.02, "postgresql": 0.1,
                  "dovecot": 0.2, "bench": 0.05, "other": 0.1, "machine": 1.08}}}
    rows = tables.rows({"contended": contended}, report["full"]["machine"])
    assert any("status line" in row[1] and "will be late" in row[2] for row in rows)
    assert [row[1].split(" tier")[0] for row in rows if " tier (every" in row[1]] == ["high", "medium", "low"]
    (cpu_row,) = tables.cpu_rows({"contended": contended})
    assert cpu_row[:2] == ("contended", "window (90 s)")
    assert dict(zip(tables.CPU_HEADER, cpu_row))["workers"] == "0.500"
    assert dict(zip(tables.CPU_HEADER, cpu_row))["queue"] == ""


def test_the_newest_measurement_of_each_scenario_is_published() -> None:
    sources = summarize.load_sources()
    picked = summarize.newest(sources, "full")
    assert picked["contended"][0][0] == "bench/results/2026-12-01/report.json"
    for source, result in picked.values():
        assert (ROOT / source[0]).is_file() and "error" not in result
