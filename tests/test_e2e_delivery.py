"""Incoming mail encrypted to the user's own key (issue #17), proven with the reference tools.

One running server for the module. Users and their clients:

* alice — a Curve25519 OpenPGP key made by gpg; the outer Subject hidden ("[...]")
* bob — an RSA-3072 OpenPGP key made by gpg; the Subject kept
* carol — an RSA S/MIME certificate (RSA-OAEP key transport); openssl decrypts
* erin — a P-256 S/MIME certificate (ECDH key agreement); openssl decrypts
* dave — no key: mail is stored as it came

Mail goes in through the MX (smtplib), comes out through IMAP (imaplib) and is opened by gpg or
``openssl cms -decrypt``, never by our own code; the decrypted entity's MIME tree and header
fields must equal what was sent.
"""

from __future__ import annotations

import imaplib
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from e2e_kit import Gpg, mime_tree, parse, postvern, sent_fields, smime_identity
from harness import DataDir, ServerProcess, client_tls_context, make_data_dir, set_config

DOMAIN = "example.test"
ALICE, BOB, CAROL, DAVE, ERIN = (f"{n}@{DOMAIN}" for n in ("alice", "bob", "carol", "dave", "erin"))
PASSWORDS = {a: f"{a.partition('@')[0]}-pass-phrase" for a in (ALICE, BOB, CAROL, DAVE, ERIN)}
SENDER = "sender@far.test"


@dataclass
class World:
    data: DataDir
    gpg: Gpg
    smime: dict[str, tuple[Path, Path]]  # address → (certificate, private key)
    tmp: Path
    counter: int = 0

    def send(self, to: str, raw: bytes) -> None:
        host, port = self.data.addr("smtp")
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.starttls(context=client_tls_context())
            s.sendmail(SENDER, [to], raw)

    def fetch(self, address: str, message_id: str) -> bytes:
        host, port = self.data.addr("imap")
        imap = imaplib.IMAP4(host, port)
        try:
            imap.starttls(client_tls_context())
            imap.login(address, PASSWORDS[address])
            imap.select("INBOX", readonly=True)
            typ, found = imap.uid("SEARCH", "HEADER", "Message-ID", message_id)
            assert typ == "OK" and found[0], f"{message_id} not in {address}'s INBOX"
            uid = found[0].split()[-1].decode()
            typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            assert typ == "OK"
            item = data[0]
            assert isinstance(item, tuple)
            return item[1]
        finally:
            imap.logout()

    def message(
        self, to: str, subject: str, body: bytes, *, head: bytes = b""
    ) -> tuple[str, bytes]:
        self.counter += 1
        mid = f"<e2e-{self.counter}@far.test>"
        raw = (
            f"From: Sender <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: {mid}\r\n"
        ).encode() + head
        return mid, raw + b"\r\n" + body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e")
    gpg = Gpg(tmp / "gnupg")  # the users' mail clients: they hold the private keys
    gpg.new_key(f"Alice <{ALICE}>", "ed25519", "cv25519")
    gpg.new_key(f"Bob <{BOB}>", "rsa3072", "rsa3072")
    gpg.new_key(f"Sender <{SENDER}>", "ed25519", "cv25519")
    smime = {
        CAROL: smime_identity(tmp, CAROL),
        ERIN: smime_identity(tmp, ERIN, kind="ec", key_usage="keyAgreement"),
    }
    with DNSTestServer() as dns:
        data = make_data_dir(tmp / "data", passwords=PASSWORDS, listeners=("smtp", "imap"))
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        for address, key in ((ALICE, tmp / "alice.pgp"), (BOB, tmp / "bob.pgp")):
            key.write_bytes(gpg.export(address))
            assert postvern(data.path, "user", "key", "import", address, str(key)).returncode == 0
        for address, (cert, _) in smime.items():
            imported = postvern(data.path, "user", "key", "import", address, str(cert))
            assert imported.returncode == 0, imported.stderr
        on = ("user", "key", "encrypt", "on")
        assert postvern(data.path, *on, ALICE, "--subject", "hidden").returncode == 0
        assert postvern(data.path, *on, BOB).returncode == 0
        for address in smime:
            assert postvern(data.path, *on, address, "--format", "smime").returncode == 0
        server = ServerProcess(data).start()
        try:
            yield World(data, gpg, smime, tmp)
        finally:
            server.stop()
            gpg.stop()
        log = "\n".join(server.output)
        assert "secret-body-marker" not in log  # no message text in the logs


