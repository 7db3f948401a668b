"""What `pip install` puts on a host: the daemon's package and its data files, nothing of the
development tools, the tests or the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_daemon_and_no_devtools_tests_or_bench(tmp_path: Path) -> None:
    # Built from a copy, so the build leaves nothing (build/, egg-info) in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info",
                                                                 "results", ".hypothesis", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("mailingestd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"mailingestd", f"{wheel.name.split('-py3')[0]}.data", f"{wheel.name.split('-py3')[0]}.dist-info"}, tops
    packaged = {name for name in names if name.startswith("mailingestd/")}
    assert "mailingestd/fetch/worker.py" in packaged and "mailingestd/keys.py" in packaged
    assert not [name for name in packaged if any(dev in name for dev in ("devservers", "samplemail", "demo"))]
    assert any(name.endswith("share/man/man8/mailingestd.8") for name in names)
