"""authenticate() end to end: messages signed by our signer, keys and policies on loopback DNS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dnsserver import DNSTestServer
from postvern.emailauth import AuthVerdict, authenticate, dkim, results

AUTHSERV = "mx.example.org"
CLIENT = "192.0.2.1"  # origin.test's outbound host
STRANGER = "198.51.100.66"

BODY = (
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Lunch on Friday?\r\n"
    b"Date: Tue, 03 Jun 2025 09:00:00 +0000\r\n"
    b"Message-ID: <lunch@origin.test>\r\n"
    b"\r\n"
    b"Noon at the usual place.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {alg: dkim.generate_private_key(alg) for alg in dkim.ALGORITHMS}


@pytest.fixture
def server(keys: dict[str, bytes]) -> Iterator[DNSTestServer]:
    with DNSTestServer() as dns_server:
        for domain in ("origin.test", "quarantine.test", "nopolicy.test"):
            dns_server.add(domain, "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
            dns_server.add(f"rsa._domainkey.{domain}", "TXT", dkim.key_record(keys["rsa-sha256"]))
            dns_server.add(
                f"ed._domainkey.{domain}", "TXT", dkim.key_record(keys["ed25519-sha256"])
            )
        dns_server.add("_dmarc.origin.test", "TXT", "v=DMARC1; p=reject")
        dns_server.add("_dmarc.quarantine.test", "TXT", "v=DMARC1; p=quarantine")
        dns_server.add("mail.origin.test", "A", CLIENT)
        dns_server.add("mail.origin.test", "TXT", "v=spf1 a -all")
        yield dns_server


def make(sender: str, keys: dict[str, bytes], *algorithms: str) -> bytes:
    domain = sender.rpartition("@")[2]
    message = f"From: Alice <{sender}>\r\n".encode() + BODY
    signatures = b"".join(
        dkim.sign(message, domain, "ed" if a.startswith("ed") else "rsa", keys[a], a)
        for a in algorithms
    )
    return signatures + message


async def check(
    server: DNSTestServer,
    message: bytes,
    *,
    client_ip: str = CLIENT,
    mail_from: str = "alice@origin.test",
    dns_timeout: float = 1.0,
) -> AuthVerdict:
    return await authenticate(
        message,
        client_ip=client_ip,
        helo="mail.origin.test",
        mail_from=mail_from,
        resolver=server.resolver(timeout=dns_timeout),
        authserv_id=AUTHSERV,
        dmarc_sample=lambda: 0.0,
    )


@pytest.mark.parametrize("algorithm", dkim.ALGORITHMS)
async def test_signed_mail_from_its_own_server_is_accepted(
    server: DNSTestServer, keys: dict[str, bytes], algorithm: str
) -> None:
    verdict = await check(server, make("alice@origin.test", keys, algorithm))
    assert (verdict.policy, verdict.dmarc.status, verdict.spf.status) == ("accept", "pass", "pass")
    assert [(r.status, r.algorithm) for r in verdict.dkim] == [("pass", algorithm)]
    header = verdict.header.decode()
    assert header.startswith(f"Authentication-Results: {AUTHSERV};\r\n")
    assert "spf=pass (matched ip4:192.0.2.0/24) smtp.mailfrom=alice@origin.test;" in header
    assert "spf=pass (matched a) smtp.helo=mail.origin.test;" in header
    unfolded = header.replace("\r\n\t", " ")
    assert "dkim=pass (good signature) header.d=origin.test header.s=" in unfolded
    assert f"header.a={algorithm}" in unfolded
    assert "dmarc=pass (p=reject dis=none; aligned SPF pass) header.from=origin.test" in unfolded
    assert unfolded.rstrip().endswith("arc=none (no ARC sets)")


async def test_forged_mail_is_rejected(server: DNSTestServer, keys: dict[str, bytes]) -> None:
    forged = make("alice@origin.test", keys, "rsa-sha256").replace(b"Noon", b"Send money")
    verdict = await check(server, forged, client_ip=STRANGER)
    assert [r.reason for r in verdict.dkim] == ["body hash did not verify"]
    assert (verdict.spf.status, verdict.dmarc.status, verdict.policy) == ("fail", "fail", "reject")
    assert verdict.reason == "DMARC reject policy of origin.test fails"


async def test_broken_dkim_but_aligned_spf_still_passes(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    tampered = make("alice@origin.test", keys, "rsa-sha256").replace(b"Noon", b"One")
    verdict = await check(server, tampered)
    assert (verdict.dkim[0].status, verdict.dmarc.status, verdict.policy) == (
        "fail",
        "pass",
        "accept",
    )


async def test_forwarded_mail_passes_on_dkim_alone(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    message = make("alice@origin.test", keys, "ed25519-sha256", "rsa-sha256")
    verdict = await check(server, message, client_ip=STRANGER, mail_from="srs@forwarder.test")
    assert (verdict.spf.status, verdict.dmarc.status, verdict.policy) == ("none", "pass", "accept")
    assert verdict.dmarc.dkim_aligned == "origin.test"


async def test_quarantine_policy(server: DNSTestServer, keys: dict[str, bytes]) -> None:
    message = make("carol@quarantine.test", keys)
    verdict = await check(server, message, client_ip=STRANGER, mail_from="carol@quarantine.test")
    assert (verdict.dmarc.disposition, verdict.policy) == ("quarantine", "quarantine")


async def test_no_policy_means_accept_whatever_fails(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    message = make("dave@nopolicy.test", keys)
    verdict = await check(server, message, client_ip=STRANGER, mail_from="dave@nopolicy.test")
    assert (verdict.spf.status, verdict.dmarc.status, verdict.policy) == ("fail", "none", "accept")


async def test_temporary_errors_that_could_change_the_verdict_tempfail(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    message = make("alice@origin.test", keys, "rsa-sha256")
    server.fail("rsa._domainkey.origin.test", "TXT", mode="timeout")
    verdict = await check(server, message, client_ip=STRANGER, dns_timeout=0.3)
    assert (verdict.dkim[0].status, verdict.dmarc.status) == ("temperror", "fail")
    assert verdict.policy == "tempfail"
    # With SPF aligned and passing, the missing key cannot change anything.
    assert (await check(server, message, dns_timeout=0.3)).policy == "accept"


async def test_policy_lookup_failure(server: DNSTestServer, keys: dict[str, bytes]) -> None:
    server.fail("_dmarc.origin.test", "TXT")
    unsigned = make("alice@origin.test", keys)
    verdict = await check(server, unsigned, client_ip=STRANGER)
    assert (verdict.dmarc.status, verdict.policy) == ("temperror", "tempfail")
    signed = make("alice@origin.test", keys, "ed25519-sha256")
    strictly_aligned = await check(server, signed, client_ip=STRANGER)
    assert (strictly_aligned.dmarc.status, strictly_aligned.policy) == ("temperror", "accept")


@pytest.mark.parametrize("from_fields", [b"", b"From: a@origin.test\r\nFrom: b@origin.test\r\n"])
async def test_missing_or_repeated_from_is_rejected(
    server: DNSTestServer, from_fields: bytes
) -> None:
    verdict = await check(server, from_fields + BODY)
    assert (verdict.dmarc.status, verdict.policy) == ("permerror", "reject")
    assert "From field" in verdict.reason


async def test_apply_prepends_ours_and_drops_forgeries(
    server: DNSTestServer, keys: dict[str, bytes]
) -> None:
    signed = make("alice@origin.test", keys, "rsa-sha256")
    incoming = (
        b"Authentication-Results: MX.Example.Org; dkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: (forged) mx.example.org;\r\n\tspf=pass\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass\r\n"
    ) + signed
    verdict = await check(server, incoming)
    delivered = verdict.apply(incoming)
    assert delivered.startswith(verdict.header)
    rest = delivered[len(verdict.header) :]
    assert rest == incoming.split(b"\r\n", 3)[3]  # the two forgeries gone, all else intact
    assert verdict.dkim[0].status == "pass"  # A-R fields are not signed, removal is safe
    ours = results.our_resinfos(delivered, AUTHSERV)
    assert ours[0].startswith("spf=pass") and not any("bank.test" in r for r in ours)


async def test_header_is_folded_and_hostile_values_are_quoted(server: DNSTestServer) -> None:
    hostile = (
        b'DKIM-Signature: v=1; a=rsa-sha256; d=origin.test; s=x"y; h=from; bh=AAAA; b=AAAA\r\n'
        b"DKIM-Signature: v=1; a=rsa-sha256; d=a.test; s=" + b"s" * 200 + b"; h=from; b=A; bh=A\r\n"
        b"From: alice@origin.test\r\n" + BODY
    )
    verdict = await check(server, hostile)
    lines = verdict.header.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line) <= 78 for line in lines[:-1] if b" " in line)
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    authserv, resinfos = results.split_resinfos(verdict.header.decode().split(":", 1)[1])
    assert authserv == AUTHSERV
    assert [r.split("=")[0] for r in resinfos] == ["spf", "spf", "dkim", "dkim", "dmarc", "arc"]
    assert 'header.s="x\\"y"' in resinfos[2]
