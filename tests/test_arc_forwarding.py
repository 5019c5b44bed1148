"""ARC through a forwarder: seal on forward, validate at the final MX, local trust override.

origin.test (DMARC p=reject, DKIM-signed) → list.test (changes Subject and body, adds its A-R,
seals) → our MX. DKIM breaks and SPF names list.test, so DMARC fails; the ARC chain shows
origin.test's mail passed at list.test. Only a trusted sealer turns that into "accept".
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from dnsserver import DNSTestServer
from postvern.emailauth import AuthVerdict, arc, authenticate, dkim

ORIGIN_IP = "192.0.2.1"
LIST_IP = "198.51.100.7"
MESSAGE = (
    b"From: Alice <alice@origin.test>\r\n"
    b"To: team@list.test\r\n"
    b"Subject: Minutes\r\n"
    b"Date: Wed, 04 Jun 2025 08:00:00 +0000\r\n"
    b"Message-ID: <minutes@origin.test>\r\n"
    b"\r\n"
    b"All agreed.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {name: dkim.generate_private_key("rsa-sha256") for name in ("origin", "list", "relay")}


@pytest.fixture
def server(keys: dict[str, bytes]) -> Iterator[DNSTestServer]:
    with DNSTestServer() as dns_server:
        dns_server.add("origin.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        dns_server.add("_dmarc.origin.test", "TXT", "v=DMARC1; p=reject")
        dns_server.add("list.test", "TXT", "v=spf1 ip4:198.51.100.7 -all")
        for name, key in keys.items():
            dns_server.add(f"arc._domainkey.{name}.test", "TXT", dkim.key_record(key))
        yield dns_server


async def receive(
    server: DNSTestServer,
    message: bytes,
    authserv_id: str,
    client_ip: str,
    mail_from: str,
    trusted: frozenset[str] = frozenset(),
) -> AuthVerdict:
    return await authenticate(
        message,
        client_ip=client_ip,
        helo=f"mail.{mail_from.rpartition('@')[2]}",
        mail_from=mail_from,
        resolver=server.resolver(),
        authserv_id=authserv_id,
        arc_trusted_domains=trusted,
        dmarc_sample=lambda: 0.0,
    )


async def forward(
    server: DNSTestServer, message: bytes, keys: dict[str, bytes], hop: str, client_ip: str
) -> bytes:
    """What a forwarder at ``hop`` does: authenticate, record, modify, seal."""
    mail_from = "alice@origin.test" if client_ip == ORIGIN_IP else f"bounce@{hop}"
    verdict = await receive(server, message, f"mx.{hop}", client_ip, mail_from)
    recorded = verdict.apply(message)
    modified = recorded.replace(b"Subject: Minutes", b"Subject: [team] Minutes")
    modified = modified.rstrip(b"\r\n") + b"\r\n--\r\nteam mailing list\r\n"
    new_set = await arc.seal_async(modified, hop, "arc", keys[hop.split(".")[0]], f"mx.{hop}")
    assert len(new_set) == 3
    return b"".join(new_set) + modified


@pytest.fixture
async def forwarded(server: DNSTestServer, keys: dict[str, bytes]) -> bytes:
    original = dkim.sign(MESSAGE, "origin.test", "arc", keys["origin"]) + MESSAGE
    return await forward(server, original, keys, "list.test", ORIGIN_IP)


async def test_forwarded_mail_fails_dmarc_but_the_chain_passes(
    server: DNSTestServer, forwarded: bytes
) -> None:
    verdict = await receive(server, forwarded, "mx.example.org", LIST_IP, "bounce@list.test")
    assert verdict.dkim[0].status == "fail" and verdict.spf.status == "pass"
    assert verdict.dmarc.status == "fail"
    assert (verdict.arc.status, verdict.arc.instances, verdict.arc.oldest_pass) == ("pass", 1, 0)
    assert verdict.arc.sealers == [(1, "list.test")]
    assert verdict.policy == "reject"  # report only: nobody is trusted by default
    assert "ARC chain passes but its sealer list.test is not trusted" in verdict.reason
    assert b"arc=pass" in verdict.header


async def test_trusted_sealer_overrides_dmarc(server: DNSTestServer, forwarded: bytes) -> None:
    verdict = await receive(
        server, forwarded, "mx.example.org", LIST_IP, "bounce@list.test", frozenset({"list.test"})
    )
    assert verdict.policy == "accept"
    assert verdict.reason == (
        "DMARC reject policy of origin.test fails; accepted: trusted ARC sealer list.test saw "
        "DMARC pass"
    )


async def test_the_seal_carries_our_results_verbatim(forwarded: bytes) -> None:
    aar = next(line for line in forwarded.split(b"\r\n") if line.startswith(b"ARC-Auth"))
    assert aar == b"ARC-Authentication-Results: i=1; mx.list.test;"
    unfolded = forwarded.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    assert b"dmarc=pass (p=reject dis=none; aligned SPF pass) header.from=origin.test" in unfolded
    assert b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=list.test; s=arc;" in unfolded


async def test_second_hop_extends_the_chain(
    server: DNSTestServer, keys: dict[str, bytes], forwarded: bytes
) -> None:
    relayed = await forward(server, forwarded, keys, "relay.test", LIST_IP)
    server.add("relay.test", "TXT", "v=spf1 ip4:203.0.113.5 -all")

    async def final(trusted: set[str]) -> AuthVerdict:
        return await receive(
            server, relayed, "mx.example.org", "203.0.113.5", "bounce@relay.test",
            frozenset(trusted),
        )  # fmt: skip

    verdict = await final({"relay.test"})
    assert (verdict.arc.status, verdict.arc.instances) == ("pass", 2)
    # relay.test changed the body again, so list.test's AMS no longer verifies.
    assert verdict.arc.oldest_pass == 2
    assert verdict.arc.sealers == [(2, "relay.test"), (1, "list.test")]
    assert b"cv=pass" in relayed.split(b"ARC-Message-Signature")[0]
    # relay.test saw DMARC fail (list.test had changed the message); list.test, which saw the
    # pass, is not trusted: its word does not count.
    assert verdict.policy == "reject"
    assert verdict.reason.endswith("no trusted ARC sealer recorded a DMARC pass")
    assert (await final({"relay.test", "list.test"})).policy == "accept"
    assert (await final({"list.test"})).policy == "reject"  # newest sealer untrusted


async def test_tampering_after_the_seal_fails_the_chain(
    server: DNSTestServer, forwarded: bytes
) -> None:
    tampered = forwarded.replace(b"All agreed.", b"Nobody agreed.")
    verdict = await receive(
        server, tampered, "mx.example.org", LIST_IP, "bounce@list.test", frozenset({"list.test"})
    )
    assert verdict.arc.status == "fail"
    assert verdict.policy == "reject"


async def test_unreachable_seal_key_of_a_trusted_sealer_tempfails(
    server: DNSTestServer, forwarded: bytes
) -> None:
    server.fail("arc._domainkey.list.test", "TXT")
    verdict = await receive(
        server, forwarded, "mx.example.org", LIST_IP, "bounce@list.test", frozenset({"list.test"})
    )
    assert (verdict.arc.status, verdict.arc.temporary) == ("fail", True)
    assert verdict.policy == "tempfail"


def test_nothing_to_seal_without_our_results(keys: dict[str, bytes]) -> None:
    assert arc.seal(MESSAGE, "list.test", "arc", keys["list"], "mx.list.test") == []


MAIL_DKIM_ARC = r"""
use strict;
use Mail::DKIM::ARC::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                  recurse => 1, udp_timeout => 2);
Mail::DKIM::DNS::resolver($res);
my $arc = Mail::DKIM::ARC::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\n\z/\015\012/ unless /\015\012\z/; $arc->PRINT($_); }
$arc->CLOSE;
print $arc->result, "\n";
"""


def test_mail_dkim_validates_our_chain(server: DNSTestServer, forwarded: bytes) -> None:
    """An independent ARC implementation (Perl Mail::DKIM::ARC) agrees with our seal."""
    run = subprocess.run(
        ["perl", "-e", MAIL_DKIM_ARC, str(server.port)],
        input=forwarded,
        capture_output=True,
        timeout=60,
    )
    assert run.stdout.decode().strip() == "pass", run.stderr.decode()


async def test_oversized_chains_fail_without_any_lookup(server: DNSTestServer) -> None:
    too_long = b"ARC-Seal: i=51; cv=pass; a=rsa-sha256; d=a.test; s=s; b=AAAA\r\n" + MESSAGE
    many_keys = b"".join(
        b"ARC-Seal: i=%d; cv=pass; a=rsa-sha256; d=k%d.test; s=s; b=AAAA\r\n" % (i, i)
        for i in range(1, arc.MAX_KEY_LOOKUPS + 2)
    )
    before = len(server.queries)
    for message, reason in ((too_long, "more than 50"), (many_keys + MESSAGE, "more than 16")):
        result = await arc.validate(message, server.resolver())
        assert result.status == "fail" and reason in result.reason
    assert len(server.queries) == before
