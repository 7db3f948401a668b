"""Raw message bodies in S3 (``[blobs] kind = "s3"``) instead of in the store.

Ordering, and why nothing can point at nothing: :meth:`Store.commit_batch` calls
:meth:`S3Blobs.put_batch` BEFORE it opens the store transaction. Every object is written (S3 PUT
is atomic and durable once acknowledged) under a key derived only from the message key, and only
then are the rows that name those objects committed. A crash after the PUTs and before the COMMIT
leaves objects no row names (orphans, at most one per message of the batch); the batch is fetched
again (the checkpoint did not move) and its PUTs overwrite the same keys with the same bytes, so a
retry adopts the orphans instead of adding more. A row whose ``blob`` column names an object is
therefore only ever committed after that object exists. Objects of messages never committed
(a UIDVALIDITY change between fetch and commit) stay orphans; the bucket lifecycle rule
(docs/data-lifecycle.md) expires them with everything else.

The envelope on the queue carries the object in the shape of the Amazon SQS Extended Client's
payload pointer, ``["software.amazon.payloadoffloading.PayloadS3Pointer", {"s3BucketName": ...,
"s3Key": ...}]`` (field ``raw_pointer``), plus ``sha256`` of the raw bytes, so consumers that
already follow that pointer (or ``PayloadS3Pointer.fromJson`` in Java) read the raw message
as-is.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from typing import Any, Callable, Sequence

import msgspec

from ..config import BlobsConfig

POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"


class BlobError(Exception):
    """S3 refused or could not be reached; the batch is not committed and will be retried."""


class Prepared(msgspec.Struct):
    """What the store writes for one message: raw bytes inline, or a reference to S3."""

    raw: bytes | None
    sha256: str
    blob: str | None
    envelope_extra: dict[str, Any] | None


def pointer(bucket: str, key: str) -> list[Any]:
    """The SQS Extended Client's payload pointer for one object."""
    return [POINTER_CLASS, {"s3BucketName": bucket, "s3Key": key}]


def blob_ref(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_ref(ref: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not ref.startswith("s3://"):
        raise BlobError(f"not an S3 reference: {ref!r}")
    bucket, _, key = ref[5:].partition("/")
    return bucket, key


def make_s3_client(region: str, endpoint_url: str | None, timeout: float = 30.0, pool: int = 16) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", region_name=region, endpoint_url=endpoint_url,
                        config=BotoConfig(connect_timeout=timeout, read_timeout=timeout,
                                          retries={"max_attempts": 3}, max_pool_connections=pool))


class S3Blobs:
    """Puts raw messages under ``prefix + message key`` and reads them back."""

    def __init__(self, config: BlobsConfig, client: Any = None) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.client = client if client is not None else make_s3_client(config.region, config.endpoint_url,
                                                                       config.timeout, config.concurrency)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Fault injection for tests: called after every PUT of a batch succeeded, before the commit.
        self.after_put: Callable[[], None] | None = None

    def object_key(self, message_key: str) -> str:
        return self.prefix + message_key

    def _put(self, key: str, raw: bytes, sha256: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=raw, ContentType="message/rfc822",
                                   Metadata={"sha256": sha256})
        except Exception as exc:
            raise BlobError(f"S3 put s3://{self.bucket}/{key}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def put_batch(self, keyed: Sequence[tuple[str, bytes]]) -> list[Prepared]:
        """PUT every (message key, raw) of a batch, concurrently; raises BlobError if any failed."""
        out = []
        jobs = []
        for message_key, raw in keyed:
            sha = hashlib.sha256(raw).hexdigest()
            key = self.object_key(message_key)
            out.append(Prepared(raw=None, sha256=sha, blob=blob_ref(self.bucket, key),
                                envelope_extra={"raw_pointer": pointer(self.bucket, key), "sha256": sha}))
            jobs.append((key, raw, sha))
        if len(jobs) == 1 or self.config.concurrency <= 1:
            for job in jobs:
                self._put(*job)
        elif jobs:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.config.concurrency,
                                                                   thread_name_prefix="s3put")
            for future in [self._pool.submit(self._put, *job) for job in jobs]:
                future.result()
        if self.after_put is not None:
            self.after_put()
        return out

    def get(self, ref: str) -> bytes:
        bucket, key = parse_ref(ref)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise BlobError(f"S3 get {ref}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from None


def prepare_inline(raw: bytes) -> Prepared:
    return Prepared(raw=raw, sha256=hashlib.sha256(raw).hexdigest(), blob=None, envelope_extra=None)


def open_blobs(config: BlobsConfig) -> S3Blobs | None:
    """The blob store for ``[blobs]``, or None when raw bytes stay in the store (kind = "none")."""
    return S3Blobs(config) if config.kind == "s3" else None


def read_raw(store: Any, key: str, blobs: S3Blobs | None, config: BlobsConfig | None = None) -> bytes | None:
    """A message's raw bytes wherever they live: the store's ``raw`` column or its S3 object.

    None when the message is unknown; raises BlobError when its raw bytes were pruned by
    retention (``store.raw_retention``) or the object is gone.
    """
    row = store.message_raw_or_ref(key)
    if row is None:
        return None
    raw, ref = row
    if raw is not None:
        return bytes(raw)
    if ref:
        if blobs is None:
            blobs = S3Blobs(config or BlobsConfig(kind="s3", bucket=parse_ref(ref)[0]))
        return blobs.get(ref)
    raise BlobError(f"{key}: raw bytes pruned by retention (store.raw_retention); metadata is kept")
