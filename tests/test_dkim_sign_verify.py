"""DKIM signing and verification round trips, key record checks, and Mail::DKIM interop."""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable, Iterator

import pytest

from dnsserver import DNSTestServer
from postvern.emailauth import dkim

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Date: Mon, 02 Jun 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"The figures are attached in spirit.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {alg: dkim.generate_private_key(alg) for alg in dkim.ALGORITHMS}


@pytest.fixture(scope="module")
def server(keys: dict[str, bytes]) -> Iterator[DNSTestServer]:
    with DNSTestServer() as dns_server:
        dns_server.add("rsa._domainkey.example.test", "TXT", dkim.key_record(keys["rsa-sha256"]))
        dns_server.add("ed._domainkey.example.test", "TXT", dkim.key_record(keys["ed25519-sha256"]))
        yield dns_server


def signed(keys: dict[str, bytes], message: bytes = MESSAGE) -> bytes:
    """Dual-signed, as the outbound path does: Ed25519 and RSA (RFC 8463 §4)."""
    rsa = dkim.sign(message, "example.test", "rsa", keys["rsa-sha256"], "rsa-sha256")
    ed = dkim.sign(message, "example.test", "ed", keys["ed25519-sha256"], "ed25519-sha256")
    return ed + rsa + message


async def test_dual_signature_verifies(server: DNSTestServer, keys: dict[str, bytes]) -> None:
    message = signed(keys)
    results = await dkim.verify(message, server.resolver())
    assert [(r.status, r.algorithm, r.selector) for r in results] == [
        ("pass", "ed25519-sha256", "ed"),
        ("pass", "rsa-sha256", "rsa"),
    ]
    assert results[1].key_bits == 2048 and results[0].identity == "@example.test"
    header_b = message.split(b"b=")[-1][: dkim.HEADER_B_LENGTH].decode()
    assert results[1].header_b == header_b


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ((b"in spirit.", b"in flesh."), "body hash did not verify"),
        ((b"Quarterly", b"Quarterly (revised)"), "signature did not verify"),
        ((b"From: Alice", b"From: Mallory"), "signature did not verify"),
    ],
)
async def test_tampering_fails(
    server: DNSTestServer, keys: dict[str, bytes], change: tuple[bytes, bytes], reason: str
) -> None:
    message = signed(keys).replace(*change)
    results = await dkim.verify(message, server.resolver())
    assert [(r.status, r.reason) for r in results] == [("fail", reason)] * 2


def _with_rsa_signature(field: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """An RSA DKIM-Signature field (b= last, as dkim.sign writes it) with b= changed."""
    head, sep, value = field.rpartition(b"b=")
    raw = base64.b64decode(re.sub(rb"\s+", b"", value))
    return head + sep + base64.b64encode(change(raw)) + b"\r\n"


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (lambda sig: sig, "pass"),
        (lambda sig: sig[:-1] + bytes([sig[-1] ^ 1]), "fail"),
        # Not as long as the modulus: OpenSSL refuses these outright, dkimpy reads the
        # number and passes the first; the verifier keeps dkimpy's verdicts.
        (lambda sig: b"\0" + sig, "pass"),
        (lambda sig: sig[1:], "fail"),
    ],
)
async def test_rsa_checks_give_dkimpys_verdicts(
    server: DNSTestServer,
    keys: dict[str, bytes],
    change: Callable[[bytes], bytes],
    status: str,
) -> None:
    """rsa-sha256 is checked by OpenSSL (dkim._OpenSSLRSA) with dkimpy's results."""
    rsa_only = dkim.sign(MESSAGE, "example.test", "rsa", keys["rsa-sha256"], "rsa-sha256")
    assert rsa_only.rstrip().rpartition(b";")[2].strip().startswith(b"b=")
    message = _with_rsa_signature(rsa_only, change) + MESSAGE
    results = await dkim.verify(message, server.resolver())
    assert [r.status for r in results] == [status]