def _encrypted_part(stored: bytes) -> bytes:
    msg = parse(stored)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 2
    version, encrypted = parts
    assert isinstance(version, Message) and isinstance(encrypted, Message)
    assert version.get_content_type() == "application/pgp-encrypted"
    assert b"Version: 1" in (version.get_payload(decode=True) or b"")
    payload = encrypted.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.startswith(b"-----BEGIN PGP MESSAGE-----")
    return payload


def _assert_same_message(inner: bytes, sent: bytes) -> None:
    assert mime_tree(inner) == mime_tree(sent)
    assert sent_fields(inner) == sent_fields(sent)
    assert 'hp="cipher"' in (parse(inner).get("Content-Type") or "")


MULTIPART = (
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer"\r\n',
    b"--outer\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nsecret-body-marker: gr\xc3\xbc\xc3\x9fe\r\n"
    b"--outer\r\nContent-Type: application/octet-stream; name=blob.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--outer--\r\n",
)


@pytest.mark.parametrize("user", [ALICE, BOB], ids=["curve25519", "rsa"])
def test_openpgp_mime_decrypts_with_gpg_to_the_original(world: World, user: str) -> None:
    mid, sent = world.message(user, "Quarterly numbers", MULTIPART[1], head=MULTIPART[0])
    world.send(user, sent)
    stored = world.fetch(user, mid)
    assert b"secret-body-marker" not in stored
    inner = world.gpg.run("--decrypt", input=_encrypted_part(stored))
    _assert_same_message(inner, sent)
    outer = parse(stored)
    assert outer["From"] == f"Sender <{SENDER}>" and outer["Message-ID"] == mid
    assert outer["To"] == user and outer["Date"]
    # alice chose to hide the Subject outside (RFC 9788 hcp_baseline); bob kept it.
    assert outer["Subject"] == ("[...]" if user == ALICE else "Quarterly numbers")
    assert parse(inner)["Subject"] == "Quarterly numbers"
    hp_outer = parse(inner).get_all("HP-Outer") or []
    assert f"Subject: {outer['Subject']}" in hp_outer


def test_imap_search_sees_outer_headers_only(world: World) -> None:
    mid, sent = world.message(BOB, "Findable subject", b"unfindable-body-word\r\n")
    world.send(BOB, sent)
    world.fetch(BOB, mid)
    host, port = world.data.addr("imap")
    imap = imaplib.IMAP4(host, port)
    imap.starttls(client_tls_context())
    imap.login(BOB, PASSWORDS[BOB])
    imap.select("INBOX", readonly=True)
    assert imap.search(None, "SUBJECT", '"Findable subject"')[1][0]
    assert imap.search(None, "BODY", "unfindable-body-word")[1] == [b""]
    imap.logout()


