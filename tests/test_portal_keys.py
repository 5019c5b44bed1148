"""The portal's Encryption page over real HTTPS (issue #17): a user uploads their own gpg-made
OpenPGP key or S/MIME certificate, sees it, has refusals explained with e2e's own reasons,
turns encryption of incoming mail on, and mail delivered over SMTP is then stored encrypted
(fetched over IMAP as multipart/encrypted, opened by gpg). Publishing, removing, the SEARCH
sentence and the CSRF token are checked too."""

from __future__ import annotations

import html
import imaplib
import smtplib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import aiohttp
import pytest

from dnsserver import DNSTestServer
from e2e_kit import Gpg, parse, smime_identity
from harness import PASSWORDS, DataDir, ServerProcess, client_tls_context, make_data_dir, set_config
from portal_kit import Browser
from postvern.e2e import smime

ALICE = "alice@example.test"
BOB = "bob@example.test"
SENDER = "sender@far.test"
PAGE = "/account/encryption"


@dataclass
class World:
    data: DataDir
    gpg: Gpg
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("portal-keys")
    gpg = Gpg(tmp / "gnupg")  # alice's mail client: it alone holds her private key
    gpg.new_key(f"Alice <{ALICE}>", "ed25519", "cv25519")
    with DNSTestServer() as dns:
        data = make_data_dir(tmp / "data", listeners=("https", "smtp", "imap"))
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        try:
            with ServerProcess(data):
                yield World(data, gpg, tmp)
        finally:
            gpg.stop()


@pytest.fixture
async def browser(world: World) -> AsyncIterator[Browser]:
    b = Browser(world.data)
    yield b
    await b.close()


async def upload(
    b: Browser,
    *,
    file: bytes | None = None,
    pasted: str = "",
    publish: bool = False,
    csrf: str | None = None,
) -> aiohttp.ClientResponse:
    """The upload form as a browser sends it: multipart/form-data."""
    form = aiohttp.FormData()
    form.add_field("csrf", b.csrf if csrf is None else csrf)
    form.add_field("file", file or b"", filename="key.asc", content_type="application/pgp-keys")
    form.add_field("key", pasted)
    form.add_field("format", "")
    if publish:
        form.add_field("publish", "on")
    r = await b.http.post(b.base + PAGE, data=form, headers={"Origin": b.base})
    return await b._read(r)


def send(data: DataDir, to: str, subject: str, body: str) -> str:
    mid = f"<portal-keys-{subject.replace(' ', '-')}@far.test>"
    raw = (
        f"From: Sender <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: {mid}\r\n\r\n{body}\r\n"
    ).encode()
    host, port = data.addr("smtp")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.sendmail(SENDER, [to], raw)
    return mid


def fetch(data: DataDir, address: str, mid: str) -> bytes:
    host, port = data.addr("imap")
    imap = imaplib.IMAP4(host, port)
    try:
        imap.starttls(client_tls_context())
        imap.login(address, PASSWORDS[address])
        imap.select("INBOX", readonly=True)
        typ, found = imap.uid("SEARCH", "HEADER", "Message-ID", mid)
        assert typ == "OK" and found[0], f"{mid} not in {address}'s INBOX"
        typ, fetched = imap.uid("FETCH", found[0].split()[-1].decode(), "(BODY.PEEK[])")
        item = fetched[0]
        assert typ == "OK" and isinstance(item, tuple)
        return item[1]
    finally:
        imap.logout()


async def test_page_nav_and_search_sentence(browser: Browser) -> None:
    await browser.login(BOB, PASSWORDS[BOB])
    r = await browser.get(PAGE)
    assert r.status == 200
    assert 'href="/account/encryption" aria-current="page"' in browser.last
    assert "data-no-keys" in browser.last
    assert "IMAP SEARCH on encrypted messages sees only their outer headers" in browser.last
    assert "<script>" not in browser.last and "style=" not in browser.last
    await browser.get("/account/")
    assert 'href="/account/encryption"' in browser.last  # the nav link on every page


async def test_csrf_token_required(browser: Browser) -> None:
    await browser.login(BOB, PASSWORDS[BOB])
    await browser.get(PAGE)
    for path in (f"{PAGE}/encrypt", f"{PAGE}/publish", f"{PAGE}/remove"):
        r = await browser.post(path, {"state": "off", "format": "openpgp", "csrf": "forged"})
        assert r.status == 403, path
    await browser.get(PAGE)
    r = await upload(browser, pasted="x", csrf="forged")
    assert r.status == 403
    r = await browser.post(f"{PAGE}/encrypt", {"state": "off"}, origin="https://evil.example")
    assert r.status == 403


