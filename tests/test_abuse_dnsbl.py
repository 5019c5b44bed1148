"""DNS blocklists against a real DNS server on loopback: listed, not listed, failures."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import dnsserver
from clock import Clock
from dnsserver import DNSTestServer
from postvern import config
from postvern.abuse import DNSBL, Abuse, DNSBLConfigError, Reason
from postvern.abuse.dnsbl import query_name

dns_server = dnsserver.dns_server


@pytest.fixture
async def abuse(tmp_path: Path, dns_server: DNSTestServer) -> AsyncIterator[Abuse]:
    cfg = config.Settings(data_dir=tmp_path)
    cfg.abuse.dnsbl = ["zen.example", "second.example"]
    instance = Abuse(cfg, tmp_path, os.urandom(32), dns_server.resolver(timeout=0.5))
    await instance.start()
    yield instance
    await instance.close()


def test_query_names_follow_rfc_5782() -> None:
    v4 = ipaddress.ip_address("192.0.2.99")
    assert query_name(v4, "zen.example") == "99.2.0.192.zen.example"
    v6 = ipaddress.ip_address("2001:db8::1:2")
    name = query_name(v6, "v6.example")
    assert name.startswith("2.0.0.0.1.0.0.0." + "0." * 16)
    assert name.endswith("8.b.d.0.1.0.0.2.v6.example")
    assert len(name.split(".")) == 32 + 2


async def test_listed_client_is_refused_naming_the_list(
    abuse: Abuse, dns_server: DNSTestServer
) -> None:
    dns_server.add("2.2.0.192.zen.example", "A", "127.0.0.2")
    dns_server.add("2.2.0.192.zen.example", "TXT", "Listed for spam, see https://zen.example/q")
    refused = await abuse.on_connect("192.0.2.2", "smtp")
    assert refused is not None
    assert (refused.code, refused.enhanced_status, refused.reason) == (554, "5.7.1", Reason.LISTED)
    assert "listed at zen.example" in refused.text
    assert "https://zen.example/q" in refused.text
    assert not refused.temporary
    # Only the MX asks blocklists: users on dynamic addresses must reach IMAP and submission.
    assert await abuse.on_connect("192.0.2.2", "imap") is None
    assert await abuse.on_connect("192.0.2.2", "submission") is None


async def test_unlisted_client_passes_after_asking_every_list(
    abuse: Abuse, dns_server: DNSTestServer
) -> None:
    assert await abuse.on_connect("192.0.2.3", "smtp") is None
    asked = set(dns_server.queries)
    assert ("3.2.0.192.zen.example", "A") in asked
    assert ("3.2.0.192.second.example", "A") in asked


async def test_the_listing_list_is_named_and_txt_is_optional(
    abuse: Abuse, dns_server: DNSTestServer
) -> None:
    dns_server.add("4.2.0.192.second.example", "A", "127.0.0.4")
    refused = await abuse.on_connect("192.0.2.4", "smtp")
    assert refused is not None and "listed at second.example" in refused.text


async def test_ipv6_client_is_asked_by_nibbles(abuse: Abuse, dns_server: DNSTestServer) -> None:
    address = ipaddress.ip_address("2001:db8:1::25")
    dns_server.add(query_name(address, "zen.example"), "A", "127.0.0.3")
    refused = await abuse.on_connect("2001:db8:1::25", "smtp")
    assert refused is not None and refused.code == 554
    assert await abuse.on_connect("2001:db8:1::26", "smtp") is None


@pytest.mark.parametrize("mode", ["timeout", "servfail"])
async def test_dns_failure_fails_open_and_is_logged(
    abuse: Abuse, dns_server: DNSTestServer, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    dns_server.add("5.2.0.192.second.example", "A", "127.0.0.2")
    dns_server.fail("5.2.0.192.zen.example", mode=mode)
    caplog.set_level(logging.WARNING, logger="postvern.abuse.dnsbl")
    # The failing list is skipped; the working one still lists the client.
    refused = await abuse.on_connect("192.0.2.5", "smtp")
    assert refused is not None and "second.example" in refused.text
    dns_server.fail("6.2.0.192.zen.example", mode=mode)
    dns_server.fail("6.2.0.192.second.example", mode=mode)
    assert await abuse.on_connect("192.0.2.6", "smtp") is None
    failures = [r for r in caplog.records if "DNSBL lookup failed" in r.getMessage()]
    assert len(failures) >= 3
    assert all(getattr(r, "zone", None) in ("zen.example", "second.example") for r in failures)


@pytest.mark.parametrize("answer", ["127.255.255.254", "127.255.255.255", "192.0.2.200"])
async def test_error_codes_and_non_listing_answers_are_not_listings(
    abuse: Abuse, dns_server: DNSTestServer, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.add("7.2.0.192.zen.example", "A", answer)
    caplog.set_level(logging.WARNING, logger="postvern.abuse.dnsbl")
    assert await abuse.on_connect("192.0.2.7", "smtp") is None
    assert any("DNSBL lookup failed" in r.getMessage() for r in caplog.records)


async def test_hostile_txt_cannot_inject_reply_lines(
    abuse: Abuse, dns_server: DNSTestServer
) -> None:
    dns_server.add("8.2.0.192.zen.example", "A", "127.0.0.2")
    dns_server.add("8.2.0.192.zen.example", "TXT", "bad\r\n250 2.0.0 OK\r\n" + "z" * 600)
    refused = await abuse.on_connect("192.0.2.8", "smtp")
    assert refused is not None
    assert "\r" not in refused.text and "\n" not in refused.text
    assert len(refused.smtp_line()) < 512


async def test_private_addresses_are_never_asked(abuse: Abuse, dns_server: DNSTestServer) -> None:
    for ip in ("10.1.2.3", "192.168.1.1", "127.0.0.1", "fd00::1", "fe80::1"):
        assert await abuse.on_connect(ip, "smtp") is None
    assert dns_server.queries == []


async def test_answers_are_cached_briefly(dns_server: DNSTestServer) -> None:
    clock = Clock()
    dnsbl = DNSBL(dns_server.resolver(timeout=0.5), ["zen.example"], clock=clock)
    dns_server.add("9.2.0.192.zen.example", "A", "127.0.0.2")
    first = await dnsbl.check("192.0.2.9")
    assert first is not None and first.codes == ("127.0.0.2",)
    dns_server.remove("9.2.0.192.zen.example")
    asked = len(dns_server.queries)
    assert await dnsbl.check("192.0.2.9") == first
    assert len(dns_server.queries) == asked
    clock.now += 301
    assert await dnsbl.check("192.0.2.9") is None
    assert len(dns_server.queries) > asked


async def test_failures_are_not_cached(dns_server: DNSTestServer) -> None:
    dnsbl = DNSBL(dns_server.resolver(timeout=0.5), ["zen.example"], clock=Clock())
    dns_server.fail("10.2.0.192.zen.example", mode="servfail")
    assert await dnsbl.check("192.0.2.10") is None
    dns_server.unfail("10.2.0.192.zen.example")
    dns_server.add("10.2.0.192.zen.example", "A", "127.0.0.2")
    assert await dnsbl.check("192.0.2.10") is not None


def test_bad_zone_is_a_configuration_error(dns_server: DNSTestServer) -> None:
    for zone in ("a..example", "single", "x" * 64 + ".example"):
        with pytest.raises(DNSBLConfigError):
            DNSBL(dns_server.resolver(), [zone])


async def test_no_lists_by_default(tmp_path: Path, dns_server: DNSTestServer) -> None:
    instance = Abuse(config.Settings(data_dir=tmp_path), tmp_path, os.urandom(32))
    await instance.start()
    try:
        assert await instance.on_connect("192.0.2.11", "smtp") is None
    finally:
        await instance.close()
    assert dns_server.queries == []
