"""moto_server as a throwaway SQS endpoint."""


from __future__ import annotations

import sys
from pathlib import Path
from typing import Any



from ._common import LOOPBACK, _Server, _find_binary, _http_get


class MotoServer(_Server):
    """``moto_server`` on loopback: SQS (and S3) for boto3 through :attr:`endpoint_url`.

    moto keeps everything in memory, so :meth:`restart` comes back EMPTY: queues and messages are
    gone. Credentials are dummies; :attr:`env` has what a child process needs to reach it.
    """

    name = "moto"
    region = "us-east-1"

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(root, port)
        beside_python = Path(sys.executable).parent / "moto_server"
        self._moto_server = (
            str(beside_python)
            if beside_python.exists()
            else _find_binary("moto_server", "pip install 'moto[server]'")
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (in any process) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def _launch(self) -> None:
        self._spawn([self._moto_server, "-H", LOOPBACK, "-p", str(self.port)])

    def _ready(self) -> bool:
        try:
            _http_get(f"{self.endpoint_url}/moto-api/data.json", timeout=1)
            return True
        except OSError:
            return False

    def client(self, service: str = "sqs") -> Any:
        """A boto3 client for ``service`` talking to this server."""
        import boto3  # imported lazily: Dovecot-only users of this module need not pay for it

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_queue(self, name: str, fifo: bool = False) -> str:
        """Create an SQS queue (``.fifo`` appended for FIFO when missing); return its URL.

        FIFO queues get no content-based deduplication: senders pass MessageDeduplicationId.
        """
        attributes = {}
        if fifo:
            name = name if name.endswith(".fifo") else f"{name}.fifo"
            attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
        return self.client("sqs").create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    def create_bucket(self, name: str) -> None:
        """Create an S3 bucket."""
        self.client("s3").create_bucket(Bucket=name)


# ---------------------------------------------------------------------------------------------
# Prometheus node_exporter and Prometheus