async def test_refused_keys_show_the_reason(world: World, browser: Browser) -> None:
    await browser.login(BOB, PASSWORDS[BOB])
    await browser.get(PAGE)
    cert, key = smime_identity(world.tmp, BOB, kind="rsa1024")
    with pytest.raises(smime.CertificateRefused) as refused:
        smime.check_certificate(cert.read_bytes())  # the reason the CLI prints too
    assert "1024" in str(refused.value)
    r = await upload(browser, pasted=cert.read_text())
    assert r.status == 400
    assert f"Key refused: {html.escape(str(refused.value))}" in browser.last
    # A private key is refused as such, never stored.
    r = await upload(browser, file=key.read_bytes())
    assert r.status == 400 and "private key" in browser.last
    r = await upload(browser, pasted="not a key at all")
    assert r.status == 400 and "this is not an OpenPGP public key" in browser.last
    r = await upload(browser)
    assert r.status == 400 and "paste the key" in browser.last
    await browser.get(PAGE)
    assert "data-no-keys" in browser.last
    # Encryption cannot be turned on without a key; the store's reason is shown.
    r = await browser.post(f"{PAGE}/encrypt", {"state": "on", "format": "openpgp"})
    assert r.status == 400 and "import one first" in browser.last


async def test_upload_encrypt_deliver_publish_remove(world: World, browser: Browser) -> None:
    await browser.login(ALICE, PASSWORDS[ALICE])
    await browser.get(PAGE)
    r = await upload(browser, file=world.gpg.export(ALICE))
    assert r.status == 200 and str(r.url).endswith(PAGE)
    fingerprint = world.gpg.fingerprint(ALICE)
    assert f"Your OpenPGP key {fingerprint} is stored." in browser.last
    assert f"<code data-fingerprint>{fingerprint}</code>" in browser.last
    assert html.escape(f"Alice <{ALICE}>") in browser.last
    assert "data-published>no<" in browser.last

    r = await browser.post(
        f"{PAGE}/encrypt", {"state": "on", "format": "openpgp", "subject": "hidden"}
    )
    assert r.status == 200
    assert "Now: on, to your OpenPGP key" in browser.last and "[...]" in browser.last

    mid = send(world.data, ALICE, "Quarterly numbers", "portal-secret-marker")
    stored = fetch(world.data, ALICE, mid)
    assert b"portal-secret-marker" not in stored
    outer = parse(stored)
    assert outer.get_content_type() == "multipart/encrypted"
    assert outer["Subject"] == "[...]" and outer["Message-ID"] == mid
    parts = outer.get_payload()
    assert isinstance(parts, list) and isinstance(parts[1], Message)
    inner = world.gpg.run("--decrypt", input=parts[1].get_payload(decode=True))
    assert b"portal-secret-marker" in inner and b"Subject: Quarterly numbers" in inner

    await browser.post(f"{PAGE}/publish", {"state": "on"})
    assert "is published" in browser.last and "data-published>yes<" in browser.last
    await browser.post(f"{PAGE}/publish", {"state": "off"})
    assert "data-published>no<" in browser.last

    await browser.post(f"{PAGE}/remove", {"format": "openpgp"})
    assert "Your OpenPGP key is removed." in browser.last and "data-no-keys" in browser.last
    mid = send(world.data, ALICE, "After removal", "plain-again-marker")
    assert b"plain-again-marker" in fetch(world.data, ALICE, mid)


async def test_smime_certificate_pasted_then_encryption_off(world: World) -> None:
    b = Browser(world.data)
    try:
        await b.login(BOB, PASSWORDS[BOB])
        await b.get(PAGE)
        cert, _ = smime_identity(world.tmp, BOB)
        r = await upload(b, pasted=cert.read_text())
        assert r.status == 200 and "Your S/MIME certificate" in b.last
        assert 'data-stored="smime"' in b.last and BOB in b.last
        # Publishing is for OpenPGP keys only, as on the CLI.
        r = await upload(b, pasted=cert.read_text(), publish=True)
        assert r.status == 400 and "publishing is for OpenPGP keys" in b.last
        await b.post(f"{PAGE}/encrypt", {"state": "on", "format": "smime", "subject": "kept"})
        assert "Now: on, to your S/MIME certificate" in b.last
        mid = send(world.data, BOB, "Contract", "smime-secret-marker")
        stored = fetch(world.data, BOB, mid)
        assert parse(stored).get_content_type() == "application/pkcs7-mime"
        assert b"smime-secret-marker" not in stored
        await b.post(f"{PAGE}/encrypt", {"state": "off"})
        assert "stored as it arrives" in b.last and "Now: off" in b.last
        await b.post(f"{PAGE}/remove", {"format": "smime"})
        assert "data-no-keys" in b.last
    finally:
        await b.close()