@pytest.mark.parametrize(
    ("user", "key_transport"),
    [(CAROL, "rsaesOaep"), (ERIN, "dhSinglePass-stdDH-sha256kdf-scheme")],
    ids=["rsa-oaep", "ecdh"],
)
def test_smime_decrypts_with_openssl_to_the_original(
    world: World, user: str, key_transport: str
) -> None:
    mid, sent = world.message(user, "Contract", MULTIPART[1], head=MULTIPART[0])
    world.send(user, sent)
    stored = world.fetch(user, mid)
    assert b"secret-body-marker" not in stored
    msg = parse(stored)
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert msg.get_param("smime-type") == "enveloped-data"
    path = world.tmp / f"{user}.eml"
    path.write_bytes(stored)
    cert, key = world.smime[user]
    inner = subprocess.run(
        ["openssl", "cms", "-decrypt", "-in", str(path), "-recip", str(cert),
         "-inkey", str(key), "-binary"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    _assert_same_message(inner, sent)
    cms = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-in", str(path)],
        capture_output=True, check=True, timeout=60, text=True,
    ).stdout  # fmt: skip
    assert "aes-256-cbc" in cms and key_transport in cms


def test_already_encrypted_mail_is_stored_as_it_came(world: World) -> None:
    # PGP/MIME made by gpg for alice (RFC 3156 §4)
    armored = world.gpg.run("--armor", "--encrypt", "-r", ALICE, input=b"Content-Type: "
                            b"text/plain\r\n\r\nsecret-body-marker\r\n")  # fmt: skip
    armored = armored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    pgp_mime = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; boundary="b";'
        b' protocol="application/pgp-encrypted"\r\n',
        b"--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n\r\n" + armored + b"\r\n--b--\r\n",
    )
    inline = (b"Content-Type: text/plain\r\n", armored)
    smime_der = subprocess.run(
        ["openssl", "cms", "-encrypt", "-aes256", "-outform", "SMIME", str(world.smime[CAROL][0])],
        input=b"Content-Type: text/plain\r\n\r\nsecret-body-marker\r\n",
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    head, _, body = smime_der.replace(b"\r\n", b"\n").partition(b"\n\n")
    smime = (head.replace(b"\n", b"\r\n") + b"\r\n", body.replace(b"\n", b"\r\n"))
    for to, (head_fields, content) in ((ALICE, pgp_mime), (BOB, inline), (CAROL, smime)):
        mid, sent = world.message(to, "Already sealed", content, head=head_fields)
        world.send(to, sent)
        stored = world.fetch(to, mid)
        assert stored.endswith(sent), f"re-wrapped for {to}"  # only trace fields added
        assert b"HP-Outer" not in stored


def test_signed_only_mail_is_wrapped_whole_and_still_verifies(world: World) -> None:
    signed_part = (
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        b"secret-body-marker: signed by the sender\r\n"
    )
    signature = world.gpg.run("--armor", "--detach-sign", "-u", SENDER, input=signed_part)
    body = (
        b"--sig\r\n" + signed_part + b"\r\n--sig\r\n"
        b"Content-Type: application/pgp-signature; name=signature.asc\r\n\r\n"
        + signature.replace(b"\n", b"\r\n") + b"\r\n--sig--\r\n"
    )  # fmt: skip
    head = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; micalg=pgp-sha256;"
        b' protocol="application/pgp-signature"; boundary="sig"\r\n'
    )
    mid, sent = world.message(ALICE, "Signed", body, head=head)
    world.send(ALICE, sent)
    stored = world.fetch(ALICE, mid)
    assert parse(stored).get_content_type() == "multipart/encrypted"
    inner = world.gpg.run("--decrypt", input=_encrypted_part(stored))
    _assert_same_message(inner, sent)
    # RFC 3156 §5: the signed data is the first part exactly as it stands between the
    # boundaries (the CRLF before the next boundary belongs to the boundary).
    first = inner.index(b"--sig\r\n") + len(b"--sig\r\n")
    data = inner[first : inner.index(b"\r\n--sig\r\n", first)]
    assert data == signed_part
    (world.tmp / "data.txt").write_bytes(data)
    sig = parse(inner).get_payload()[1].get_payload(decode=True)  # type: ignore[index, union-attr]
    (world.tmp / "data.sig").write_bytes(sig)
    world.gpg.run("--verify", str(world.tmp / "data.sig"), str(world.tmp / "data.txt"))


def test_user_without_a_key_gets_plain_mail(world: World) -> None:
    mid, sent = world.message(DAVE, "Plain", b"secret-body-marker plain\r\n")
    world.send(DAVE, sent)
    assert world.fetch(DAVE, mid).endswith(sent)


def test_encrypt_off_stores_plain_again(world: World) -> None:
    data = world.data.path
    assert postvern(data, "user", "key", "encrypt", "off", BOB).returncode == 0
    try:
        mid, sent = world.message(BOB, "Off again", b"secret-body-marker off\r\n")
        world.send(BOB, sent)
        assert world.fetch(BOB, mid).endswith(sent)
    finally:
        assert postvern(data, "user", "key", "encrypt", "on", BOB).returncode == 0
