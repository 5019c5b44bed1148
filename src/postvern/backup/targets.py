"""Where backups go: a local directory and S3-compatible object stores, several at once.

A target is named by a URL in ``[backup] targets``:

* ``file:///var/backups/postvern`` (or a bare absolute path) — a local directory, typically
  another disk or a network mount;
* ``s3://bucket/prefix?endpoint=https://s3.example.net&region=eu-central-1`` — any
  S3-compatible store through boto3; credentials come from boto3's usual chain (the
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` environment, ``~/.aws``), never from the URL.

An upload counts only once *every* configured target holds it (:class:`Targets`); a target
that fails after its retries makes the whole operation fail loudly, naming the target.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from postvern.durable import TEMP_PREFIX, fsync_dir, write_durably

# Retries per object and target before the operation fails: a brief outage of one store (a
# restart, a network blip) is ridden out, a dead one is reported within about a minute.
PUT_ATTEMPTS = 4
RETRY_BASE_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 60


_BUCKET_EXISTS = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


class TargetError(Exception):
    """A target could not be reached or refused an operation (the message names it)."""


class Target(Protocol):
    url: str

    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> bytes: ...
    def list(self, prefix: str) -> dict[str, int]: ...
    def delete(self, names: Iterable[str]) -> None: ...


class LocalTarget:
    """A directory; objects are files written durably (temp, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise TargetError(f"{self.url}: bad object name")
        return self.root / name

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A retried upload reuses the name, so a crashed attempt's temp file is replaced;
            # the folder's fsync makes the object's name survive a power cut as well.
            write_durably(path.parent, path.name, data, replace_temp=True)
            fsync_dir(path.parent)
        except OSError as e:
            raise TargetError(f"{self.url}: cannot write an object: {e.strerror}") from None

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except OSError as e:
            raise TargetError(f"{self.url}: cannot read {name}: {e.strerror}") from None

    def list(self, prefix: str) -> dict[str, int]:
        base = self.root / prefix
        found: dict[str, int] = {}
        if not base.is_dir():
            return found
        for entry in os.scandir(base):
            if entry.is_file() and not entry.name.startswith(TEMP_PREFIX):
                found[prefix + entry.name] = entry.stat().st_size
        return found

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)


class S3Target:
    """An S3-compatible bucket (AWS, MinIO, SeaweedFS, Ceph RGW, Garage …) through boto3."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None, region: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint}" if endpoint else "")
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region or "us-east-1",
            config=Config(
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                read_timeout=READ_TIMEOUT_SECONDS,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
                max_pool_connections=32,
            ),
        )
        self._bucket_checked = False
        self._bucket_lock = threading.Lock()

    def _fail(self, what: str, e: Exception) -> TargetError:
        return TargetError(f"{self.url}: {what}: {type(e).__name__}: {e}")

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from botocore.exceptions import ClientError

        with self._bucket_lock:
            if self._bucket_checked:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                try:
                    self._client.create_bucket(Bucket=self.bucket)
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in _BUCKET_EXISTS:
                        raise
            self._bucket_checked = True

    def put(self, name: str, data: bytes) -> None:
        try:
            self._ensure_bucket()
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)
        except Exception as e:  # botocore raises many unrelated types for one outage
            raise self._fail("cannot write an object", e) from None

    def get(self, name: str) -> bytes:
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            return bytes(reply["Body"].read())
        except Exception as e:
            raise self._fail(f"cannot read {name}", e) from None

    def list(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        try:
            self._ensure_bucket()
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found[item["Key"][len(self.prefix) :]] = int(item["Size"])
        except Exception as e:
            raise self._fail("cannot list objects", e) from None
        return found

    def delete(self, names: Iterable[str]) -> None:
        batch = [{"Key": self.prefix + n} for n in names]
        try:
            for start in range(0, len(batch), 1000):  # the DeleteObjects limit
                self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch[start : start + 1000]}
                )
        except Exception as e:
            raise self._fail("cannot delete objects", e) from None


def open_target(url: str) -> Target:
    if url.startswith("/"):
        return LocalTarget(Path(url))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return LocalTarget(Path(parts.path))
    if parts.scheme == "s3":
        query = dict(urllib.parse.parse_qsl(parts.query))
        return S3Target(parts.netloc, parts.path, query.get("endpoint"), query.get("region"))
    raise TargetError(f"{url}: unknown backup target (file:// or s3://)")


class Targets:
    """Every configured target, written together: done only when all of them hold the object."""

    def __init__(self, targets: list[Target]) -> None:
        if not targets:
            raise TargetError("no backup target configured ([backup] targets)")
        self.targets = targets
        # A target that failed an object after every retry is not tried again in this
        # operation: the operation has failed already, and saying so should not take minutes.
        self.dead: dict[str, str] = {}

    @classmethod
    def from_urls(cls, urls: Iterable[str]) -> Targets:
        return cls([open_target(u) for u in urls])

    def put(self, target: Target, name: str, data: bytes) -> None:
        """Write to one target, retrying with backoff; the last failure is raised."""
        for attempt in range(PUT_ATTEMPTS):
            if target.url in self.dead:
                raise TargetError(self.dead[target.url])
            try:
                target.put(name, data)
                return
            except TargetError as e:
                if attempt == PUT_ATTEMPTS - 1:
                    self.dead[target.url] = str(e)
                    raise
                time.sleep(RETRY_BASE_SECONDS * 2**attempt)