async def test_added_from_field_breaks_oversigned_signature(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    message = b"From: Mallory <m@evil.test>\r\n" + signed(keys)
    assert {r.status for r in await dkim.verify(message, server.resolver())} == {"fail"}


async def test_relaxed_canonicalisation_survives_rewrapping(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    message = signed(keys).replace(
        b"Subject: Quarterly figures", b"Subject:  Quarterly\r\n figures"
    )
    message = message.replace(b"in spirit.\r\n", b"in spirit.   \r\n\r\n\r\n")
    assert {r.status for r in await dkim.verify(message, server.resolver())} == {"pass"}


@pytest.mark.parametrize(
    ("record", "status", "reason"),
    [
        (None, "permerror", "no key record"),
        ("v=DKIM1; k=rsa; p=", "permerror", "key revoked (empty p=)"),
        ("v=DKIM2; p=AAAA", "permerror", "key record version is not DKIM1"),
        ("v=DKIM1; k=ed25519; p=", "permerror", "key revoked (empty p=)"),
        ("v=DKIM1; h=sha1; p={p}", "permerror", "key does not allow this hash (h=)"),
        ("v=DKIM1; s=tlsrpt; p={p}", "permerror", "key is not for email (s=)"),
        ("v=DKIM1; k=ed25519; p={p}", "permerror", "key type does not match a="),
        ("v=DKIM1; p=bm90IGEga2V5", "permerror", None),
        ("v=DKIM1; p", "permerror", "key record syntax"),
        ("v=DKIM1; t=y:s; s=email:*; p={p}", "pass", "good signature"),
    ],
)
async def test_key_records(
    keys: dict[str, bytes], record: str | None, status: str, reason: str | None
) -> None:
    good = dkim.key_record(keys["rsa-sha256"]).split("p=")[1]
    message = dkim.sign(MESSAGE, "example.test", "k", keys["rsa-sha256"]) + MESSAGE
    with DNSTestServer() as server:
        if record is not None:
            server.add("k._domainkey.example.test", "TXT", record.format(p=good))
        (result,) = await dkim.verify(message, server.resolver())
    assert result.status == status
    if reason:
        assert result.reason == reason


async def test_key_lookup_failure_is_temperror(keys: dict[str, bytes]) -> None:
    message = dkim.sign(MESSAGE, "example.test", "k", keys["rsa-sha256"]) + MESSAGE
    with DNSTestServer() as server:
        server.fail("k._domainkey.example.test", "TXT")
        (result,) = await dkim.verify(message, server.resolver())
    assert (result.status, result.domain, result.selector) == ("temperror", "example.test", "k")


async def test_rsa_sha1_is_refused_by_policy(server: DNSTestServer) -> None:
    """RFC 8301 §3.1 (short RSA keys are covered by the Mail::DKIM corpus test)."""
    legacy_signature = (
        b"DKIM-Signature: v=1; a=rsa-sha1; c=relaxed/relaxed; d=example.test; s=rsa;"
        b" h=from; bh=AAAA; b=AAAA\r\n"
    )
    (result,) = await dkim.verify(legacy_signature + MESSAGE, server.resolver())
    assert result.status == "policy" and "RFC 8301" in result.reason


async def test_broken_signatures_are_permerrors_without_dns(server: DNSTestServer) -> None:
    broken = [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; bh=AAAA; b=AAAA\r\n",  # no h=
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; h=to; bh=AAAA; b=AAAA\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; h=from; bh=AAAA; b=AAAA;"
        b" i=@evil.test\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; h=from; bh=AAAA; b=AAAA;"
        b" x=1000\r\n",
        b"DKIM-Signature: this is not a tag list\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=; s=rsa; h=from; bh=AAAA; b=AAAA\r\n",
    ]
    before = len(server.queries)
    for header in broken:
        (result,) = await dkim.verify(header + MESSAGE, server.resolver())
        assert result.status == "permerror", header
    assert len(server.queries) == before


async def test_signature_count_is_limited(server: DNSTestServer, keys: dict[str, bytes]) -> None:
    one = dkim.sign(MESSAGE, "example.test", "ed", keys["ed25519-sha256"], "ed25519-sha256")
    results = await dkim.verify(one * (dkim.MAX_SIGNATURES + 3) + MESSAGE, server.resolver())
    statuses = [r.status for r in results]
    assert statuses == ["pass"] * dkim.MAX_SIGNATURES + ["neutral"] * 3


async def test_unsigned_and_garbage_messages(server: DNSTestServer) -> None:
    resolver = server.resolver()
    assert await dkim.verify(MESSAGE, resolver) == []
    assert await dkim.verify(b"", resolver) == []
    garbage = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=a; h=from; bh=A; b=A\r\n\x00\xff"
    assert [r.status for r in await dkim.verify(garbage, resolver)] == ["permerror"]


def test_signing_errors(keys: dict[str, bytes]) -> None:
    with pytest.raises(dkim.SigningError):
        dkim.sign(MESSAGE, "example.test", "s", keys["rsa-sha256"], "ed25519-sha256")
    with pytest.raises(dkim.SigningError):
        dkim.sign(MESSAGE, "example.test", "s", b"not a key")
    with pytest.raises(dkim.SigningError):
        dkim.sign(MESSAGE, "example.test", "s", keys["rsa-sha256"], headers=["subject"])
    with pytest.raises(dkim.SigningError):
        dkim.sign(MESSAGE, "example.test", "s", keys["rsa-sha256"], "rsa-sha1")


async def test_sign_async_matches_sign(server: DNSTestServer, keys: dict[str, bytes]) -> None:
    header = await dkim.sign_async(
        MESSAGE, "example.test", "ed", keys["ed25519-sha256"], "ed25519-sha256"
    )
    assert header.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;")
    (result,) = await dkim.verify(header + MESSAGE, server.resolver())
    assert result.status == "pass"


MAIL_DKIM_VERIFY = r"""
use strict;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                  recurse => 1, udp_timeout => 2);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\n\z/\015\012/ unless /\015\012\z/; $dkim->PRINT($_); }
$dkim->CLOSE;
print $dkim->result, "\n";
"""


def test_mail_dkim_verifies_our_rsa_signature(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    """An independent verifier (Perl Mail::DKIM, Debian libmail-dkim-perl) agrees with us."""
    message = dkim.sign(MESSAGE, "example.test", "rsa", keys["rsa-sha256"]) + MESSAGE
    run = subprocess.run(
        ["perl", "-e", MAIL_DKIM_VERIFY, str(server.port)],
        input=message,
        capture_output=True,
        timeout=60,
    )
    assert run.stdout.decode().strip() == "pass", run.stderr.decode()
    tampered = subprocess.run(
        ["perl", "-e", MAIL_DKIM_VERIFY, str(server.port)],
        input=message.replace(b"in spirit", b"in truth"),
        capture_output=True,
        timeout=60,
    )
    assert tampered.stdout.decode().strip() == "fail"
