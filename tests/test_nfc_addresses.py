"""Non-ASCII local parts are one address in either Unicode spelling (RFC 6532 §3.1).

``josé`` typed on a Mac arrives decomposed (NFD: ``e`` + U+0301); elsewhere it is composed
(NFC: U+00E9). A user created in one spelling receives mail sent over SMTPUTF8 to the other
and logs in with either, over IMAP and SMTP AUTH.
"""

from __future__ import annotations

import base64
import imaplib
import smtplib
import unicodedata
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from harness import DataDir, ServerProcess, client_tls_context, make_data_dir, set_config
from postvern.directory.addresses import normalise_address

NFC = "jos\u00e9@example.test"
NFD = "jose\u0301@example.test"
PASSWORD = "jose-long-password"


def test_the_spellings_differ_and_normalise_to_one() -> None:
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
    assert normalise_address(NFD) == normalise_address(NFC) == NFC
    assert normalise_address("JOSE\u0301@Example.TEST") == NFC


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    with DNSTestServer() as dns:
        dns.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        path: Path = tmp_path_factory.mktemp("nfc") / "data"
        data = make_data_dir(path, passwords={NFC: PASSWORD})
        set_config(path, "dns", {"nameservers": [dns.nameserver]})
        with ServerProcess(data):
            yield data


def plain(user: str, password: str) -> bytes:
    """SASL PLAIN (RFC 4616): UTF-8 throughout."""
    return b"\0" + user.encode() + b"\0" + password.encode()


def imap_inbox_subjects(data: DataDir, user: str) -> list[bytes]:
    with imaplib.IMAP4_SSL(*data.addr("imaps"), ssl_context=client_tls_context()) as imap:
        assert imap.authenticate("PLAIN", lambda _: plain(user, PASSWORD))[0] == "OK"
        imap.select("INBOX")
        _, found = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].strip() for part in found if isinstance(part, tuple)]


def test_smtputf8_to_the_decomposed_spelling_reaches_the_user(server: DataDir) -> None:
    msg = EmailMessage()
    msg["From"] = "someone@sender.test"
    msg["To"] = NFD
    msg["Subject"] = "to the NFD spelling"
    msg.set_content("Hola.")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n", utf8=True))
    with smtplib.SMTP(*server.addr("smtp"), timeout=60) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("mail.sender.test")
        assert s.has_extn("smtputf8")
        refused = s.sendmail("someone@sender.test", [NFD], raw, mail_options=["SMTPUTF8"])
        assert refused == {}
    # Logging in with either spelling opens the one mailbox, which has the message.
    for spelling in (NFD, NFC):
        assert imap_inbox_subjects(server, spelling) == [b"Subject: to the NFD spelling"]


def test_smtp_auth_with_either_spelling(server: DataDir) -> None:
    for spelling in (NFD, NFC):
        with smtplib.SMTP_SSL(
            *server.addr("submissions"), context=client_tls_context(), timeout=60
        ) as s:
            s.ehlo("client.test")
            token = base64.b64encode(plain(spelling, PASSWORD)).decode()
            code, text = s.docmd("AUTH", f"PLAIN {token}")
            assert code == 235, (spelling, code, text)
