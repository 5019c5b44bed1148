"""Helpers of the backup tests: mail put into a data directory through the store's own code."""

from __future__ import annotations

import secrets
from pathlib import Path

from cli_kit import postvern
from harness import DataDir, set_config
from postvern.app import App
from postvern.store.mailbox import INBOX, Mailbox
from postvern.store.spool import SpoolItem


def message(marker: str, body_bytes: int = 0) -> bytes:
    filler = secrets.token_hex(body_bytes // 2) if body_bytes else ""
    return (
        f"From: someone@example.net\r\nTo: alice@example.test\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@example.net>\r\n\r\n{marker}\r\n{filler}\r\n"
    ).encode()


def deposit(data: DataDir, address: str, raw: bytes) -> None:
    """Deliver as the MX does for a locked mailbox: sealed into the spool."""
    app = data.app()
    try:
        user = app.directory.user(address)
        assert user is not None
        app.accounts.spool.deposit(user.id, user.spool_public, SpoolItem(raw))
    finally:
        app.close()


def append(data: DataDir, address: str, raws: list[bytes]) -> None:
    """Store straight into the (unlocked) mailbox, as delivery to a logged-in user does."""
    app = data.app()
    try:
        unlocked = app.accounts.authenticate(address, data.passwords[address])
        with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
            box.append_many(box.folder(INBOX).id, [(raw, (), None) for raw in raws])
    finally:
        app.close()


def user_id(data: DataDir, address: str) -> str:
    app = App.open(data.path)
    try:
        user = app.directory.user(address)
        assert user is not None
        return user.id
    finally:
        app.close()


def configure(data: DataDir, targets: list[str], **values: object) -> None:
    set_config(data.path, "backup", {"targets": targets, **values})


def init_key(data: DataDir, key_file: Path) -> None:
    done = postvern("--data", str(data.path), "backup", "init", "--key-file", str(key_file))
    assert done.returncode == 0, done.stderr


def metrics(data: DataDir) -> dict[str, float]:
    """The server's /metrics (unlabelled samples), as Prometheus would scrape them."""
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    from harness import client_tls_context

    host, port = data.addr("https")
    conn = http.client.HTTPSConnection(host, port, context=client_tls_context(), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }
