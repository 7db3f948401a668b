"""node_exporter and Prometheus as throwaway servers (the metrics textfile path end to end)."""


from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any



from ._common import LOOPBACK, _Server, _find_binary, _http_get


class NodeExporter(_Server):
    """``prometheus-node-exporter`` with only the textfile collector, reading ``textfile_dir``."""

    name = "node_exporter"

    def __init__(self, textfile_dir: Path, port: int | None = None, root: Path | None = None) -> None:
        self.textfile_dir = Path(textfile_dir)
        self.textfile_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(root or self.textfile_dir.parent / f"node_exporter-{id(self):x}", port)
        self._binary = _find_binary(
            "prometheus-node-exporter", "apt-get install prometheus-node-exporter"
        )

    @property
    def url(self) -> str:
        """The /metrics URL."""
        return f"http://{LOOPBACK}:{self.port}/metrics"

    @property
    def target(self) -> str:
        """host:port, as a Prometheus scrape target."""
        return f"{LOOPBACK}:{self.port}"

    def _launch(self) -> None:
        self._spawn(
            [
                self._binary,
                f"--web.listen-address={self.target}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={self.textfile_dir}",
            ]
        )

    def scrape(self) -> str:
        """GET /metrics and return the exposition text."""
        return _http_get(self.url).decode()


class Prometheus(_Server):
    """A real Prometheus server on loopback scraping ``scrape_targets`` (``host:port`` strings)."""

    name = "prometheus"
    start_timeout = 60.0

    def __init__(
        self,
        root: Path,
        scrape_targets: list[str],
        port: int | None = None,
        scrape_interval: str = "1s",
    ) -> None:
        super().__init__(root, port)
        self._binary = _find_binary("prometheus", "apt-get install prometheus")
        self.scrape_targets = list(scrape_targets)
        self.scrape_interval = scrape_interval

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _launch(self) -> None:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "targets", "static_configs": [{"targets": self.scrape_targets}]}
            ],
        }
        config_path = self.root / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        self._spawn(
            [
                self._binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
            ]
        )

    def _ready(self) -> bool:
        try:
            _http_get(f"{self.url}/-/ready", timeout=1)
            return True
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; return ``data.result`` (a list of series)."""
        body = json.loads(_http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    def wait_for_series(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll :meth:`query` until it returns at least one series; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {expr!r} on {self.url} after {timeout:.0f} s")
            time.sleep(0.2)
