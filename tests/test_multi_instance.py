"""Three Postvern instances on loopback, as three organisations on the internet would be.

A (a.test), B (b.test) and C (c.test) each have their own data directory, domain, ports and
keys; a loopback DNS server serves their MX, SPF, DKIM, DMARC and MTA-STS records. A test CA
signs B's certificate so that A can validate it. Each instance's MTA is pointed at the next
one's SMTP port (``[mta] port``), as port 25 would be on the internet:

    A ──submission──► A's queue ──SMTP──► B ──alias forward (SRS, ARC, DKIM)──► C
"""

from __future__ import annotations

import datetime
import email
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from postvern.emailauth import dkim
from postvern.web import mtasts

ALICE, BOB, CAROL = "alice@a.test", "bob@b.test", "carol@c.test"
PASSWORD = "correct-horse-battery"
WAIT = 60.0

MAIL_DKIM_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0]);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
local $/; my $msg = <STDIN>; $msg =~ s/\r?\n/\r\n/g;
$dkim->PRINT($msg); $dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    print $sig->domain, " ", $sig->algorithm, " ", $sig->result, "\n";
}
"""


@dataclass
class CA:
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey
    name: x509.Name

    def issue(self, names: list[str], directory: Path) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / "issued-cert.pem", directory / "issued-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


def make_ca() -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Postvern Test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    return CA(cert.public_bytes(serialization.Encoding.PEM), key, name)


@dataclass
class World:
    dns: DNSTestServer
    ca_file: Path
    a: DataDir
    b: DataDir
    c: DataDir
    servers: dict[str, ServerProcess]

    def restart(self, name: str) -> None:
        self.servers[name].stop()
        self.servers[name] = ServerProcess(getattr(self, name)).start()


def instance(root: Path, name: str, user: str, listeners: tuple[str, ...]) -> DataDir:
    return make_data_dir(
        root / name,
        domain=f"{name}.test",
        hostname=f"mx.{name}.test",
        passwords={user: PASSWORD},
        listeners=listeners,
    )


def publish(dns: DNSTestServer, data: DataDir) -> None:
    domain = data.domain
    dns.set(domain, "MX", (10, f"mx.{domain}"))
    dns.set(f"mx.{domain}", "A", "127.0.0.1")
    dns.set(domain, "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns.set(f"_dmarc.{domain}", "TXT", "v=DMARC1; p=reject")
    app = data.app()
    try:
        for key in app.directory.dkim_keys(domain):
            dns.set(f"{key.selector}._domainkey.{domain}", "TXT", dkim.key_record(key.private_key))
    finally:
        app.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    ca = make_ca()
    ca_file = root / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    with DNSTestServer() as dns:
        a = instance(root, "a", ALICE, ("smtp", "submissions"))
        b = instance(root, "b", BOB, ("smtp", "https"))
        c = instance(root, "c", CAROL, ("smtp",))
        for data in (a, b, c):
            publish(dns, data)
            set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        # B: a certificate from the test CA for its MX and its MTA-STS policy host, an
        # enforce policy, and an alias that forwards to C.
        cert, key = ca.issue(["mx.b.test", "mta-sts.b.test"], b.path)
        set_config(b.path, "tls", {"cert": str(cert), "key": str(key)})
        policy = mtasts.policy_text(["mx.b.test"], "enforce", max_age=86400)
        dns.set("_mta-sts.b.test", "TXT", f"v=STSv1; id={mtasts.policy_id(policy)}")
        dns.set("mta-sts.b.test", "A", "127.0.0.1")
        set_config(
            b.path,
            "mta",
            {
                "sts_mode": "enforce",
                "allow_loopback_mx": True,
                "port": c.addr("smtp")[1],
                "retry_base": 1.0,
            },
        )
        app = b.app()
        try:
            app.directory.add_alias("fwd@b.test", [CAROL])
        finally:
            app.close()
        # A validates against the test CA, fetches MTA-STS policies from B's HTTPS port.
        set_config(a.path, "tls", {"ca_bundle": str(ca_file)})
        set_config(
            a.path,
            "mta",
            {
                "allow_loopback_mx": True,
                "port": b.addr("smtp")[1],
                "sts_policy_port": b.addr("https")[1],
                "retry_base": 1.0,
            },
        )
        # C trusts B's ARC seals (RFC 7489 §6.7 local policy).
        set_config(c.path, "emailauth", {"arc_trusted_domains": ["b.test"]})
        servers = {n: ServerProcess(d).start() for n, d in (("a", a), ("b", b), ("c", c))}
        w = World(dns, ca_file, a, b, c, servers)
        try:
            yield w
        finally:
            for server in w.servers.values():
                server.stop()


def wait_for(data: DataDir, address: str, predicate: Callable[[bytes], bool]) -> bytes:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for raw in mailbox_messages(data, address, None):
            if predicate(raw):
                return raw
        time.sleep(0.3)
    raise AssertionError(f"nothing matching arrived for {address}")


def absent_for(data: DataDir, address: str, marker: bytes, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not any(marker in m for m in mailbox_messages(data, address, None))
        time.sleep(0.5)


def submit(world: World, subject: str, to: str = BOB) -> None:
    host, port = world.a.addr("submissions")
    raw = f"From: Alice <{ALICE}>\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello from A.\r\n"
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, [to], raw.encode())


def field(raw: bytes, name: str) -> str:
    msg = email.message_from_bytes(raw)
    return " ".join(" ".join(str(v).split()) for v in msg.get_all(name, []))


def test_a_to_b_passes_spf_dkim_dmarc_and_mail_dkim_agrees(world: World) -> None:
    submit(world, "hello b")
    got = wait_for(world.b, BOB, lambda m: b"Subject: hello b" in m)
    ar = field(got, "Authentication-Results")
    assert ar.startswith("mx.b.test;")
    assert "spf=pass" in ar and "smtp.mailfrom=alice@a.test" in ar
    assert ar.count("dkim=pass") == 2 and "header.d=a.test" in ar
    assert "dmarc=pass" in ar and "header.from=a.test" in ar
    # delivered over TLS that A validated against the test CA (MTA-STS enforce)
    assert "(using TLSv1.3" in field(got, "Received") or "(using TLSv1.2" in field(got, "Received")
    # an independent implementation: Perl's Mail::DKIM (Debian 12's has no Ed25519 yet)
    signed = got[got.index(b"DKIM-Signature:") :]
    out = subprocess.run(
        ["perl", "-e", MAIL_DKIM_VERIFY, str(world.dns.port)],
        input=signed, capture_output=True, timeout=60, check=True,
    ).stdout.decode()  # fmt: skip
    assert "a.test rsa-sha256 pass" in out, out


def test_forward_b_to_c_keeps_dmarc_through_arc(world: World) -> None:
    # An outside sender that authenticates with SPF only, under a p=reject policy: after
    # forwarding, SPF checks B (unaligned) and there is no DKIM, so only ARC can save it.
    world.dns.set("spfonly.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    world.dns.set("_dmarc.spfonly.test", "TXT", "v=DMARC1; p=reject")
    host, port = world.b.addr("smtp")
    raw = b"From: Dan <dan@spfonly.test>\r\nTo: fwd@b.test\r\nSubject: via b\r\n\r\nHi.\r\n"
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.sendmail("dan@spfonly.test", ["fwd@b.test"], raw)
    got = wait_for(world.c, CAROL, lambda m: b"Subject: via b" in m)
    ar = field(got, "Authentication-Results")
    assert ar.startswith("mx.c.test;")
    assert "arc=pass" in ar
    # DMARC fails after forwarding; C's trusted-sealer policy accepts it and says why
    assert "dmarc=fail (p=reject dis=none" in ar
    assert "policy override: trusted ARC sealer b.test saw DMARC pass" in ar
    assert "smtp.mailfrom=srs0=" in ar.lower()  # B rewrote the envelope with SRS
    assert "dkim=pass" in ar and "header.d=b.test" in ar  # B signed as the forwarder
    assert "ARC-Seal:" in got.decode(errors="replace")


def test_bounce_of_unknown_user_comes_back_as_dsn(world: World) -> None:
    submit(world, "to nobody", to="nobody@b.test")
    dsn = wait_for(world.a, ALICE, lambda m: b"multipart/report" in m and b"nobody@b.test" in m)
    assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn


def test_mta_sts_mx_not_in_policy_stays_queued(world: World) -> None:
    world.dns.set("b.test", "MX", (10, "mx2.b.test"))
    world.dns.set("mx2.b.test", "A", "127.0.0.1")
    try:
        submit(world, "wrong mx")
        absent_for(world.b, BOB, b"Subject: wrong mx", 6)
    finally:
        world.dns.set("b.test", "MX", (10, "mx.b.test"))
    wait_for(world.b, BOB, lambda m: b"Subject: wrong mx" in m)  # delivered once it is right


def test_mta_sts_invalid_certificate_never_delivers(world: World, tmp_path: Path) -> None:
    submit(world, "warm the policy cache")
    wait_for(world.b, BOB, lambda m: b"warm the policy cache" in m)
    good = world.b.app()
    try:
        tls = good.settings.tls
        cert, key = tls.cert, tls.key
    finally:
        good.close()
    # B now presents a self-signed certificate: A's cached enforce policy must refuse it
    set_config(world.b.path, "tls", {"cert": "tls/cert.pem", "key": "tls/key.pem"})
    world.restart("b")
    try:
        submit(world, "bad certificate")
        absent_for(world.b, BOB, b"Subject: bad certificate", 6)
    finally:
        set_config(world.b.path, "tls", {"cert": cert, "key": key})
        world.restart("b")
    wait_for(world.b, BOB, lambda m: b"Subject: bad certificate" in m)


def test_recipient_down_then_back_and_sigkill_of_sender(world: World) -> None:
    world.servers["b"].stop()
    subjects = [f"while down {i}" for i in range(5)]
    for subject in subjects:
        submit(world, subject)
    time.sleep(1.5)  # at least one attempt fails against the closed port
    world.servers["a"].kill()  # the queue holds them, and A dies without warning
    world.servers["b"] = ServerProcess(world.b).start()
    world.servers["a"] = ServerProcess(world.a).start()
    for subject in subjects:
        wait_for(world.b, BOB, lambda m, s=subject: f"Subject: {s}\r\n".encode() in m)
    time.sleep(2)
    for subject in subjects:
        copies = [m for m in mailbox_messages(world.b, BOB, None) if subject.encode() in m]
        assert len(copies) == 1, subject
