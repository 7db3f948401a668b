"""A throughput sink for SQS: speaks the wire protocol boto3 uses, counts what it is sent, keeps nothing.

moto_server is right for SQS semantics and far too slow to measure a publisher (a bare boto3 loop
reaches about 55 msg/s into a FIFO queue on this machine). This sink answers the calls the
publisher and the bench make, in the protocol the installed botocore speaks for SQS (JSON 1.0:
``POST /`` with ``X-Amz-Target: AmazonSQS.<Action>`` and ``Content-Type:
application/x-amz-json-1.0``; botocore's ``data/sqs/2012-11-05/service-2.json`` says
``"protocol": "json"``), on one asyncio loop in its own process:

- ``SendMessageBatch`` / ``SendMessage``: checked as SQS checks them (at most 10 entries, distinct
  ids, a body and a whole request of at most ``MaximumMessageSize``, 1 MiB: the botocore model's
  ``MaximumMessageSize`` documentation, "from 1,024 bytes (1 KiB) up to 1,048,576 bytes (1 MiB)";
  ``MessageGroupId`` required on a ``.fifo`` queue), answered with a ``MessageId`` and the body's
  MD5 per entry, and counted. Nothing is stored or delivered.
- ``CreateQueue``, ``GetQueueUrl``, ``GetQueueAttributes`` (``MaximumMessageSize``, and the
  number of entries received as ``ApproximateNumberOfMessages``), ``PurgeQueue`` (resets counts).
- ``GET /stats``: every queue's counts as JSON; with ``--record`` also how often each envelope key
  (the body's ``"key"``) arrived and in which order, for tests that check each outbox row was sent
  exactly once and in order within its message group, and when each entry arrived (``arrivals``:
  account_id, uid, Unix time: the latency scenario's append-to-queue times); with ``--delay S`` every request waits S
  seconds (a distant SQS) and ``"sink:"`` reports the most requests that were in flight at once.

Run: ``python -m bench.sqs_sink --port 9324 [--record]``; :class:`SqsSink` starts and stops it.
It is a measuring instrument, not an SQS: no receive, no visibility, no deduplication.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

MAX_MESSAGE_BYTES = 1024 * 1024
ACCOUNT = "000000000000"


class Queue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fifo = name.endswith(".fifo")
        self.requests = 0
        self.entries = 0
        self.body_bytes = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.keys: collections.Counter[str] = collections.Counter()
        self.order: list[str] = []  # keys in arrival order (--record)
        self.arrivals: list[tuple[Any, Any, float]] = []  # (account_id, uid, unix time) per entry (--record)

    def stats(self, record: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "entries": self.entries, "body_bytes": self.body_bytes,
                               "first_at": self.first_at, "last_at": self.last_at}
        if record:
            out["keys"] = dict(self.keys)
            out["order"] = self.order
            out["arrivals"] = self.arrivals
        return out


class SqsError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class Sink:
    def __init__(self, host: str, port: int, record: bool, delay: float = 0.0) -> None:
        self.host, self.port, self.record, self.delay = host, port, record, delay
        self.queues: dict[str, Queue] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{ACCOUNT}/{name}"

    def queue(self, url_or_name: str) -> Queue:
        name = url_or_name.rstrip("/").rsplit("/", 1)[-1]
        if name not in self.queues:
            raise SqsError("AWS.SimpleQueueService.NonExistentQueue", f"no queue {name}")
        return self.queues[name]

    # --- actions -------------------------------------------------------------------------------------
    def create_queue(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["QueueName"]
        self.queues.setdefault(name, Queue(name))
        return {"QueueUrl": self.url(name)}

    def get_queue_url(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"QueueUrl": self.url(self.queue(request["QueueName"]).name)}

    def get_queue_attributes(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        return {"Attributes": {"MaximumMessageSize": str(MAX_MESSAGE_BYTES),
                               "ApproximateNumberOfMessages": str(queue.entries),
                               "FifoQueue": "true" if queue.fifo else "false"}}

    def purge_queue(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        self.queues[queue.name] = Queue(queue.name)
        return {}

    def send_message(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        entry = {"Id": "0", **{k: v for k, v in request.items() if k != "QueueUrl"}}
        self._check(queue, [entry])
        body = entry["MessageBody"]
        self._count(queue, [body])
        return {"MessageId": str(uuid.uuid4()), "MD5OfMessageBody": hashlib.md5(body.encode()).hexdigest()}

    def send_message_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        entries = request.get("Entries") or []
        self._check(queue, entries)
        self._count(queue, [e["MessageBody"] for e in entries])
        return {"Successful": [{"Id": e["Id"], "MessageId": str(uuid.uuid4()),
                                "MD5OfMessageBody": hashlib.md5(e["MessageBody"].encode()).hexdigest()}
                               for e in entries], "Failed": []}

    def _check(self, queue: Queue, entries: list[dict[str, Any]]) -> None:
        if not entries:
            raise SqsError("AWS.SimpleQueueService.EmptyBatchRequest", "no entries")
        if len(entries) > 10:
            raise SqsError("AWS.SimpleQueueService.TooManyEntriesInBatchRequest", f"{len(entries)} entries")
        if len({e["Id"] for e in entries}) != len(entries):
            raise SqsError("AWS.SimpleQueueService.BatchEntryIdsNotDistinct", "ids not distinct")
        sizes = [len(e["MessageBody"].encode()) for e in entries]
        if max(sizes) > MAX_MESSAGE_BYTES:
            raise SqsError("InvalidParameterValue", f"a message of {max(sizes)} bytes")
        if sum(sizes) > MAX_MESSAGE_BYTES:
            raise SqsError("AWS.SimpleQueueService.BatchRequestTooLong", f"{sum(sizes)} bytes in one batch")
        if queue.fifo and any("MessageGroupId" not in e for e in entries):
            raise SqsError("MissingParameter", "MessageGroupId is required on a FIFO queue")

    def _count(self, queue: Queue, bodies: list[str]) -> None:
        now = time.time()
        queue.first_at = queue.first_at or now
        queue.last_at = now
        queue.requests += 1
        queue.entries += len(bodies)
        queue.body_bytes += sum(map(len, bodies))
        if self.record:
            for body in bodies:
                try:
                    envelope = json.loads(body)
                    key = str(envelope.get("key"))
                    queue.arrivals.append((envelope.get("account_id"), envelope.get("uid"), now))
                except (ValueError, AttributeError):
                    key = "?"
                queue.keys[key] += 1
                queue.order.append(key)

    ACTIONS = {"CreateQueue": create_queue, "GetQueueUrl": get_queue_url, "GetQueueAttributes": get_queue_attributes,
               "PurgeQueue": purge_queue, "SendMessage": send_message, "SendMessageBatch": send_message_batch}

    # --- HTTP ----------------------------------------------------------------------------------------
    def dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if method == "GET" and path.startswith("/stats"):
            stats: dict[str, Any] = {name: q.stats(self.record) for name, q in self.queues.items()}
            stats["sink:"] = {"max_in_flight": self.max_in_flight}  # ':' is in no SQS queue name
            return 200, json.dumps(stats).encode()
        target = headers.get("x-amz-target", "")
        action = target.rpartition(".")[2]
        handler = self.ACTIONS.get(action)
        if method != "POST" or not target.startswith("AmazonSQS.") or handler is None:
            return 400, json.dumps({"__type": "com.amazonaws.sqs#UnsupportedOperation",
                                    "message": f"the sink does not do {action or method}"}).encode()
        try:
            return 200, json.dumps(handler(self, json.loads(body or b"{}"))).encode()
        except SqsError as exc:
            return exc.status, json.dumps({"__type": f"com.amazonaws.sqs#{exc.code}", "message": exc.message}).encode()
        except (KeyError, ValueError, TypeError) as exc:
            return 400, json.dumps({"__type": "com.amazonaws.sqs#InvalidParameterValue",
                                    "message": f"{type(exc).__name__}: {exc}"}).encode()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if self.delay and method == "POST":
                    # A round trip to a distant SQS: requests wait side by side, so the number
                    # in flight at once shows how many the client keeps going.
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    try:
                        await asyncio.sleep(self.delay)
                    finally:
                        self.in_flight -= 1
                status, reply = self.dispatch(method, path, headers, body)
                writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Bad Request'}\r\n"
                             f"Content-Type: application/x-amz-json-1.0\r\nContent-Length: {len(reply)}\r\n"
                             f"x-amzn-RequestId: {uuid.uuid4()}\r\n\r\n".encode() + reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def serve(self) -> None:
        server = await asyncio.start_server(self.connection, self.host, self.port, backlog=256)
        print(f"sqs-sink listening on {self.host}:{self.port}", flush=True)
        async with server:
            await server.serve_forever()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SqsSink:
    """The sink as a subprocess on a free loopback port (its CPU apart from the caller's)."""

    region = "us-east-1"

    def __init__(self, record: bool = False, delay: float = 0.0) -> None:
        self.port = free_port()
        self.record = record
        self.delay = delay
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a boto3 client needs to talk to the sink (it checks no signature)."""
        return {"AWS_ACCESS_KEY_ID": "sink", "AWS_SECRET_ACCESS_KEY": "sink", "AWS_DEFAULT_REGION": self.region}

    def start(self) -> SqsSink:
        args = ([sys.executable, "-m", "bench.sqs_sink", "--port", str(self.port), "--delay", str(self.delay)]
                + (["--record"] if self.record else []))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sqs sink did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
                time.sleep(0.05)

    def create_queue(self, name: str) -> str:
        request = urllib.request.Request(self.endpoint_url + "/", data=json.dumps({"QueueName": name}).encode(),
                                         headers={"X-Amz-Target": "AmazonSQS.CreateQueue",
                                                  "Content-Type": "application/x-amz-json-1.0"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.loads(reply.read())["QueueUrl"]

    def stats(self, queue: str | None = None) -> dict[str, Any]:
        with urllib.request.urlopen(self.endpoint_url + "/stats", timeout=5) as reply:
            data = json.loads(reply.read())
        return data if queue is None else data.get(queue.rstrip("/").rsplit("/", 1)[-1], {})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> SqsSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sqs_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9324)
    parser.add_argument("--record", action="store_true", help="count arrivals per envelope key (tests)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each request waits (a distant SQS)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(Sink(args.host, args.port, args.record, args.delay).serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
