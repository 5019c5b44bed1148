"""The content filter at SMTP time on the real MX: viruses, dangerous attachments, spam.

The server runs with a real clamd (tests/clamd.py) and a loopback DNS server; a refused
message gets its 5xx/4xx at the end of DATA, an accepted one carries an X-Postvern-Spam
field with score and reasons and lands in INBOX or Junk.
"""

from __future__ import annotations

import base64
import io
import smtplib
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from clamd import EICAR, ClamdServer
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
CAROL = "carol@lenient.test"


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory, clamd: ClamdServer) -> Iterator[DataDir]:
    with DNSTestServer() as dns:
        dns.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        dns.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=none")
        data = make_data_dir(tmp_path_factory.mktemp("mxf") / "data")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        set_config(data.path, "filters", {"clamd": clamd.unix_address})
        app = data.app()
        try:  # a second domain that files dangerous attachments as junk instead
            app.directory.add_domain("lenient.test")
            app.directory.set_attachment_policy("lenient.test", "quarantine")
            app.accounts.create_user(CAROL, "carol-password-123")
            data.passwords[CAROL] = "carol-password-123"
        finally:
            app.close()
        with ServerProcess(data):
            yield data


def mail(subject: str, body: str, attachment: tuple[str, bytes] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sender <someone@sender.test>"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg.set_content(body)
    if attachment:
        name, data = attachment
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def send(data: DataDir, raw: bytes, rcpts: tuple[str, ...] = (ALICE,)) -> tuple[int, bytes]:
    host, port = data.addr("smtp")
    with smtplib.SMTP(host, port, timeout=60) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("mail.sender.test")
        s.mail("someone@sender.test")
        for rcpt in rcpts:
            s.rcpt(rcpt)
        return s.data(raw)


def zipped(name: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, content)
    return buf.getvalue()


PE = b"MZ" + b"\x90" * 58 + (64).to_bytes(4, "little") + b"PE\0\0" + b"\0" * 200


@pytest.mark.parametrize(
    "name, attachment, expect",
    [
        ("eicar plain", ("eicar.com", EICAR), b"virus"),
        ("eicar zipped", ("docs.zip", zipped("eicar.txt", EICAR)), b"virus"),
        ("exe renamed pdf", ("invoice.pdf", PE), b"dangerous attachment"),
    ],
)
def test_refused_at_data(mx: DataDir, name: str, attachment: tuple[str, bytes], expect: bytes):
    code, text = send(mx, mail(name, "Please see the attachment.", attachment))
    assert code == 554 and text.startswith(b"5.7.1"), (code, text)
    assert expect in text


def test_eicar_split_across_base64_lines(mx: DataDir) -> None:
    encoded = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")  # 76-column lines
    raw = (
        b"From: someone@sender.test\r\nTo: alice@example.test\r\nSubject: split\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b--\r\n"
    )
    code, text = send(mx, raw)
    assert code == 554 and b"virus" in text


def test_clean_mail_is_labelled(mx: DataDir) -> None:
    body = "Hi Alice,\n\nthe minutes of Tuesday's meeting are below. Talk soon.\n"
    code, _ = send(mx, mail("minutes", body))
    assert code == 250
    (got,) = [m for m in mailbox_messages(mx, ALICE, None) if b"Subject: minutes" in m]
    assert b"X-Postvern-Spam: " in got and b"score=" in got


def test_forged_verdict_header_is_replaced(mx: DataDir) -> None:
    raw = mail("forged verdict", "Nothing to see.\n").replace(
        b"Subject:", b"X-Postvern-Spam: no score=-100 (trust me)\r\nSubject:", 1
    )
    assert send(mx, raw)[0] == 250
    (got,) = [m for m in mailbox_messages(mx, ALICE, None) if b"forged verdict" in m]
    assert b"trust me" not in got
    assert got.count(b"X-Postvern-Spam:") == 1


def test_clamd_down_means_451(tmp_path: Path) -> None:
    with DNSTestServer() as dns:
        data = make_data_dir(tmp_path / "data")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        set_config(data.path, "filters", {"clamd": f"unix:{tmp_path}/no-such.sock"})
        with ServerProcess(data):
            code, text = send(data, mail("unscanned", "hello"))
    assert code == 451 and text.startswith(b"4.7.0")


def test_attachment_policy_per_domain(mx: DataDir) -> None:
    quarantined = mail("exe for carol", "See attached.", ("invoice.pdf", PE))
    code, _ = send(mx, quarantined, (CAROL,))
    assert code == 250
    (got,) = [m for m in mailbox_messages(mx, CAROL, "Junk") if b"exe for carol" in m]
    assert b"action=junk" in got and b"ATTACHMENT" in got.upper()
    # one reply covers every recipient: if one domain rejects, the message is rejected
    code, _ = send(mx, mail("exe for both", "See attached.", ("x.pdf", PE)), (CAROL, ALICE))
    assert code == 554
