"""The loopback DNS server other tests rely on: zone forms, failure modes, live changes."""

from __future__ import annotations

from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

import dnsserver
from dnsserver import DNSTestServer
from postvern.dns import DNSTempError, DNSTimeout

dns_server = dnsserver.dns_server  # the shared fixture: a fresh server per test


async def ask(server: DNSTestServer, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, server.address[0], port=server.port, timeout=1)


async def test_load_python_zones() -> None:
    zones: dict[str, dict[str, Any]] = {
        "example.test": {
            "MX": [(10, "mx.example.test")],
            "TXT": ["v=spf1 mx -all", ("part one ", "part two")],
            "NS": "ns.example.test",
            "SOA": ("ns.example.test", "hostmaster.example.test", 1, 3600, 600, 86400, 300),
        },
        "mx.example.test": {"A": "192.0.2.25", "AAAA": ["2001:db8::25"]},
        "_submission._tcp.example.test": {"SRV": (0, 1, 587, "mx.example.test")},
    }
    with DNSTestServer(zones=zones) as server:
        resolver = server.resolver()
        assert sorted(await resolver.txt("example.test")) == [
            b"part one part two",
            b"v=spf1 mx -all",
        ]
        assert await resolver.aaaa("mx.example.test") == ["2001:db8::25"]
        srv = await resolver.query("_submission._tcp.example.test", "SRV")
        assert [r.port for r in srv.rdatas] == [587]  # type: ignore[attr-defined]
        soa = await ask(server, "example.test", "SOA")
        assert soa.answer[0][0].minimum == 300


async def test_rcodes_and_flags(dns_server: DNSTestServer) -> None:
    dns_server.add("here.test", "A", "192.0.2.1")
    assert (await ask(dns_server, "here.test", "A")).rcode() == dns.rcode.NOERROR
    missing = await ask(dns_server, "missing.test", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.authority, "negative answers carry an SOA (RFC 2308 §3)"
    nodata = await ask(dns_server, "here.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.flags & dns.flags.RA and not nodata.flags & dns.flags.AD


async def test_failure_for_one_type_only(dns_server: DNSTestServer) -> None:
    dns_server.add("partial.test", "A", "192.0.2.1")
    dns_server.fail("partial.test", "TXT", mode="timeout")
    resolver = dns_server.resolver(timeout=0.2)
    assert await resolver.a("partial.test") == ["192.0.2.1"]
    with pytest.raises(DNSTimeout):
        await resolver.txt("partial.test")


async def test_zones_change_while_running(dns_server: DNSTestServer) -> None:
    resolver = dns_server.resolver()
    assert await resolver.a("live.test") == []
    dns_server.add("live.test", "A", "192.0.2.1")
    assert await resolver.a("live.test") == ["192.0.2.1"]
    dns_server.set("live.test", "A", "192.0.2.2", "192.0.2.3")
    assert sorted(await resolver.a("live.test")) == ["192.0.2.2", "192.0.2.3"]
    dns_server.remove("live.test")
    assert await resolver.a("live.test") == []
    dns_server.fail("live.test")
    with pytest.raises(DNSTempError):
        await resolver.a("live.test")
    dns_server.clear()
    assert await resolver.a("live.test") == []
    assert dns_server.queries == [("live.test", "A")]


async def test_restart_gets_a_new_port_and_stops_answering() -> None:
    server = DNSTestServer(zones={"a.test": {"A": "192.0.2.1"}}).start()
    first = server.port
    resolver = server.resolver(timeout=0.2)
    assert await resolver.a("a.test") == ["192.0.2.1"]
    server.stop()
    with pytest.raises(DNSTempError):
        await resolver.a("a.test")
    server.start()
    try:
        assert await server.resolver().a("a.test") == ["192.0.2.1"]
        assert server.port != 0 and first != 0
    finally:
        server.stop()
