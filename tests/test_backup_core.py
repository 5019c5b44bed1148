"""Snapshots to two S3 regions (real SeaweedFS), verify, and a whole restore on a new machine.

Layer 1 of issue #18: what is backed up, that it is unreadable in the bucket, that tampering
is named, that a dead region fails loudly and a retry completes, and that the offline key
alone brings the server back.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from pathlib import Path

import boto3
import pytest

from backup_kit import append, configure, deposit, init_key, message, user_id
from cli_kit import postvern
from harness import DataDir, mailbox_messages, make_data_dir
from postvern.backup.targets import open_target

ALICE = "alice@example.test"
BOB = "bob@example.test"


def _client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _where(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of an s3:// target URL."""
    parts = urllib.parse.urlsplit(url)
    return parts.netloc, parts.path.strip("/") + "/"


def _objects(url: str) -> dict[str, bytes]:
    target = open_target(url)
    return {name: target.get(name) for prefix in ("m/", "b/", "o/") for name in target.list(prefix)}


@pytest.fixture
def backed(tmp_path: Path, seaweed) -> tuple[DataDir, Path, list[str]]:  # type: ignore[no-untyped-def]
    a, b = seaweed
    name = f"core-{tmp_path.name[-12:].lower().replace('_', '-')}-{time.time_ns() % 10**9}"
    data = make_data_dir(tmp_path / "data")
    targets = [a.url(name), b.url(name)]
    configure(data, targets)
    key_file = tmp_path / "offline.key"
    init_key(data, key_file)
    return data, key_file, targets


def test_snapshot_holds_nothing_readable_and_restores_on_a_new_machine(
    backed: tuple[DataDir, Path, list[str]], tmp_path: Path, seaweed
) -> None:  # type: ignore[no-untyped-def]
    data, key_file, targets = backed
    append(data, ALICE, [message("stored-in-the-mailbox-1234")])
    deposit(data, ALICE, message("sealed-in-the-spool-5678"))
    deposit(data, BOB, message("bobs-own-letter-9012"))
    run = postvern("--data", str(data.path), "backup", "run")
    assert run.returncode == 0, run.stderr
    assert "2 target(s)" in run.stdout

    listed = postvern("--data", str(data.path), "backup", "list")
    assert listed.returncode == 0 and "full" in listed.stdout

    # The bucket: random names, nothing readable, no user id or name anywhere.
    stored = _objects(targets[0])
    assert any(n.startswith("o/") for n in stored) and any(n.startswith("m/") for n in stored)
    secrets_to_look_for = [
        b"stored-in-the-mailbox-1234", b"sealed-in-the-spool-5678", b"alice", b"example.test",
        user_id(data, ALICE).encode(), user_id(data, BOB).encode(),
        (data.path / "server.key").read_text().strip().encode(), b"SQLite format",
    ]  # fmt: skip
    for name, blob in stored.items():
        assert len(name.split("/")[1]) == 32
        for needle in secrets_to_look_for:
            assert needle not in blob and needle not in name.encode(), (name, needle)

    verify = postvern("--data", str(data.path), "backup", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 user(s)" in verify.stdout

    # A new machine: only the offline key and the bucket's address.
    new = tmp_path / "new-machine"
    restored = postvern(
        "backup", "restore", "--key-file", str(key_file), "--target", targets[1], "--to", str(new)
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert (new / "server.key").read_text() == (data.path / "server.key").read_text()
    assert (new / "server.key").stat().st_mode & 0o077 == 0
    # The restored server can go on backing up at once, to the same offline key.
    assert (new / "backup" / "offline.pub").read_bytes() == (
        data.path / "backup" / "offline.pub"
    ).read_bytes()
    again = DataDir(new, data.domain, data.listen, data.passwords)
    alice = mailbox_messages(again, ALICE)
    assert [m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in alice] == [
        b"stored-in-the-mailbox-1234",
        b"sealed-in-the-spool-5678",
    ]
    assert b"bobs-own-letter-9012" in mailbox_messages(again, BOB)[0]
    users = postvern("--data", str(new), "user", "list")
    assert ALICE in users.stdout and BOB in users.stdout


def test_a_flipped_byte_is_named_by_verify(
    backed: tuple[DataDir, Path, list[str]], seaweed
) -> None:  # type: ignore[no-untyped-def]
    data, _key, targets = backed
    append(data, ALICE, [message(f"m{i}", 20_000) for i in range(20)])
    assert postvern("--data", str(data.path), "backup", "run").returncode == 0
    _a, b = seaweed
    bucket, prefix = _where(targets[1])
    client = _client(b.endpoint)
    victim = sorted(
        k["Key"] for k in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}o/")["Contents"]
    )[0]
    blob = bytearray(client.get_object(Bucket=bucket, Key=victim)["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=victim, Body=bytes(blob))

    verify = postvern("--data", str(data.path), "backup", "verify")
    assert verify.returncode == 1
    failed = [line for line in verify.stdout.splitlines() if line.startswith("FAILED")]
    assert failed and all(victim.removeprefix(prefix) in line for line in failed), verify.stdout
    assert all("region" not in line or b.endpoint in line for line in failed)


def test_a_tampered_manifest_fails_its_signature(
    backed: tuple[DataDir, Path, list[str]], seaweed
) -> None:  # type: ignore[no-untyped-def]
    data, _key, targets = backed
    assert postvern("--data", str(data.path), "backup", "run").returncode == 0
    a, _b = seaweed
    bucket, prefix = _where(targets[0])
    client = _client(a.endpoint)
    key = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}m/")["Contents"][0]["Key"]
    header = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    header[20] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(header))
    verify = postvern("--data", str(data.path), "backup", "verify")
    assert verify.returncode == 1 and "bad signature" in verify.stdout


def test_a_region_killed_mid_upload_fails_loudly_and_a_retry_completes(
    backed: tuple[DataDir, Path, list[str]], seaweed
) -> None:  # type: ignore[no-untyped-def]
    data, _key, targets = backed
    # ~48 MiB of mailbox: a dozen 4 MiB objects, so the upload is still going when B dies.
    for batch in range(8):
        append(data, ALICE, [message(f"big-{batch}-{i}", 600_000) for i in range(10)])
    a, b = seaweed
    bucket, prefix = _where(targets[0])
    client = _client(a.endpoint)

    def kill_when_uploading() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}o/")
            except Exception:
                listed = {}
            if listed.get("KeyCount", 0) >= 1:
                b.kill()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_uploading)
    killer.start()
    try:
        first = postvern("--data", str(data.path), "backup", "run")
        killer.join()
        assert first.returncode == 1, first.stdout
        assert "upload failed" in first.stderr and b.endpoint in first.stderr
        assert "m/" not in "".join(open_target(targets[0]).list("m/"))  # no snapshot claimed
    finally:
        killer.join()
        b.ensure_running()
    second = postvern("--data", str(data.path), "backup", "run")
    assert second.returncode == 0, second.stderr
    verify = postvern("--data", str(data.path), "backup", "verify")
    assert verify.returncode == 0, verify.stdout
