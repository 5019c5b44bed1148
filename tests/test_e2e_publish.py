"""Publishing users' keys (issue #17): WKD on the HTTPS listener, Autocrypt on submission.

One running server for the module, its certificate issued by a test CA for the names WKD
uses. gpg itself finds the key by WKD: its dirmngr is pointed at the loopback listener
through an HTTP CONNECT proxy (dirmngr's ``http-proxy``) and trusts the test CA through a
private mount namespace in which the system CA file is the test CA (the host's files are not
touched); where namespaces are not allowed that test is skipped and the same URLs are checked
with the hash gpg computes (``--with-wkd-hash``) and the key gpg imports.
"""

from __future__ import annotations

import base64
import http.client
import imaplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e_kit import Gpg, parse, postvern
from harness import DataDir, ServerProcess, client_tls_context, make_data_dir, set_config
from mta_kit import TestCA

DOMAIN = "example.test"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PASSWORDS = {ALICE: "alice-pass-phrase", BOB: "bob-pass-phrase"}
# A second identity on alice's key: WKD and Autocrypt hand out only the asked-for address.
ALICE_ELSEWHERE = "alice@elsewhere.test"
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass
class Site:
    data: DataDir
    gpg: Gpg
    ca: TestCA
    tmp: Path
    alice_fpr: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("publish")
    gpg = Gpg(tmp / "gnupg")
    fpr = gpg.new_key(f"Alice <{ALICE}>", "ed25519", "cv25519")
    gpg.run("--quick-add-uid", fpr, f"Alice <{ALICE_ELSEWHERE}>")
    data = make_data_dir(
        tmp / "data", passwords=PASSWORDS, listeners=("submission", "imap", "https")
    )
    ca = TestCA(tmp)
    cert, key = ca.issue(f"mx.{DOMAIN}", DOMAIN, f"openpgpkey.{DOMAIN}")
    set_config(data.path, "tls", {"cert": str(cert), "key": str(key)})
    (tmp / "alice.pgp").write_bytes(gpg.export(ALICE))
    imported = postvern(data.path, "user", "key", "import", ALICE, str(tmp / "alice.pgp"),
                        "--publish")  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    server = ServerProcess(data).start()
    try:
        yield Site(data, gpg, ca, tmp, fpr)
    finally:
        server.stop()
        gpg.stop()


