"""Nothing readable lands on disk: not messages, headers, flags, folder names, nor passwords."""

from __future__ import annotations

import asyncio
import base64
import quopri
from pathlib import Path

from harness import DataDir, services
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"
MARKERS = {
    "header": "Zqxheadermarker7781",
    "body": "Zqxbodymarker4410",
    "spooled": "Zqxspooledmarker9921",
    "keyword": "Zqxkeywordmarker3350",
    "folder": "Zqxfoldermarker5156",
    "utf8": "Zqxünïcødemarker",
}


def forms(marker: str) -> set[bytes]:
    """The marker as bytes, and as it would look base64- or QP-encoded at any alignment."""
    raw = marker.encode()
    out = {raw, raw.lower(), marker.encode("utf-16-le"), quopri.encodestring(raw).strip()}
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw + b"\0\0")
        # drop the characters that mix with the padding bytes at either end
        out.add(encoded[4 if pad else 0 : -4])
    return {f for f in out if len(f) >= 8}


def scan(root: Path) -> list[str]:
    hits = []
    needles = {name: forms(m) for name, m in MARKERS.items()}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for name, variants in needles.items():
            if any(v in data for v in variants):
                hits.append(f"{path.relative_to(root)}: {name}")
    return hits


def message(subject: str, body: str) -> bytes:
    return (
        f"From: a@example.org\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def test_no_marker_in_any_file(data_dir: DataDir) -> None:
    async def main() -> None:
        s = services(data_dir)
        try:
            alice = s.app.directory.user(ALICE)
            await s.registry.deliver(alice, SpoolItem(message("spool", MARKERS["spooled"])))
            # the spool holds it sealed while the mailbox is locked
            assert not scan(data_dir.path)
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "test")
            h = logged.mailbox
            box = h.box
            folder = await h.run(box.create_folder, f"Work/{MARKERS['folder']}")
            await h.run(
                box.append,
                folder.id,
                message(MARKERS["header"], f"{MARKERS['body']} {MARKERS['utf8']}"),
                ["\\Seen", MARKERS["keyword"]],
            )
            await s.registry.deliver(alice, SpoolItem(message("direct", MARKERS["body"])))
            inbox = await h.run(box.folder, "INBOX")
            assert await h.run(box.search_text, inbox.id, "text", MARKERS["spooled"])
            assert await h.run(box.search_text, folder.id, "text", MARKERS["header"])
            hits = scan(data_dir.path)  # while open: WAL and shared-memory files exist
            assert not hits, hits
            await h.release()
        finally:
            await s.close()

    asyncio.run(main())
    hits = scan(data_dir.path)
    assert not hits, hits
    # passwords and recovery keys are not on disk either
    for secret in [*data_dir.passwords.values(), *data_dir.recovery.values()]:
        for path in data_dir.path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes()


def test_running_server_writes_no_plaintext_anywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through every listener at once: MX, submission with a queued remote recipient, IMAP."""
    import imaplib
    import smtplib

    from dnsserver import DNSTestServer
    from harness import ServerProcess, client_tls_context, make_data_dir, set_config

    with DNSTestServer() as dns:
        dns.add("far.test", "MX", (10, "mx.far.test"))
        dns.add("mx.far.test", "A", "127.0.0.1")
        data = make_data_dir(tmp_path / "data", listeners=("smtp", "submissions", "imaps"))
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        # the remote MX is unreachable (port 9): the submitted message stays in the queue
        set_config(data.path, "mta", {"allow_loopback_mx": True, "port": 9})
        server = ServerProcess(data).start()
        try:
            host, port = data.addr("smtp")
            with smtplib.SMTP(host, port, timeout=30) as s:
                s.starttls(context=client_tls_context())
                s.sendmail("x@far.test", [ALICE], message(MARKERS["header"], MARKERS["spooled"]))
            host, port = data.addr("submissions")
            with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
                s.login(ALICE, data.passwords[ALICE])
                raw = f"From: {ALICE}\r\nSubject: {MARKERS['utf8']}\r\n\r\n{MARKERS['body']}\r\n"
                s.sendmail(ALICE, ["someone@far.test", "bob@example.test"], raw.encode())
            host, port = data.addr("imaps")
            imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context())
            imap.login(ALICE, data.passwords[ALICE])
            assert imap.create(f"Work/{MARKERS['folder']}")[0] == "OK"
            flags = f"({MARKERS['keyword']})"
            assert imap.append("INBOX", flags, None, message("x", MARKERS["body"]))[0] == "OK"
            imap.select("INBOX")
            assert imap.search(None, "TEXT", MARKERS["spooled"])[1] == [b"1"]
            hits = scan(data.path)  # while everything is open
            imap.logout()
        finally:
            server.stop()
    assert not hits, hits
    hits = scan(data.path)
    assert not hits, hits
    app = data.app()
    try:
        from postvern.mta import QUEUE_FILE, QueueStore, admin

        with QueueStore.open(app.settings.path(QUEUE_FILE), app.server_key.derive("queue")) as q:
            queued = admin.list_entries(q)
    finally:
        app.close()
    assert len(queued) == 1  # the remote copy really is in the (encrypted) queue
    log = "\n".join(server.output)
    for secret in [*MARKERS.values(), *data.passwords.values()]:
        assert secret not in log


def test_server_process_cannot_dump_core(data_dir: DataDir) -> None:
    """Keys and messages in the server's memory never reach a core file."""
    from harness import ServerProcess

    server = ServerProcess(data_dir).start()
    try:
        assert server.proc is not None
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
    finally:
        server.stop()
