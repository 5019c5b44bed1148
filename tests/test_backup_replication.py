"""Continuous replication (issue #18, layer 3): the disk dies under load, the bucket brings
back every message acknowledged more than 60 s before — and in practice much less."""

from __future__ import annotations

import imaplib
import re
import shutil
import smtplib
import threading
import time
from pathlib import Path

from backup_kit import configure, init_key
from cli_kit import postvern
from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    mailbox_messages,
    make_data_dir,
    set_config,
)

ALICE = "alice@example.test"
BOB = "bob@example.test"
LOAD_SECONDS = 75.0
RATE_PER_SECOND = 20.0
CLIENTS = 4
RPO_SECONDS = 60.0
REPLICATE_SECONDS = 5.0


def test_data_directory_lost_under_load_restores_everything_older_than_the_rpo(
    tmp_path: Path, seaweed
) -> None:  # type: ignore[no-untyped-def]
    a, b = seaweed
    bucket = f"replication-{time.time_ns() % 10**9}"
    with DNSTestServer() as dns:
        dns.add("load.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        data = make_data_dir(tmp_path / "data")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        configure(
            data,
            [a.url(bucket), b.url(bucket)],
            replicate_seconds=REPLICATE_SECONDS,
            verify_interval_hours=1000.0,
        )
        key_file = tmp_path / "offline.key"
        init_key(data, key_file)
        server = ServerProcess(data).start()
        # Alice is logged in (her mail goes into her open mailbox), Bob is not (the spool).
        imap = imaplib.IMAP4(*data.addr("imap"))
        imap.starttls(ssl_context=client_tls_context())
        imap.login(ALICE, data.passwords[ALICE])
        imap.select("INBOX")

        lock = threading.Lock()
        acknowledged: dict[str, float] = {}
        stop_at = time.monotonic() + LOAD_SECONDS
        counter = iter(range(10**9))

        def client() -> None:
            host, port = data.addr("smtp")
            conn = smtplib.SMTP(host, port, timeout=30)
            conn.starttls(context=client_tls_context())
            interval = CLIENTS / RATE_PER_SECOND
            while time.monotonic() < stop_at:
                with lock:
                    n = next(counter)
                rcpt = ALICE if n % 2 else BOB
                marker = f"load-{n:06d}"
                raw = f"From: x@load.test\r\nSubject: {marker}\r\n\r\n{marker}\r\n"
                conn.sendmail("x@load.test", [rcpt], raw.encode())
                with lock:
                    acknowledged[marker] = time.time()
                time.sleep(interval)
            conn.quit()

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LOAD_SECONDS + 60)
        # The disk dies: everything under the data directory is gone, the server with it.
        lost_at = time.time()
        shutil.rmtree(data.path)
        server.kill()
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass

    restored = postvern(
        "backup", "restore", "--key-file", str(key_file), "--target", b.url(bucket),
        "--to", str(data.path),
    )  # fmt: skip
    assert restored.returncode == 0, restored.stdout + restored.stderr
    again = DataDir(data.path, data.domain, data.listen, data.passwords)
    present = set()
    for address in (ALICE, BOB):
        for raw in mailbox_messages(again, address):
            m = re.search(rb"Subject: (load-\d+)", raw)
            if m:
                present.add(m.group(1).decode())
    lost = [t for k, t in acknowledged.items() if k not in present]
    window = lost_at - min(lost) if lost else 0.0
    print(f"\nmeasured data-loss window: {window:.1f} s (goal: at most {RPO_SECONDS:.0f} s)")
    old_enough = {k for k, t in acknowledged.items() if t < lost_at - RPO_SECONDS}
    assert len(acknowledged) > LOAD_SECONDS * RATE_PER_SECOND * 0.5
    assert old_enough, "the load did not run long enough to test the RPO"
    missing = old_enough - present
    assert not missing, f"{len(missing)} message(s) acknowledged > 60 s before the loss are gone"
