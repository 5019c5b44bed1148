"""Backup benchmark: snapshot, replication, incremental upload, RPO and RTO, on this machine.

Builds a data directory of N mailboxes (default 10,000: a few hundred real accounts that
receive mail, the rest synthetic mailbox files made by the store's own code with random keys,
a handful of messages each), two SeaweedFS instances on loopback as two regions, and prints:

  * full snapshot throughput (MB/s of data directory, mailboxes/s) against a reference
    measured in the same run: the same files uploaded plainly (one unencrypted object per
    file, the same threads and targets) — what "leave it to the storage" costs;
  * the bytes uploaded by the next snapshot after 1% of the mailboxes changed, against the
    full one (goal ≤ 2%), and the replication (delta) of that change: time, mailboxes/s;
  * RTO: a whole restore from region B with only the offline key onto a fresh directory,
    then ``postvern serve`` until it is ready (goal ≤ 5 minutes for 10,000 mailboxes),
    against the reference: the plain objects downloaded;
  * RPO under a steady delivery load (default 100 deliveries/s over SMTP to the MX) with the
    server replicating continuously: the worst and the mean data-at-risk (now − start of the
    last replication that completed), sampled every 0.5 s (goal ≤ 60 s).

Usage: python bench/backup.py [--mailboxes 10000] [--rate 100] [--load-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from dnsserver import DNSTestServer  # noqa: E402
from harness import ServerProcess, client_tls_context, make_data_dir, set_config  # noqa: E402
from postvern.backup import keys  # noqa: E402
from postvern.backup.catalog import Catalog, read_status  # noqa: E402
from postvern.backup.manifest import Opening  # noqa: E402
from postvern.backup.restore import restore_all  # noqa: E402
from postvern.backup.service import BackupService  # noqa: E402
from postvern.backup.targets import Targets, open_target  # noqa: E402
from postvern.crypto import seal  # noqa: E402
from postvern.store.mailbox import INBOX, Mailbox  # noqa: E402
from seaweed import S3_ENV, Weed  # noqa: E402

MB = 1 << 20
REAL_USERS = 200
MESSAGES_PER_MAILBOX = 4


def _synthetic(args: tuple[Path, int, int]) -> list[tuple[str, str]]:
    """Make ``count`` mailbox files; returns (file name, key hex) to change some later."""
    directory, count, seed = args
    made = []
    for n in range(count):
        private, _public = seal.generate_keypair()
        key = os.urandom(32)
        name = f"{secrets.token_hex(16)}.sqlite"
        with Mailbox.create(directory / name, key, private) as box:
            inbox = box.folder(INBOX).id
            box.append_many(
                inbox,
                [
                    (
                        f"From: a@example.net\r\nSubject: {seed}-{n}-{m}\r\n\r\n".encode()
                        + secrets.token_hex(1500).encode(),
                        (),
                        None,
                    )
                    for m in range(MESSAGES_PER_MAILBOX)
                ],
            )
        made.append((name, key.hex()))
    return made


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plain_upload(root: Path, urls: list[str]) -> float:
    """The reference: every file as one unencrypted object, 8 threads, to every target."""
    targets = [open_target(u) for u in urls]
    files = [f for f in root.rglob("*") if f.is_file() and "backup" not in f.parts]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        for target in targets:
            list(
                pool.map(
                    lambda f, t=target: t.put(f"plain/{f.relative_to(root)}", f.read_bytes()), files
                )
            )
    return time.monotonic() - started


def plain_download(url: str, dest: Path) -> float:
    target = open_target(url)
    started = time.monotonic()
    names = list(target.list("plain/"))  # S3 lists every key under the prefix

    def one(name: str) -> None:
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(target.get(name))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100.0, help="deliveries/s in the RPO run")
    parser.add_argument("--load-seconds", type=float, default=60.0)
    args = parser.parse_args()
    os.environ.update(S3_ENV)
    work = Path(tempfile.mkdtemp(prefix="postvern-bench-backup-"))
    a = Weed("region-a", work / "weed-a").start()
    b = Weed("region-b", work / "weed-b").start()
    try:
        run(work, a, b, args)
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, a: Weed, b: Weed, args: argparse.Namespace) -> None:
    real = min(REAL_USERS, args.mailboxes)
    passwords = {f"user{i}@example.test": f"bench-password-{i}" for i in range(real)}
    t0 = time.monotonic()
    data = make_data_dir(work / "data", passwords=passwords)
    synthetic_count = args.mailboxes - real
    boxes = data.path / "mailboxes"
    jobs = [
        (boxes, synthetic_count // 4 + (1 if i < synthetic_count % 4 else 0), i) for i in range(4)
    ]
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        synthetic = [item for part in pool.map(_synthetic, jobs) for item in part]
    size = du(data.path)
    print(
        f"data directory: {args.mailboxes} mailboxes ({real} accounts), {size / MB:.0f} MB,"
        f" made in {time.monotonic() - t0:.0f} s"
    )

    bucket = "bench"
    urls = [a.url(bucket), b.url(bucket)]
    set_config(data.path, "backup", {"targets": urls})
    app = data.app()
    offline, public = keys.generate(app.server_key)
    keys.save_public(data.path, public)
    service = BackupService(
        data.path, app.settings, app.server_key, targets=Targets.from_urls(urls)
    )

    reference = plain_upload(data.path, urls)
    full = service.run("full")
    assert full is not None
    print("\n== full snapshot to 2 regions (SeaweedFS) ==")
    print(
        f"  Postvern  : {full.seconds:6.1f} s  {size / MB / full.seconds:6.1f} MB/s"
        f"  {args.mailboxes / full.seconds:7.0f} mailboxes/s"
        f"  uploaded {full.uploaded_bytes / MB:.0f} MB"
    )
    print(
        f"  reference : {reference:6.1f} s  {size / MB / reference:6.1f} MB/s"
        f"  {args.mailboxes / reference:7.0f} mailboxes/s  (plain objects, no encryption)"
    )

    # 1% of the mailboxes change; the next snapshot uploads only what changed.
    step = max(1, args.mailboxes // 100)

    def change(names: list[tuple[str, str]]) -> None:
        for name, key_hex in names:
            with Mailbox.open(boxes / name, bytes.fromhex(key_hex)) as box:
                new = b"Subject: new\r\n\r\n" + secrets.token_hex(1500).encode()
                box.append(box.folder(INBOX).id, new)

    change(synthetic[:step])
    again = service.run("full")
    assert again is not None
    ratio = again.uploaded_bytes / full.uploaded_bytes
    change(synthetic[step : 2 * step])
    delta = service.run("delta")
    assert delta is not None
    print(f"\n== after {step} mailboxes (1%) changed ==")
    print(
        f"  incremental snapshot: {again.seconds:5.1f} s,"
        f" {again.uploaded_bytes / MB:.1f} MB uploaded"
        f" = {ratio:.2%} of the full one (goal ≤ 2%)"
    )
    print(
        f"  replication (delta) : {delta.seconds:5.1f} s,"
        f" {delta.uploaded_bytes / MB:.1f} MB uploaded;"
        f" all {args.mailboxes} mailboxes scanned at {args.mailboxes / delta.seconds:.0f}/s,"
        f" changed ones shipped at {delta.uploaded_bytes / MB / delta.seconds:.1f} MB/s"
    )
    app.close()

    print("\n== RTO: whole restore from region B with only the offline key ==")
    fresh = work / "restored"
    started = time.monotonic()
    catalog = Catalog(open_target(urls[1]), Opening(offline=offline))
    point = catalog.at(None)
    report = restore_all(
        catalog, point, fresh, server_root=catalog.opening.server_root(point.header)
    )
    assert not report.problems, report.problems[:3]
    restored = time.monotonic() - started
    set_config(fresh, "backup", {"targets": []})
    server = ServerProcess(type(data)(fresh, data.domain, data.listen, data.passwords)).start()
    ready = time.monotonic() - started
    server.stop()
    reference_down = plain_download(urls[1], work / "plain-restore")
    print(
        f"  Postvern  : files back in {restored:.1f} s ({report.bytes / MB / restored:.0f} MB/s),"
        f" server ready at {ready:.1f} s  (goal ≤ 300 s for 10,000 mailboxes)"
    )
    print(f"  reference : plain objects downloaded in {reference_down:.1f} s")
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.rmtree(work / "plain-restore", ignore_errors=True)

    rpo(work, data, urls, args)


def rpo(work: Path, data, urls: list[str], args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    print(f"\n== RPO under {args.rate:.0f} deliveries/s for {args.load_seconds:.0f} s ==")
    with DNSTestServer() as dns:
        dns.add("load.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        server = ServerProcess(data).start()
        status_file = data.path / "backup" / "status.json"
        samples: list[float] = []
        points: set[tuple[float, float]] = set()
        sent = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + args.load_seconds
        recipients = list(data.passwords)
        clients = 16

        def client(number: int) -> None:
            conn = smtplib.SMTP(*data.addr("smtp"), timeout=60)
            conn.starttls(context=client_tls_context())
            interval = clients / args.rate
            next_at = time.monotonic()
            n = number
            while time.monotonic() < stop_at:
                rcpt = recipients[n % len(recipients)]
                conn.sendmail(
                    "x@load.test",
                    [rcpt],
                    f"From: x@load.test\r\nSubject: load {n}\r\n\r\n{'x' * 2000}\r\n".encode(),
                )
                with lock:
                    sent[0] += 1
                n += clients
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
            conn.quit()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        load_started = time.monotonic()
        # Data written before the load was in the last snapshot already (nothing touched the
        # directory since): what is at risk is what came after max(that start, load start).
        load_wall = time.time()
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            try:
                status = json.loads(status_file.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if status.get("backup_started"):
                if status["backup_started"] >= load_wall:
                    points.add((status["backup_started"], status["backup_at"]))
                samples.append(time.time() - max(status["backup_started"], load_wall))
        elapsed = time.monotonic() - load_started
        server.stop()
    durations = sorted(end - start for start, end in points)
    print(f"  deliveries: {sent[0]} in {elapsed:.0f} s = {sent[0] / elapsed:.0f}/s")
    if samples:
        print(
            f"  data at risk: worst {max(samples):.1f} s, mean {sum(samples) / len(samples):.1f} s"
            f" (goal ≤ 60 s); {len(points)} replication points,"
            f" each {durations[len(durations) // 2] if durations else 0:.1f} s (median)"
        )
    status = read_status(data.path)
    print(f"  last snapshot {status.get('backup')}, ok={status.get('backup_ok')}")


if __name__ == "__main__":
    main()
