"""The openspf RFC 7208 test suite, run through postvern.emailauth.spf against real DNS.

Each scenario's zone data is served by the loopback DNS server; every test case runs
``verify_mailfrom`` with the case's HELO, client IP and MAIL FROM. The suite's drivers copy
type-SPF records to TXT unless the name has TXT data ("TXT: NONE" means no TXT at all), and
"TIMEOUT" makes every query for the name that has no data go unanswered.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dnsserver import DNSTestServer
from harness import CORPORA
from postvern.emailauth import spf

SUITE = CORPORA / "auth" / "spf_rfc7208" / "rfc7208-tests.yml"
REQUIRED_PASS_RATE = 0.99
# Lookups a timeout is simulated for; a TIMEOUT name answers the types it has data for.
QUERY_TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "SPF")
# Short, so the suite's deliberate timeouts cost little; answers on loopback take ~1 ms.
RESOLVER_TIMEOUT = 0.3


def _octets(text: str) -> bytes:
    """The suite writes raw octets as "\\xNN" escapes, which YAML reads as code points."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _txt_value(value: Any) -> bytes | tuple[bytes, ...]:
    if isinstance(value, list):
        # A TXT record with no strings cannot be parsed by resolvers (RFC 1035 §3.3.14 wants
        # one or more); one empty string keeps what the suite tests: a record that is no SPF.
        return tuple(_octets(v) for v in value) if value else (b"",)
    return _octets(str(value))


def load_scenario(server: DNSTestServer, zonedata: dict[str, list[Any]]) -> None:
    server.clear()
    for name, entries in zonedata.items():
        records: dict[str, list[Any]] = {}
        timeout = txt_none = False
        for entry in entries:
            if entry == "TIMEOUT":
                timeout = True
                continue
            ((rtype, value),) = entry.items()
            if rtype == "TXT" and value == "NONE":
                txt_none = True
            elif rtype in ("SPF", "TXT"):
                records.setdefault(rtype, []).append(_txt_value(value))
            elif rtype == "MX":
                records.setdefault("MX", []).append((value[0], value[1] or "."))
            else:
                records.setdefault(rtype, []).append(value)
        if "SPF" in records and "TXT" not in records and not txt_none:
            records["TXT"] = records["SPF"]
        records.pop("SPF", None)  # RFC 7208 §3.1: type SPF is no longer queried
        for rtype, values in records.items():
            server.add(name, rtype, *values)
        if timeout:
            for rtype in QUERY_TYPES:
                if rtype not in records:
                    server.fail(name, rtype, mode="timeout")


def _explanation_matches(expected: str, got: str | None) -> bool:
    if expected == "DEFAULT":
        return got is None
    # Case-insensitive: the suite writes %{i} nibbles of IPv6 in upper case where RFC 7208
    # §7.4's own example writes them in lower case (DNS names ignore case either way).
    return got is not None and got.lower() == expected.lower()


def load_suite() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(SUITE.read_text()) if doc]


async def test_rfc7208_suite() -> None:
    scenarios = load_suite()
    passed, failures = 0, []
    with DNSTestServer() as server:
        resolver = server.resolver(timeout=RESOLVER_TIMEOUT)
        for scenario in scenarios:
            load_scenario(server, scenario.get("zonedata") or {})
            for name, case in scenario["tests"].items():
                result = await spf.verify_mailfrom(
                    resolver, ip=case["host"], mail_from=case["mailfrom"], helo=case["helo"]
                )
                expected = case["result"]
                allowed = expected if isinstance(expected, list) else [expected]
                ok = result.status in allowed
                if ok and "explanation" in case and result.status is spf.Status.FAIL:
                    ok = _explanation_matches(str(case["explanation"]), result.explanation)
                if ok:
                    passed += 1
                else:
                    failures.append(
                        f"{name}: expected {allowed} {case.get('explanation', '')!r}, "
                        f"got {result.status} {result.explanation!r} ({result.reason})"
                    )
    total = passed + len(failures)
    figure = f"SPF RFC 7208 suite: {passed}/{total} passed ({100 * passed / total:.2f}%)"
    print(figure)
    for failure in failures:
        print("  FAILED", failure)
    assert total == 203, figure
    assert passed / total >= REQUIRED_PASS_RATE, figure + "\n" + "\n".join(failures)


@pytest.mark.parametrize("name", ["toolonglabel", "nolocalpart", "txttimeout"])
async def test_single_cases_explained(name: str) -> None:
    """A few cases by name, so a regression in a basic path fails loudly on its own."""
    scenarios = load_suite()
    scenario = next(s for s in scenarios if name in s["tests"])
    case = scenario["tests"][name]
    with DNSTestServer() as server:
        load_scenario(server, scenario["zonedata"])
        result = await spf.verify_mailfrom(
            server.resolver(timeout=RESOLVER_TIMEOUT),
            ip=case["host"],
            mail_from=case["mailfrom"],
            helo=case["helo"],
        )
    assert result.status == case["result"]
