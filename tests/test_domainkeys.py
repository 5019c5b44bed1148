"""DomainKeys (RFC 4870): our verifier against signatures made by Perl Mail::DKIM's signer.

An independent implementation signs (Mail::DKIM::DkSignature), keys are served by the
loopback DNS server, and the pure parts (canonicalisation, header choice, g= matching) are
checked against results worked out by hand from RFC 4870.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsserver import DNSTestServer
from postvern.emailauth import authenticate, domainkeys, results
from postvern.emailauth.domainkeys import NOFWS, SIMPLE, Status
from postvern.emailauth.headers import parse_header_block

DOMAIN = "example.test"

MESSAGE = (
    b"Received: from client.example.test by mx.example.test; 3 Jun 2025 09:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Lunch on Friday?\r\n"
    b"Date: Tue, 03 Jun 2025 09:00:00 +0000\r\n"
    b"Message-ID: <lunch@example.test>\r\n"
    b"\r\n"
    b"Noon at the usual place.\r\n"
    b"\r\n"
)
SIGNED = "from:to:subject:date:message-id"

SIGN_DK = r"""
use strict;
use warnings;
use Mail::DKIM::Signer;
use Mail::DKIM::DkSignature;
my ($keyfile, $domain, $selector, $method, $headers) = @ARGV;
my $policy = sub {
    shift->add_signature(Mail::DKIM::DkSignature->new(
        Algorithm => 'rsa-sha1', Method => $method, Domain => $domain,
        Selector => $selector, Query => 'dns', ($headers ? (Headers => $headers) : ()),
    ));
    return;
};
my $dkim = Mail::DKIM::Signer->new(KeyFile => $keyfile, Policy => $policy);
binmode STDIN;
while (<STDIN>) { s/\n\z/\015\012/ unless /\015\012\z/; $dkim->PRINT($_); }
$dkim->CLOSE;
print $dkim->signature->as_string, "\015\012";
"""


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A 1024-bit RSA key as Mail::DKIM reads it (PKCS#1 PEM) and its p= value."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path_factory.mktemp("dk") / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    yield path, base64.b64encode(der).decode("ascii")


@pytest.fixture(scope="module")
def server(key_file: tuple[Path, str]) -> Iterator[DNSTestServer]:
    _, p = key_file
    records = {
        "plain": f"k=rsa; p={p}",
        "alice": f"k=rsa; g=alice; p={p}",
        "wild": f"g=al*e; p={p}",
        "anyone": f"g=; p={p}",
        "testing": f"k=rsa; t=y; p={p}",
        "revoked": "k=rsa; t=y; p=",
        "dkimonly": f"v=DKIM1; h=sha256; p={p}",
        "chat": f"v=DKIM1; s=chat; p={p}",
        "dsa": f"k=dsa; p={p}",
    }
    with DNSTestServer() as dns:
        for selector, record in records.items():
            dns.add(f"{selector}._domainkey.{DOMAIN}", "TXT", record)
        dns.fail(f"slow._domainkey.{DOMAIN}", mode="timeout")
        dns.fail(f"broken._domainkey.{DOMAIN}", mode="servfail")
        yield dns


def sign(
    key_file: tuple[Path, str],
    message: bytes,
    selector: str = "plain",
    method: str = NOFWS,
    headers: str = SIGNED,
    domain: str = DOMAIN,
) -> bytes:
    """The message with a DomainKey-Signature from Mail::DKIM prepended."""
    run = subprocess.run(
        ["perl", "-e", SIGN_DK, str(key_file[0]), domain, selector, method, headers],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return run.stdout + message


async def check(server: DNSTestServer, message: bytes) -> list[domainkeys.Result]:
    return await domainkeys.verify(message, server.resolver(timeout=0.5))


async def one(server: DNSTestServer, message: bytes) -> domainkeys.Result:
    (result,) = await check(server, message)
    return result


# -- pure parts, worked out by hand ----------------------------------------------------------


def test_simple_and_nofws_canonicalization() -> None:
    fields = [b"From: A <a@x.test>\r\n", b"Subject: two\r\n\twords \r\n"]
    body = b"Hello  world \r\n\r\n\r\n"
    assert domainkeys.canonicalize(fields, body, SIMPLE) == (
        b"From: A <a@x.test>\r\nSubject: two\r\n\twords \r\n\r\nHello  world \r\n"
    )
    assert domainkeys.canonicalize(fields, body, NOFWS) == (
        b"From:A<a@x.test>\r\nSubject:twowords\r\n\r\nHelloworld\r\n"
    )
    # Only empty lines: nothing of the body is signed, not even the separating empty line.
    assert domainkeys.canonicalize(fields[:1], b"\r\n\r\n", SIMPLE) == b"From: A <a@x.test>\r\n"
    # Leading empty lines are kept; bare LF line ends read as CRLF.
    assert domainkeys.canonicalize([b"To: b\n"], b"\nx\n\n", SIMPLE) == b"To: b\r\n\r\n\r\nx\r\n"
    # A whitespace-only last line is empty once nofws has removed its spaces.
    assert domainkeys.canonicalize([b"To: b\r\n"], b"x\r\n  \r\n", NOFWS) == b"To:b\r\n\r\nx\r\n"


def test_presented_fields_follow_h_and_include_every_occurrence() -> None:
    block = parse_header_block(
        b"Received: a\r\nReceived: b\r\nFrom: f@x.test\r\nX-Other: o\r\nSubject: s\r\n\r\n"
    )
    fields = block.fields

    def names(signed: tuple[str, ...] | None) -> list[str]:
        return [f.value.strip().decode() for f in domainkeys.presented_fields(fields, signed)]

    assert names(None) == ["a", "b", "f@x.test", "o", "s"]
    assert names(("received", "from", "subject", "absent")) == ["a", "b", "f@x.test", "s"]
    # A name listed twice: the later mention takes the bottom field, the first the rest.
    assert names(("from", "received", "received")) == ["f@x.test", "a", "b"]


def test_granularity_matching() -> None:
    assert domainkeys.granularity_matches("", "anyone")
    assert domainkeys.granularity_matches("alice", "alice")
    assert not domainkeys.granularity_matches("alice", "Alice")  # local-parts keep their case
    assert domainkeys.granularity_matches("al*e", "alice")
    assert domainkeys.granularity_matches("*", "bob")
    assert not domainkeys.granularity_matches("al*e", "bob")
    assert not domainkeys.granularity_matches("a.c", "abc")  # no regular-expression leaks


# -- signatures made by Mail::DKIM -----------------------------------------------------------


@pytest.mark.parametrize("method", [SIMPLE, NOFWS])
async def test_signed_message_passes(
    server: DNSTestServer, key_file: tuple[Path, str], method: str
) -> None:
    result = await one(server, sign(key_file, MESSAGE, method=method))
    assert (result.status, result.reason) == (Status.PASS, "good signature")
    assert (result.domain, result.selector) == (DOMAIN, "plain")
    assert (result.sender_field, result.sender) == ("from", "alice@example.test")
    assert (result.testing, result.key_bits) == (False, 1024)


async def test_nofws_survives_whitespace_changes_that_break_simple(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    def rewrap(message: bytes) -> bytes:
        return message.replace(b"Subject: Lunch on", b"Subject:  Lunch\r\n\ton").replace(
            b"Noon at the", b"Noon  at the"
        )

    nofws = await one(server, rewrap(sign(key_file, MESSAGE, method=NOFWS)))
    simple = await one(server, rewrap(sign(key_file, MESSAGE, method=SIMPLE)))
    assert nofws.status is Status.PASS
    assert (simple.status, simple.reason) == (Status.FAIL, "signature did not verify")


async def test_tampered_body_or_header_fails(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    signed = sign(key_file, MESSAGE)
    body = await one(server, signed.replace(b"Noon", b"Midnight"))
    header = await one(server, signed.replace(b"Lunch on Friday", b"Lunch on Monday"))
    assert body.status is Status.FAIL and header.status is Status.FAIL
    # A field outside h= may change freely.
    unsigned = await one(server, signed.replace(b"client.example.test", b"other.test"))
    assert unsigned.status is Status.PASS


async def test_without_h_every_field_below_the_signature_is_signed(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    signed = sign(key_file, MESSAGE, headers="")
    assert b"h=" not in signed.split(b"\r\n")[0]
    assert (await one(server, signed)).status is Status.PASS
    changed = signed.replace(b"client.example.test", b"other.test")
    assert (await one(server, changed)).status is Status.FAIL
    # A field added above the signature is not covered.
    above = b"X-Added: later\r\n" + signed
    assert (await one(server, above)).status is Status.PASS


async def test_sender_identifies_the_signer_when_signed(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    on_behalf = MESSAGE.replace(
        b"From: Alice <alice@example.test>\r\n",
        b"From: Carol <carol@elsewhere.test>\r\nSender: Alice <alice@example.test>\r\n",
    )
    result = await one(server, sign(key_file, on_behalf, headers="sender:" + SIGNED))
    assert result.status is Status.PASS
    assert (result.sender_field, result.sender) == ("sender", "alice@example.test")
    # Sender not signed: the From domain must match d=, and elsewhere.test does not.
    result = await one(server, sign(key_file, on_behalf, headers=SIGNED))
    assert (result.status, result.reason) == (Status.PERMERROR, "From domain is not within d=")


async def test_unsigned_sender_added_later_does_not_change_the_identity(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    signed = sign(key_file, MESSAGE)
    relayed = signed.replace(b"To: Bob", b"Sender: list-owner@lists.test\r\nTo: Bob")
    result = await one(server, relayed)
    assert (result.status, result.sender_field) == (Status.PASS, "from")
    # Without h= the added Sender is below the signature, so it is signed and identifies
    # the signer: lists.test is not within example.test.
    unlisted = sign(key_file, MESSAGE, headers="")
    relayed = unlisted.replace(b"To: Bob", b"Sender: list-owner@lists.test\r\nTo: Bob")
    result = await one(server, relayed)
    assert (result.status, result.reason) == (Status.PERMERROR, "Sender domain is not within d=")


async def test_signing_domain_may_be_a_parent_of_the_sending_domain(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    sub = MESSAGE.replace(b"alice@example.test", b"alice@mail.Example.TEST")
    assert (await one(server, sign(key_file, sub))).status is Status.PASS
    lookalike = MESSAGE.replace(b"alice@example.test", b"alice@badexample.test")
    signed = sign(key_file, lookalike)
    before = len(server.queries)
    result = await one(server, signed)
    assert (result.status, result.reason) == (Status.PERMERROR, "From domain is not within d=")
    assert len(server.queries) == before  # refused before any key lookup


@pytest.mark.parametrize(
    ("selector", "local_part", "status"),
    [
        ("alice", b"alice", Status.PASS),
        ("alice", b"bob", Status.FAIL),
        ("wild", b"alice", Status.PASS),
        ("wild", b"bob", Status.FAIL),
        ("anyone", b"bob", Status.PASS),  # an empty g= restricts nothing in DomainKeys
    ],
)
async def test_key_granularity(
    server: DNSTestServer,
    key_file: tuple[Path, str],
    selector: str,
    local_part: bytes,
    status: Status,
) -> None:
    message = MESSAGE.replace(b"alice@example.test", local_part + b"@example.test")
    result = await one(server, sign(key_file, message, selector=selector))
    assert result.status is status
    if status is Status.FAIL:
        assert result.reason == "sending address does not match the key's g="


async def test_testing_key_reports_failures_as_neutral(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    signed = sign(key_file, MESSAGE, selector="testing")
    good = await one(server, signed)
    assert (good.status, good.testing) == (Status.PASS, True)
    bad = await one(server, signed.replace(b"Noon", b"Midnight"))
    assert (bad.status, bad.testing) == (Status.NEUTRAL, True)
    assert bad.reason == "signature did not verify (testing key)"


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ("revoked", "key revoked (empty p=)"),
        ("missing", "no key record"),
        ("dkimonly", "key does not allow sha1 (h=)"),
        ("chat", "key is not for email (s=)"),
        ("dsa", "key type is not rsa (k=)"),
    ],
)
async def test_unusable_keys_are_permerror(
    server: DNSTestServer, key_file: tuple[Path, str], selector: str, reason: str
) -> None:
    result = await one(server, sign(key_file, MESSAGE, selector=selector))
    assert (result.status, result.reason) == (Status.PERMERROR, reason)


@pytest.mark.parametrize("selector", ["slow", "broken"])
async def test_dns_errors_are_temperror(
    server: DNSTestServer, key_file: tuple[Path, str], selector: str
) -> None:
    result = await one(server, sign(key_file, MESSAGE, selector=selector))
    assert (result.status, result.reason) == (Status.TEMPERROR, "key lookup failed for now")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ((b"a=rsa-sha1", b"a=rsa-sha256"), "unknown algorithm (a=)"),
        ((b"q=dns", b"q=http"), "unknown query method (q=)"),
        ((b"q=dns;", b""), "required tag q= missing"),
        ((b"c=nofws", b"c=relaxed"), "unknown canonicalization (c=)"),
        ((b"d=example.test", b"d=exa mple.test"), "invalid domain (d=)"),
        ((b"s=plain", b"s=../etc"), "invalid selector (s=)"),
        ((b"; b=", b"; b=!"), "b= is not base64"),
        ((b"h=" + SIGNED.encode(), b"h=:"), "h= is empty"),
        ((b"a=rsa-sha1;", b"a=rsa-sha1; a=rsa-sha1;"), "tag list syntax"),
    ],
)
async def test_unusable_signatures_are_permerror_without_a_lookup(
    server: DNSTestServer, key_file: tuple[Path, str], change: tuple[bytes, bytes], reason: str
) -> None:
    signed = sign(key_file, MESSAGE)
    header, rest = signed.split(b"\r\n", 1)
    damaged = header.replace(*change) + b"\r\n" + rest
    before = len(server.queries)
    result = await one(server, damaged)
    assert (result.status, result.reason) == (Status.PERMERROR, reason)
    assert len(server.queries) == before


async def test_signature_count_is_bounded(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    signed = sign(key_file, MESSAGE)
    header = signed.split(b"\r\n", 1)[0] + b"\r\n"
    extra = 2
    many = header * (domainkeys.MAX_SIGNATURES + extra - 1) + signed
    checked = await check(server, many)
    assert [r.status for r in checked] == [Status.PASS] * domainkeys.MAX_SIGNATURES + [
        Status.NEUTRAL
    ] * extra
    assert checked[-1].reason.startswith("not evaluated")


async def test_no_signature_no_result(server: DNSTestServer) -> None:
    assert await check(server, MESSAGE) == []
    assert await check(server, b"") == []
    assert await check(server, b"DomainKey-Signature:\r\n\r\n") == [
        domainkeys.Result(Status.PERMERROR, reason="required tag b= missing")
    ]


def test_authentication_results_property() -> None:
    result = domainkeys.Result(
        Status.PASS, DOMAIN, "plain", "alice@example.test", "from", True, "good signature"
    )
    assert results.domainkeys_resinfo(result) == (
        "domainkeys=pass (good signature; testing key, t=y) "
        "header.d=example.test header.from=alice@example.test"
    )


async def test_authenticate_reports_domainkeys_but_dmarc_ignores_it(
    server: DNSTestServer, key_file: tuple[Path, str]
) -> None:
    """DomainKeys appears in Authentication-Results; DMARC (RFC 7489) counts only DKIM."""
    server.set(DOMAIN, "TXT", "v=spf1 -all")
    server.set(f"_dmarc.{DOMAIN}", "TXT", "v=DMARC1; p=reject")
    try:
        verdict = await authenticate(
            sign(key_file, MESSAGE),
            client_ip="198.51.100.7",
            helo="client.example.test",
            mail_from="alice@example.test",
            resolver=server.resolver(timeout=0.5),
            authserv_id="mx.example.org",
            dmarc_sample=lambda: 0.0,
        )
    finally:
        server.remove(DOMAIN, "TXT")
        server.remove(f"_dmarc.{DOMAIN}", "TXT")
    assert [r.status for r in verdict.domainkeys] == [Status.PASS]
    assert verdict.dkim == []
    unfolded = b" ".join(verdict.header.split()).decode()
    assert "domainkeys=pass (good signature) header.d=example.test" in unfolded
    assert "header.from=alice@example.test" in unfolded
    assert (verdict.dmarc.status, verdict.policy) == ("fail", "reject")


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=300), record=st.binary(max_size=300), body=st.binary(max_size=200))
def test_hostile_input_becomes_a_named_error(value: bytes, record: bytes, body: bytes) -> None:
    """Bad input never raises out of a parser: only the module's own errors come out."""
    try:
        domainkeys.read_signature(0, value)
    except domainkeys.SignatureError:
        pass
    try:
        domainkeys.parse_key_record(record)
    except domainkeys.KeyRecordError:
        pass
    block = parse_header_block(b"DomainKey-Signature: " + value + b"\r\n" + body)
    for method in (SIMPLE, NOFWS):
        domainkeys.canonicalize([value], body, method)
    domainkeys.presented_fields(block.fields, ("from", "sender", "from"))
    try:
        domainkeys.sending_address(parse_header_block(b"From: " + value + b"\r\n\r\n").fields)
    except domainkeys.SignatureError:
        pass