def _get(site: Site, host: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    h, port = site.data.addr("https")
    ctx = ssl.create_default_context(cafile=str(site.ca.path))
    ctx.check_hostname = False  # the Host header names the site; the socket is loopback
    conn = http.client.HTTPSConnection(h, port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def _wkd_hash(gpg: Gpg, address: str) -> str:
    """The z-base-32 local-part hash as gpg computes it (``--with-wkd-hash``)."""
    out = gpg.run("--with-wkd-hash", "--list-keys", address).decode()
    for line in out.splitlines():
        line = line.strip()
        if line.endswith(f"@{DOMAIN}") and "<" not in line:
            return line.partition("@")[0]
    raise AssertionError(out)


def _shown(gpg: Gpg, key: bytes) -> tuple[str, list[str]]:
    """(fingerprint, user IDs) of a key as gpg reads it, without importing it."""
    out = gpg.run("--with-colons", "--import-options", "show-only", "--import", input=key)
    lines = out.decode().splitlines()
    fpr = next(x.split(":")[9] for x in lines if x.startswith("fpr"))
    return fpr, [x.split(":")[9] for x in lines if x.startswith("uid")]


def test_wkd_advanced_and_direct_serve_the_published_key(site: Site) -> None:
    hashed = _wkd_hash(site.gpg, ALICE)
    for host, path in (
        (f"openpgpkey.{DOMAIN}", f"/.well-known/openpgpkey/{DOMAIN}/hu/{hashed}?l=alice"),
        (DOMAIN, f"/.well-known/openpgpkey/hu/{hashed}?l=alice"),
    ):
        status, body, headers = _get(site, host, path)
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        assert headers["Access-Control-Allow-Origin"] == "*"
        fpr, uids = _shown(site.gpg, body)
        assert fpr == site.alice_fpr
        assert uids == [f"Alice <{ALICE}>"]  # not the identity at elsewhere.test
    for host, path in (
        (f"openpgpkey.{DOMAIN}", f"/.well-known/openpgpkey/{DOMAIN}/policy"),
        (DOMAIN, "/.well-known/openpgpkey/policy"),
    ):
        assert _get(site, host, path)[0] == 200


def test_wkd_answers_404_for_what_is_not_published(site: Site) -> None:
    bob = _wkd_hash_of(site, "bob")
    assert _get(site, DOMAIN, f"/.well-known/openpgpkey/hu/{bob}")[0] == 404
    alice = _wkd_hash(site.gpg, ALICE)
    # another domain, a host that does not match the path, a malformed hash
    assert (
        _get(site, "openpgpkey.other.test", f"/.well-known/openpgpkey/other.test/hu/{alice}")[0]
        == 404
    )
    assert _get(site, DOMAIN, f"/.well-known/openpgpkey/{DOMAIN}/hu/{alice}")[0] == 404
    assert _get(site, DOMAIN, "/.well-known/openpgpkey/hu/not-a-hash")[0] == 404


def _wkd_hash_of(site: Site, local: str) -> str:
    from postvern.e2e.wkd import local_hash

    return local_hash(local)


@dataclass
class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that takes every tunnel to one address."""

    target: tuple[str, int]
    requested: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requested.append(head.split(b"\r\n", 1)[0])
            with socket.create_connection(self.target, timeout=30) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                back.start()
                _pipe(client, upstream)
                back.join(30)

    def close(self) -> None:
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="no private mount namespace here")
def test_gpg_locates_the_key_by_wkd(site: Site) -> None:
    proxy = ConnectProxy(site.data.addr("https"))
    seeker = Gpg(site.tmp / "seeker")  # someone who has never seen alice's key
    (seeker.home / "dirmngr.conf").write_text(
        f"http-proxy http://127.0.0.1:{proxy.port}\nresolver-timeout 2\n"
    )
    script = (
        f'mount --bind "$1" {SYSTEM_CA_FILE} && exec gpg --batch --auto-key-locate clear,wkd'
        f" --locate-keys {ALICE}"
    )
    try:
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(site.ca.path)],
            env=seeker.env,
            capture_output=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert site.alice_fpr in seeker.run("--with-colons", "--list-keys", ALICE).decode()
        # dirmngr asked for the domain itself over HTTPS: the direct method (no DNS here
        # names openpgpkey.<domain>, so the advanced one is passed over, as the draft says)
        assert any(f"CONNECT {DOMAIN}:443".encode() in r for r in proxy.requested)
    finally:
        subprocess.run(
            ["unshare", "-m", "gpgconf", "--kill", "all"], env=seeker.env, capture_output=True
        )
        seeker.stop()
        proxy.close()


def _submit(site: Site, sender: str, to: str, subject: str) -> None:
    host, port = site.data.addr("submission")
    raw = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@{DOMAIN}>\r\n\r\nhello\r\n"
    )
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.login(sender, PASSWORDS[sender])
        s.sendmail(sender, [to], raw.encode())


def _fetch(site: Site, address: str, subject: str) -> bytes:
    host, port = site.data.addr("imap")
    imap = imaplib.IMAP4(host, port)
    try:
        imap.starttls(client_tls_context())
        imap.login(address, PASSWORDS[address])
        imap.select("INBOX", readonly=True)
        found = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')[1][0].split()
        assert found, subject
        item = imap.uid("FETCH", found[-1].decode(), "(BODY.PEEK[])")[1][0]
        assert isinstance(item, tuple)
        return item[1]
    finally:
        imap.logout()


def test_outgoing_mail_carries_the_autocrypt_header(site: Site) -> None:
    _submit(site, ALICE, BOB, "Autocrypt from alice")
    msg = parse(_fetch(site, BOB, "Autocrypt from alice"))
    fields = msg.get_all("Autocrypt") or []
    assert len(fields) == 1
    attributes = dict(
        a.strip().split("=", 1) for a in " ".join(fields[0].split()).split(";") if "=" in a
    )
    assert attributes["addr"] == ALICE
    key = base64.b64decode(attributes["keydata"].replace(" ", ""))
    fpr, uids = _shown(site.gpg, key)
    assert fpr == site.alice_fpr and uids == [f"Alice <{ALICE}>"]
    assert msg["DKIM-Signature"]  # signed after the header was added
    # bob published nothing: his mail announces no key
    _submit(site, BOB, ALICE, "No key from bob")
    assert parse(_fetch(site, ALICE, "No key from bob")).get_all("Autocrypt") is None


def test_dns_names_the_wkd_host(site: Site) -> None:
    out = postvern(site.data.path, "dns", DOMAIN).stdout
    assert f"openpgpkey.{DOMAIN}.\tIN CNAME mx.{DOMAIN}." in out
