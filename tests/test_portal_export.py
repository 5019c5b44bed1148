"""The portal's mbox export of a mailbox with mail in it, over real HTTPS.

Messages are sent over real SMTP (submission, to the user's own address) and some are moved
to other folders over IMAP. The download must parse back with Python's ``mailbox.mbox`` to
exactly the stored messages (mboxrd: ``From `` lines of a body quoted with one more ``>``,
unquoted on reading), each under its folder's name; it must be streamed (chunked, no
Content-Length: the server never holds the whole file), and it needs a login or a fresh
confirmation — here ``[accounts] reauth_minutes = 0``, so every download asks again.
"""

from __future__ import annotations

import email.utils
import imaplib
import mailbox
import re
import smtplib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from harness import (
    PASSWORDS,
    DataDir,
    ServerProcess,
    client_tls_context,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from portal_kit import Browser

ALICE = "alice@example.test"
BODIES = [
    "Plain text.\r\n",
    "From the start of a line: mbox must quote this.\r\nFrom here too.\r\n",
    ">From already quoted once\r\n>>From twice\r\nFrom and once more\r\n",
    "A line with From in the middle\r\n\r\nFrom after a blank line\r\n",
    "Ends without much.\r\n.\r\n..\r\n",
]
MOVED = {1: "Projects", 2: "Projects", 4: "Receipts"}  # message index → folder
_QUOTED = re.compile(rb"^>(>*From )", re.MULTILINE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    data = make_data_dir(
        tmp_path_factory.mktemp("export") / "data",
        passwords={ALICE: PASSWORDS[ALICE]},
        listeners=("https", "submission", "imaps"),
    )
    set_config(data.path, "accounts", {"reauth_minutes": 0})
    with ServerProcess(data):
        send_and_file(data)
        yield data


def send_and_file(data: DataDir) -> None:
    host, port = data.addr("submission")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.login(ALICE, data.passwords[ALICE])
        for n, body in enumerate(BODIES):
            message = (
                f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: export {n}\r\n"
                f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
                f"\r\n{body}"
            )
            s.sendmail(ALICE, [ALICE], message.encode())
    host, port = data.addr("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30) as imap:
        imap.login(ALICE, data.passwords[ALICE])
        for folder in set(MOVED.values()):
            assert imap.create(folder)[0] == "OK"
        imap.select("INBOX")
        for n, folder in MOVED.items():
            typ, found = imap.uid("SEARCH", "SUBJECT", f'"export {n}"')
            assert typ == "OK" and found[0], n
            uid = found[0].split()[0].decode()
            assert imap.uid("COPY", uid, folder)[0] == "OK"
            assert imap.uid("STORE", uid, "+FLAGS", r"(\Deleted)")[0] == "OK"
        imap.expunge()
        imap.logout()


@pytest.fixture
async def browser(server: DataDir) -> AsyncIterator[Browser]:
    b = Browser(server)
    yield b
    await b.close()


def unquote(entry: bytes) -> tuple[str, bytes]:
    """An mbox message as read back: its X-Folder, and the message with mboxrd undone."""
    head, _, rest = entry.partition(b"\n")
    assert head.startswith(b"X-Folder: ")
    return head[len(b"X-Folder: ") :].decode(), _QUOTED.sub(rb"\1", rest)


async def test_export_reads_back_as_the_stored_messages(
    server: DataDir, browser: Browser, tmp_path: Path
) -> None:
    await browser.login(ALICE, server.passwords[ALICE])
    r = await browser.http.get(browser.base + "/account/export.mbox", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/account/confirm?action=export"
    await browser.get("/account/confirm?action=export")
    r = await browser.post("/account/confirm", {"action": "export", "confirm": "wrong-password"})
    assert r.status == 403 and "neither your password" in browser.last

    r = await browser.http.post(
        browser.base + "/account/confirm",
        data={"csrf": browser.csrf, "action": "export", "confirm": server.passwords[ALICE]},
        headers={"Origin": browser.base},
    )
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/mbox")
    # Streamed: chunked transfer coding, no length known in advance (RFC 9112 §7.1).
    assert r.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.headers
    path = tmp_path / "alice.mbox"
    with path.open("wb") as out:
        async for chunk in r.content.iter_chunked(4096):
            out.write(chunk)
    raw = path.read_bytes()
    assert raw.startswith(b"From ")
    assert b"\n>From the start of a line" in raw and b"\n>>From already quoted" in raw

    box = mailbox.mbox(path, create=False)
    try:
        read_back = [unquote(box.get_bytes(key)) for key in box.keys()]
    finally:
        box.close()
    stored = Counter(m.replace(b"\r\n", b"\n") for m in mailbox_messages(server, ALICE, None))
    assert Counter(message for _, message in read_back) == stored
    assert len(read_back) == len(BODIES)
    for folder, message in read_back:
        subject = re.search(rb"^Subject: export (\d)$", message, re.MULTILINE)
        assert subject, message[:200]
        assert folder == MOVED.get(int(subject.group(1)), "INBOX")
    for n, body in enumerate(BODIES):
        assert any(m.endswith(body.replace("\r\n", "\n").encode()) for _, m in read_back), n

    # The confirmation was good for one download; the next asks again.
    r = await browser.http.get(browser.base + "/account/export.mbox", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/account/confirm?action=export"


async def test_export_needs_a_login(server: DataDir, browser: Browser) -> None:
    r = await browser.http.get(browser.base + "/account/export.mbox", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/account/login"
    r = await browser.http.get(browser.base + "/account/confirm?action=export")
    assert str(r.url).endswith("/account/login")


async def test_new_forwarding_target_needs_the_password_again(
    server: DataDir, browser: Browser
) -> None:
    """With no re-authentication window, a stolen session cannot send the mail elsewhere:
    adding a forwarding target needs the password; stopping forwarding does not."""
    await browser.login(ALICE, server.passwords[ALICE])
    await browser.get("/account/forwarding")
    assert 'name="confirm"' in browser.last
    r = await browser.post("/account/forwarding", {"targets": "thief@outside.test"})
    assert r.status == 403 and "Confirm this" in browser.last
    r = await browser.post(
        "/account/forwarding", {"targets": "thief@outside.test", "confirm": "wrong-password"}
    )
    assert r.status == 403 and "neither your password" in browser.last
    await browser.get("/account/forwarding")
    assert "data-forwarding-now" not in browser.last
    r = await browser.post(
        "/account/forwarding",
        {"targets": "me@outside.test", "keep_copy": "on", "confirm": server.passwords[ALICE]},
    )
    assert r.status == 200 and "me@outside.test" in browser.last
    # Keeping the same target (here: changing only the copy setting) and stopping need nothing.
    r = await browser.post("/account/forwarding", {"targets": "me@outside.test"})
    assert r.status == 200 and "no copy is kept here" in browser.last
    r = await browser.post("/account/forwarding", {"action": "stop"})
    assert r.status == 200 and "data-forwarding-now" not in browser.last


async def test_passkey_removal_needs_the_password_again(server: DataDir, browser: Browser) -> None:
    await browser.login(ALICE, server.passwords[ALICE])
    await browser.get("/account/security")
    r = await browser.post("/account/passkeys/remove", {"id": "1"})
    assert r.status == 403 and "Confirm this" in browser.last
    r = await browser.post("/account/passkeys/remove", {"id": "1", "confirm": "wrong"})
    assert r.status == 403 and "neither your password" in browser.last
