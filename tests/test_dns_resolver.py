"""postvern.dns.Resolver against the loopback DNS server (tests/dnsserver.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import dnsserver
from clock import Clock
from dnsserver import DNSTestServer
from postvern.config import DNS, Settings
from postvern.dns import DNSNameError, DNSTempError, DNSTimeout, Resolver
from postvern.dns.cache import TTLCache

dns_server = dnsserver.dns_server  # the shared fixture: a fresh server per test


async def test_address_and_mx_lookups(dns_server: DNSTestServer) -> None:
    dns_server.add("example.test", "MX", (20, "mx2.example.test"), (10, "MX1.Example.Test"))
    dns_server.add("mx1.example.test", "A", "192.0.2.10", "192.0.2.11")
    dns_server.add("mx1.example.test", "AAAA", "2001:db8::10")
    resolver = dns_server.resolver()
    assert await resolver.mx("example.test") == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert sorted(await resolver.a("mx1.example.test")) == ["192.0.2.10", "192.0.2.11"]
    assert await resolver.aaaa("mx1.example.test") == ["2001:db8::10"]
    assert dns_server.port != 53  # a high port works as a nameserver


async def test_null_mx_is_an_empty_host(dns_server: DNSTestServer) -> None:
    dns_server.add("nomail.test", "MX", (0, "."))
    assert await dns_server.resolver().mx("nomail.test") == [(0, "")]


async def test_txt_strings_are_joined_and_long_answers_use_tcp(dns_server: DNSTestServer) -> None:
    dns_server.add("multi.test", "TXT", ("v=spf1 ", "ip4:192.0.2.1 ", "-all"))
    key = "v=DKIM1; k=rsa; p=" + "A" * 1800  # several 255-octet strings, over 1232 octets
    dns_server.add("sel._domainkey.multi.test", "TXT", key)
    resolver = dns_server.resolver()
    assert await resolver.txt("multi.test") == [b"v=spf1 ip4:192.0.2.1 -all"]
    assert await resolver.txt("sel._domainkey.multi.test") == [key.encode()]
    assert ("sel._domainkey.multi.test", "TXT") in dns_server.tcp_queries
    assert ("multi.test", "TXT") not in dns_server.tcp_queries


async def test_nxdomain_and_nodata_are_empty_not_errors(dns_server: DNSTestServer) -> None:
    dns_server.add("a.b.exists.test", "A", "192.0.2.1")
    resolver = dns_server.resolver()
    assert await resolver.txt("nothing.test") == []
    assert await resolver.txt("a.b.exists.test") == []
    nodata = await resolver.query("b.exists.test", "A")  # an empty non-terminal
    assert nodata.rdatas == () and not nodata.nxdomain
    nxdomain = await resolver.query("c.exists.test", "A")
    assert nxdomain.rdatas == () and nxdomain.nxdomain
    assert await resolver.exists("b.exists.test") and await resolver.exists("a.b.exists.test")
    assert not await resolver.exists("c.exists.test")


@pytest.mark.parametrize("mode", ["servfail", "refused"])
async def test_server_failures_are_temporary(dns_server: DNSTestServer, mode: str) -> None:
    dns_server.add("broken.test", "TXT", "x")
    dns_server.fail("broken.test", "TXT", mode=mode)
    resolver = dns_server.resolver()
    with pytest.raises(DNSTempError) as caught:
        await resolver.txt("broken.test")
    assert not isinstance(caught.value, DNSTimeout)
    dns_server.unfail("broken.test", "TXT")
    assert await resolver.txt("broken.test") == [b"x"]  # failures are not cached


async def test_silence_is_a_timeout(dns_server: DNSTestServer) -> None:
    dns_server.fail("slow.test", mode="timeout")
    with pytest.raises(DNSTimeout):
        await dns_server.resolver(timeout=0.2).a("slow.test")


async def test_cname_chains_are_followed_and_loops_fail(dns_server: DNSTestServer) -> None:
    dns_server.add("www.cname.test", "CNAME", "web.cname.test")
    dns_server.add("web.cname.test", "CNAME", "host.cname.test")
    dns_server.add("host.cname.test", "A", "192.0.2.7")
    dns_server.add("loop.cname.test", "CNAME", "LOOP.cname.test")
    resolver = dns_server.resolver()
    assert await resolver.a("www.cname.test") == ["192.0.2.7"]
    with pytest.raises(DNSTempError):
        await resolver.a("loop.cname.test")


async def test_reverse_lookups(dns_server: DNSTestServer) -> None:
    dns_server.add("4.2.0.192.in-addr.arpa", "PTR", "mail.example.test")
    reverse6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    dns_server.add(reverse6, "PTR", "Mail6.Example.Test.")
    resolver = dns_server.resolver()
    assert await resolver.ptr("192.0.2.4") == ["mail.example.test"]
    assert await resolver.ptr("2001:db8::1") == ["mail6.example.test"]
    with pytest.raises(DNSNameError):
        await resolver.ptr("not-an-ip")


async def test_tlsa_records(dns_server: DNSTestServer) -> None:
    digest = bytes(range(32))
    dns_server.add("_25._tcp.mx.example.test", "TLSA", (3, 1, 1, digest))
    answer = await dns_server.resolver().tlsa("_25._tcp.mx.example.test")
    assert [(r.usage, r.selector, r.mtype, r.data) for r in answer.records] == [(3, 1, 1, digest)]
    assert answer.authentic is False
    dns_server.authentic("_25._tcp.mx.example.test")
    assert (await dns_server.resolver().tlsa("_25._tcp.mx.example.test")).authentic


async def test_unicode_names_are_queried_as_a_labels(dns_server: DNSTestServer) -> None:
    dns_server.add("xn--bcher-kva.test", "A", "192.0.2.5")
    assert await dns_server.resolver().a("bücher.test") == ["192.0.2.5"]
    assert ("xn--bcher-kva.test", "A") in dns_server.queries


@pytest.mark.parametrize("name", ["a" * 64 + ".test", "a..test", "", "."])
async def test_impossible_names_are_refused_before_any_query(
    dns_server: DNSTestServer, name: str
) -> None:
    with pytest.raises(DNSNameError):
        await dns_server.resolver().a(name)
    assert dns_server.queries == []


async def test_zone_text(dns_server: DNSTestServer) -> None:
    dns_server.load_zone_text(
        """
        $TTL 300
        @       IN MX 10 mx
        mx      IN A 192.0.2.25
        @       IN TXT "v=spf1 mx -all"
        """,
        origin="zone.test",
    )
    resolver = dns_server.resolver()
    assert await resolver.mx("zone.test") == [(10, "mx.zone.test")]
    assert await resolver.a("mx.zone.test") == ["192.0.2.25"]
    assert await resolver.txt("zone.test") == [b"v=spf1 mx -all"]


async def test_answers_are_cached_for_their_ttl(dns_server: DNSTestServer) -> None:
    clock = Clock()
    resolver = Resolver([dns_server.address], timeout=1.0, cache_size=16, clock=clock)
    dns_server.add("cached.test", "A", "192.0.2.1", ttl=60)
    assert await resolver.a("cached.test") == ["192.0.2.1"]
    dns_server.set("cached.test", "A", "192.0.2.2", ttl=60)
    clock.now += 59
    assert await resolver.a("cached.test") == ["192.0.2.1"]
    assert dns_server.queries.count(("cached.test", "A")) == 1
    clock.now += 2
    assert await resolver.a("cached.test") == ["192.0.2.2"]
    assert dns_server.queries.count(("cached.test", "A")) == 2


async def test_one_name_in_any_case_or_with_the_final_dot_is_one_cache_entry(
    dns_server: DNSTestServer,
) -> None:
    resolver = Resolver([dns_server.address], timeout=1.0, cache_size=16)
    dns_server.add("spelled.test", "A", "192.0.2.7", ttl=300)
    for spelling in ("spelled.test", "Spelled.TEST", "spelled.test."):
        assert await resolver.a(spelling) == ["192.0.2.7"]
    assert dns_server.queries.count(("spelled.test", "A")) == 1
    with pytest.raises(DNSNameError):  # a name that does not parse is refused, never cached
        await resolver.a("bad..name.test")


async def test_zero_ttl_and_disabled_cache_always_ask(dns_server: DNSTestServer) -> None:
    dns_server.add("fresh.test", "A", "192.0.2.1")  # ttl 0
    cached = Resolver([dns_server.address], timeout=1.0, cache_size=16)
    uncached = Resolver([dns_server.address], timeout=1.0, cache_size=0)
    dns_server.add("ttl.test", "A", "192.0.2.1", ttl=300)
    for resolver in (cached, cached, uncached, uncached):
        await resolver.a("fresh.test")
        await uncached.a("ttl.test")
    assert dns_server.queries.count(("fresh.test", "A")) == 4
    assert dns_server.queries.count(("ttl.test", "A")) == 4


async def test_cache_is_bounded_least_recently_used_first(dns_server: DNSTestServer) -> None:
    resolver = Resolver([dns_server.address], timeout=1.0, cache_size=2)
    for name in ("one.test", "two.test", "three.test"):
        dns_server.add(name, "A", "192.0.2.1", ttl=300)
    await resolver.a("one.test")
    await resolver.a("two.test")
    await resolver.a("one.test")  # one is now more recent than two
    await resolver.a("three.test")  # evicts two
    await resolver.a("one.test")
    await resolver.a("two.test")
    counts = {n: dns_server.queries.count((n, "A")) for n in ("one.test", "two.test")}
    assert counts == {"one.test": 1, "two.test": 2}


def test_ttl_cache_unit() -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache(2, clock)
    cache.put("a", 1, ttl=10)
    cache.put("b", 2, ttl=0)  # not stored
    assert cache.get("a") == 1 and cache.get("b") is None
    clock.now += 10
    assert cache.get("a") is None and len(cache) == 0
    with pytest.raises(ValueError):
        TTLCache(-1)


async def test_resolver_from_settings(dns_server: DNSTestServer, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dns=DNS(nameservers=[dns_server.nameserver]))
    dns_server.add("configured.test", "A", "192.0.2.9")
    assert await Resolver.from_settings(settings).a("configured.test") == ["192.0.2.9"]
