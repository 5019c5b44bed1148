"""SPF beyond the openspf suite: RFC 7208's own examples, limits, identities, robustness."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnsserver
from dnsserver import DNSTestServer
from postvern.emailauth import spf

SENDER = "strong-bad@email.example.com"

# RFC 7208 §7.4: <sender> strong-bad@email.example.com, IP 192.0.2.3 (and 2001:db8::cb01).
RFC7208_MACRO_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]

dns_server = dnsserver.dns_server  # the shared fixture: a fresh server per test


@pytest.mark.parametrize(("spec", "expected"), RFC7208_MACRO_EXAMPLES)
async def test_rfc7208_macro_examples(dns_server: DNSTestServer, spec: str, expected: str) -> None:
    expanded = await spf.expand_macros(
        spec, dns_server.resolver(), ip="192.0.2.3", sender=SENDER, domain="email.example.com"
    )
    assert expanded == expected


async def test_rfc7208_ipv6_macro_example(dns_server: DNSTestServer) -> None:
    expanded = await spf.expand_macros(
        "%{ir}.%{v}._spf.%{d2}",
        dns_server.resolver(),
        ip="2001:db8::cb01",
        sender=SENDER,
        domain="email.example.com",
    )
    nibbles = "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert expanded == nibbles + ".ip6._spf.example.com"


async def test_explanation_only_macros(dns_server: DNSTestServer) -> None:
    resolver = dns_server.resolver()
    with pytest.raises(spf.MacroSyntaxError):
        await spf.expand_macros("%{c}.example.com", resolver, ip="192.0.2.3", sender=SENDER,
                                domain="example.com")  # fmt: skip
    text = await spf.expand_macros(
        "%{c} refused by %{r} at %{t}",
        resolver,
        ip="2001:DB8::1",
        sender=SENDER,
        domain="example.com",
        receiver="mx.example.org",
        explanation=True,
    )
    address, _, rest = text.partition(" refused by mx.example.org at ")
    assert address == "2001:db8::1" and rest.isdigit()


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 -all moo",  # unknown mechanism anywhere is a permerror (§4.6)
        "v=spf1 ip4:192.0.2.300",
        "v=spf1 ip4:192.0.2.1/33",
        "v=spf1 ip6:2001:db8::/129",
        "v=spf1 a/024",
        "v=spf1 a:example.com/24/64",
        "v=spf1 mx:",
        "v=spf1 include:",
        "v=spf1 exists",
        "v=spf1 redirect=a.test redirect=b.test",
        "v=spf1 exp=",
        "v=spf1 foo=%q",
        "v=spf1 a:%{x}.test",
        "v=spf1 a:%{d0}.test",
        "v=spf1 a:example.123",
        "v=spf1 +-all",
        "v=spf1 a:exa\tmple.com",
    ],
)
def test_syntax_errors(record: str) -> None:
    with pytest.raises(spf.RecordSyntaxError):
        spf.parse_record(record)


def test_parse_accepts_the_grammar() -> None:
    record = spf.parse_record(
        "v=spf1  +a mx/24//64 ~ptr:Example.COM ?exists:%{ir}.%{l1r+-}._spf.%{d} "
        "ip4:192.0.2.0/24 -ip6:2001:db8::/32 include:_spf.example.com "
        "unknown-mod=%{s}x redirect=_spf.%{d2} exp=explain._spf.%{d} "
    )
    kinds = [(m.qualifier.value, m.kind) for m in record.directives]
    assert kinds == [
        ("pass", "a"), ("pass", "mx"), ("softfail", "ptr"), ("neutral", "exists"),
        ("pass", "ip4"), ("fail", "ip6"), ("pass", "include"),
    ]  # fmt: skip
    assert (record.directives[1].cidr4, record.directives[1].cidr6) == (24, 64)
    assert record.redirect == "_spf.%{d2}" and record.explanation == "explain._spf.%{d}"


def test_select_record() -> None:
    assert spf.select_record([b"other", b"v=spf1 -all"]) == "v=spf1 -all"
    assert spf.select_record([b"v=spf10 -all", b"spf1"]) is None
    with pytest.raises(spf.MultipleRecordsError):
        spf.select_record([b"v=spf1 -all", b"V=SPF1 +all"])
    with pytest.raises(spf.RecordSyntaxError):
        spf.select_record([b"v=spf1 a:\xc3\xa9.test -all"])


async def test_helo_and_mailfrom_identities(dns_server: DNSTestServer) -> None:
    dns_server.add("example.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all")
    dns_server.add("mx.example.test", "TXT", "v=spf1 a -all")
    dns_server.add("mx.example.test", "A", "192.0.2.25")
    resolver = dns_server.resolver()
    result = await spf.verify_mailfrom(
        resolver, ip="2001:db8::5", mail_from="a@example.test", helo="mx.example.test"
    )
    assert (result.status, result.identity, result.domain) == ("pass", "mailfrom", "example.test")
    assert result.mechanism == "ip6:2001:db8::/32"
    bounce = await spf.verify_mailfrom(
        resolver, ip="192.0.2.25", mail_from="", helo="mx.example.test"
    )
    assert (bounce.status, bounce.sender) == ("pass", "postmaster@mx.example.test")
    helo = await spf.verify_helo(resolver, ip="198.51.100.1", helo="mx.example.test")
    assert (helo.status, helo.identity) == ("fail", "helo")
    literal = await spf.verify_helo(resolver, ip="192.0.2.25", helo="[192.0.2.25]")
    assert literal.status == "none"


async def test_ipv4_mapped_client_is_ipv4(dns_server: DNSTestServer) -> None:
    dns_server.add("example.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    result = await spf.verify_mailfrom(
        dns_server.resolver(), ip="::ffff:192.0.2.7", mail_from="a@example.test", helo="h.test"
    )
    assert result.status == "pass"


async def test_dns_mechanism_limit(dns_server: DNSTestServer) -> None:
    """Ten DNS-querying terms are allowed across all includes; the eleventh is a permerror."""
    for i in range(12):
        dns_server.add(f"i{i}.test", "TXT", f"v=spf1 include:i{i + 1}.test")
    dns_server.add("i12.test", "TXT", "v=spf1 +all")
    dns_server.add("at-limit.test", "TXT", "v=spf1 include:i3.test")  # i3..i12 = 10 terms
    resolver = dns_server.resolver()
    at_limit = await spf.verify_mailfrom(
        resolver, ip="192.0.2.1", mail_from="a@at-limit.test", helo="h.test"
    )
    assert at_limit.status == "pass"
    over = await spf.verify_mailfrom(resolver, ip="192.0.2.1", mail_from="a@i1.test", helo="h.test")
    assert over.status == "permerror" and "DNS lookups" in over.reason


async def test_void_lookup_limit(dns_server: DNSTestServer) -> None:
    dns_server.add("two.test", "TXT", "v=spf1 a:n1.test mx:n2.test ?all")
    dns_server.add("three.test", "TXT", "v=spf1 a:n1.test mx:n2.test exists:n3.test ?all")
    resolver = dns_server.resolver()
    two = await spf.verify_mailfrom(resolver, ip="192.0.2.1", mail_from="a@two.test", helo="h")
    three = await spf.verify_mailfrom(resolver, ip="192.0.2.1", mail_from="a@three.test", helo="h")
    assert (two.status, three.status) == ("neutral", "permerror")


async def test_explanation_on_fail(dns_server: DNSTestServer) -> None:
    dns_server.add("example.test", "TXT", "v=spf1 -all exp=why.example.test")
    dns_server.add("why.example.test", "TXT", "%{i} may not send for %{d} (see %{r})")
    result = await spf.verify_mailfrom(
        dns_server.resolver(),
        ip="198.51.100.9",
        mail_from="x@example.test",
        helo="h.test",
        receiver="mx.example.org",
    )
    assert result.status == "fail"
    assert result.explanation == "198.51.100.9 may not send for example.test (see mx.example.org)"


async def test_bad_client_ip_is_none_not_an_exception(dns_server: DNSTestServer) -> None:
    result = await spf.verify_mailfrom(
        dns_server.resolver(), ip="not an ip", mail_from="a@example.test", helo="h.test"
    )
    assert result.status == "none"


record_text = st.text(
    alphabet=st.sampled_from(list("v=spf1 aimpx46:./-+~?%{}_dlrsohvcT0123456789all\x00é")),
    max_size=60,
).map(lambda s: "v=spf1 " + s)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        yield server


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=record_text)
def test_any_record_gives_a_result_never_an_exception(
    fuzz_server: DNSTestServer, record: str
) -> None:
    fuzz_server.set("fuzz.test", "TXT", record.encode("utf-8"))
    result = asyncio.run(
        spf.verify_mailfrom(
            fuzz_server.resolver(timeout=0.5), ip="192.0.2.1", mail_from="a@fuzz.test", helo="h"
        )
    )
    assert result.status in set(spf.Status)
