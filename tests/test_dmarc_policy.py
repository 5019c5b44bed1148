"""DMARC (RFC 7489): discovery, alignment, p/sp/pct and errors, against loopback DNS."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dnsserver
from dnsserver import DNSTestServer
from postvern.emailauth import dkim, dmarc, spf

dns_server = dnsserver.dns_server  # the shared fixture: a fresh server per test


def message(*from_values: str) -> bytes:
    fields = b"".join(b"From: " + v.encode() + b"\r\n" for v in from_values)
    return fields + b"To: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def spf_result(status: str, domain: str) -> spf.Result:
    return spf.Result(spf.Status(status), "mailfrom", domain, f"bounce@{domain}")


def dkim_result(status: str, domain: str) -> dkim.Result:
    return dkim.Result(dkim.Status(status), domain=domain, selector="s", algorithm="rsa-sha256")


NO_SPF = spf_result("fail", "elsewhere.test")


async def evaluate(
    server: DNSTestServer,
    msg: bytes,
    spf_res: spf.Result = NO_SPF,
    dkim_res: list[dkim.Result] | None = None,
    sample: float = 0.0,
) -> dmarc.Result:
    return await dmarc.evaluate(
        msg, spf_res, dkim_res or [], server.resolver(), sample=lambda: sample
    )


async def test_aligned_spf_pass_passes(dns_server: DNSTestServer) -> None:
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=reject")
    result = await evaluate(
        dns_server, message("a@example.test"), spf_result("pass", "bounces.example.test")
    )
    assert (result.status, result.spf_aligned, result.policy_domain) == (
        "pass",
        True,
        "example.test",
    )


async def test_aligned_dkim_pass_passes_relaxed(dns_server: DNSTestServer) -> None:
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=reject")
    signatures = [dkim_result("pass", "other.test"), dkim_result("pass", "mail.example.test")]
    result = await evaluate(dns_server, message("A <a@Example.TEST>"), dkim_res=signatures)
    assert (result.status, result.dkim_aligned) == ("pass", "mail.example.test")


@pytest.mark.parametrize("policy", ["reject", "quarantine", "none"])
async def test_failure_takes_the_published_policy(dns_server: DNSTestServer, policy: str) -> None:
    dns_server.add("_dmarc.example.test", "TXT", f"v=DMARC1; p={policy}; rua=mailto:r@example.test")
    signatures = [dkim_result("fail", "example.test"), dkim_result("pass", "unrelated.test")]
    result = await evaluate(dns_server, message("a@example.test"), dkim_res=signatures)
    assert (result.status, result.requested, result.disposition) == ("fail", policy, policy)
    assert result.record is not None and result.record.rua == ("mailto:r@example.test",)


async def test_subdomain_policy_applies_below_the_organizational_domain(
    dns_server: DNSTestServer,
) -> None:
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    sub = await evaluate(dns_server, message("a@news.example.test"))
    assert (sub.status, sub.policy_domain, sub.disposition) == (
        "fail",
        "example.test",
        "quarantine",
    )
    top = await evaluate(dns_server, message("a@example.test"))
    assert top.disposition == "reject"
    dns_server.add("_dmarc.news.example.test", "TXT", "v=DMARC1; p=none")
    own = await evaluate(dns_server, message("a@news.example.test"))
    assert (own.policy_domain, own.disposition) == ("news.example.test", "none")


async def test_discovery_falls_back_to_the_organizational_domain_only(
    dns_server: DNSTestServer,
) -> None:
    dns_server.add("_dmarc.example.co.uk", "TXT", "v=DMARC1; p=reject")
    result = await evaluate(dns_server, message("a@a.b.shop.example.co.uk"))
    assert (result.status, result.policy_domain) == ("fail", "example.co.uk")
    assert [q for q, _ in dns_server.queries] == [
        "_dmarc.a.b.shop.example.co.uk",
        "_dmarc.example.co.uk",
    ]


@pytest.mark.parametrize(
    ("pct", "sample", "disposition"),
    [
        (50, 0.2, "reject"),
        (50, 0.7, "quarantine"),
        (100, 0.999, "reject"),
        (0, 0.0, "quarantine"),
    ],
)
async def test_pct_sampling(
    dns_server: DNSTestServer, pct: int, sample: float, disposition: str
) -> None:
    dns_server.add("_dmarc.example.test", "TXT", f"v=DMARC1; p=reject; pct={pct}")
    result = await evaluate(dns_server, message("a@example.test"), sample=sample)
    assert (result.requested, result.disposition) == ("reject", disposition)


async def test_pct_softens_quarantine_to_none(dns_server: DNSTestServer) -> None:
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=quarantine; pct=10")
    result = await evaluate(dns_server, message("a@example.test"), sample=0.5)
    assert (result.status, result.disposition) == ("fail", "none")


async def test_strict_alignment(dns_server: DNSTestServer) -> None:
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")
    sub_dkim = [dkim_result("pass", "mail.example.test")]
    sub_spf = spf_result("pass", "bounces.example.test")
    strict = await evaluate(dns_server, message("a@example.test"), sub_spf, sub_dkim)
    assert (strict.status, strict.spf_aligned, strict.dkim_aligned) == ("fail", False, "")
    exact = await evaluate(
        dns_server, message("a@example.test"), dkim_res=[dkim_result("pass", "example.test")]
    )
    assert exact.status == "pass"


async def test_policy_lookup_failure_is_temperror(dns_server: DNSTestServer) -> None:
    dns_server.fail("_dmarc.example.test", "TXT")
    result = await evaluate(dns_server, message("a@example.test"))
    assert result.status == "temperror"
    dns_server.unfail("_dmarc.example.test", "TXT")
    dns_server.fail("_dmarc.news.example.test", "TXT", mode="timeout")
    slow = await dmarc.evaluate(
        message("a@news.example.test"), NO_SPF, [], dns_server.resolver(timeout=0.2)
    )
    assert slow.status == "temperror"


async def test_temporary_failure_of_an_aligned_identifier_is_uncertain(
    dns_server: DNSTestServer,
) -> None:
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=reject")
    aligned_temp = await evaluate(
        dns_server, message("a@example.test"), dkim_res=[dkim_result("temperror", "example.test")]
    )
    assert (aligned_temp.status, aligned_temp.uncertain) == ("fail", True)
    unrelated = await evaluate(
        dns_server, message("a@example.test"), spf_result("temperror", "other.test")
    )
    assert (unrelated.status, unrelated.uncertain) == ("fail", False)


@pytest.mark.parametrize(
    ("froms", "reason"),
    [
        ((), "message has 0 From fields"),
        (("a@example.test", "b@example.test"), "message has 2 From fields"),
        (("undisclosed-recipients:;",), "From has no address with a domain"),
        (("just text",), "From has no address with a domain"),
    ],
)
async def test_unusable_from_is_permerror(
    dns_server: DNSTestServer, froms: tuple[str, ...], reason: str
) -> None:
    result = await evaluate(dns_server, message(*froms))
    assert (result.status, result.reason) == ("permerror", reason)
    assert dns_server.queries == []


async def test_several_from_domains_take_the_strictest_failure(dns_server: DNSTestServer) -> None:
    dns_server.add("_dmarc.lenient.test", "TXT", "v=DMARC1; p=quarantine")
    dns_server.add("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject")
    result = await evaluate(dns_server, message("a@lenient.test, b@strict.test"))
    assert (result.status, result.from_domain, result.disposition) == (
        "fail",
        "strict.test",
        "reject",
    )


async def test_record_selection(dns_server: DNSTestServer) -> None:
    dns_server.add("_dmarc.none.test", "TXT", "v=spf1 -all", "some text")
    assert (await evaluate(dns_server, message("a@none.test"))).status == "none"
    dns_server.add("_dmarc.two.test", "TXT", "v=DMARC1; p=reject", "v=DMARC1; p=none")
    assert (await evaluate(dns_server, message("a@two.test"))).status == "none"
    dns_server.add("_dmarc.bad.test", "TXT", "v=DMARC1; p=bogus")
    assert (await evaluate(dns_server, message("a@bad.test"))).status == "permerror"
    dns_server.add("_dmarc.rua.test", "TXT", "v=DMARC1; p=bogus; rua=mailto:d@rua.test")
    with_rua = await evaluate(dns_server, message("a@rua.test"))
    assert (with_rua.status, with_rua.disposition) == ("fail", "none")


def test_parse_record() -> None:
    record = dmarc.parse_record("v=DMARC1;p=Quarantine; sp=none;adkim=s; pct=30; aspf=r; x=1")
    assert record == dmarc.Record(dmarc.Policy.QUARANTINE, dmarc.Policy.NONE, True, False, 30)
    assert dmarc.parse_record("v=DMARC1; p=reject; pct=250").pct == 100  # type: ignore[union-attr]
    assert dmarc.parse_record("p=reject; v=DMARC1") is None  # v must come first
    assert dmarc.parse_record("v=dmarc1; p=reject") is None  # and match exactly
    with pytest.raises(dmarc.RecordError):
        dmarc.parse_record("v=DMARC1; sp=reject")


def test_alignment_uses_the_public_suffix_list() -> None:
    assert dmarc.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("user.github.io") == "user.github.io"
    assert dmarc.aligned("mail.example.com", "example.com", strict=False)
    assert not dmarc.aligned("mail.example.com", "example.com", strict=True)
    assert not dmarc.aligned("one.github.io", "two.github.io", strict=False)


def test_public_suffix_list_needs_no_network() -> None:
    """The list ships in the package: organizational domains work with sockets forbidden."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network disabled for this test')\n"
        "socket.socket.connect = refuse; socket.socket.sendto = refuse\n"
        "socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from postvern.emailauth.dmarc import organizational_domain\n"
        "print(organizational_domain('x.y.example.com.au'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "example.com.au", run.stderr
