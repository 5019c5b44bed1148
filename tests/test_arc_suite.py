"""The ValiMail ARC test suite (validation and signing) through postvern.emailauth.arc.

Validation scenarios get their key records from the loopback DNS server. The suite writes
the expected chain status as Pass, Fail or None; three cases leave it empty: chains whose
newest seal already says cv=fail, which RFC 8617 §5.2 step 2 makes a failed chain.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from dnsserver import DNSTestServer
from harness import CORPORA
from postvern.emailauth import arc

SUITE = CORPORA / "auth" / "arc_test_suite" / "tests"
REQUIRED_PASS_RATE = 0.95


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((SUITE / name).read_text()) if doc]


def expected_status(case: dict[str, Any]) -> str:
    return str(case["cv"] or "").strip().lower() or "fail"


async def test_arc_validation_suite() -> None:
    scenarios = load("arc-draft-validation-tests.yml")
    passed, failures = 0, []
    with DNSTestServer() as server:
        resolver = server.resolver()
        for scenario in scenarios:
            server.clear()
            for name, record in (scenario.get("txt-records") or {}).items():
                server.add(name, "TXT", record)
            for name, case in scenario["tests"].items():
                result = await arc.validate(case["message"].encode(), resolver)
                if result.status == expected_status(case):
                    passed += 1
                else:
                    failures.append(f"{name}: expected {expected_status(case)}, got {result}")
    total = passed + len(failures)
    figure = f"ARC validation suite: {passed}/{total} ({100 * passed / total:.2f}%)"
    print(figure)
    for failure in failures:
        print("  FAILED", failure)
    assert total == 171, figure
    assert passed / total >= REQUIRED_PASS_RATE, figure + "\n" + "\n".join(failures)


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_arc_signing_suite() -> None:
    """Same key, time and headers as the suite: byte-for-byte the same signatures."""
    passed, failures = 0, []
    for scenario in load("arc-draft-sign-tests.yml"):
        for name, case in scenario["tests"].items():
            new_set = arc.seal(
                case["message"].encode(),
                scenario["domain"],
                scenario["sel"],
                scenario["privatekey"].encode(),
                case["srv-id"],
                headers=case["sig-headers"].split(":"),
                timestamp=case["t"],
                standard_format=True,
            )
            got = dict.fromkeys(
                ("arc-seal", "arc-message-signature", "arc-authentication-results"), ""
            )
            for field in new_set:
                field_name, _, value = field.decode().partition(":")
                got[field_name.lower()] = _compact(value)
            expected = {
                "arc-seal": _compact(case["AS"]),
                "arc-message-signature": _compact(case["AMS"]),
                "arc-authentication-results": _compact(case["AAR"]),
            }
            if got == expected:
                passed += 1
            else:
                failures.append(name)
    print(f"ARC signing suite: {passed}/{passed + len(failures)} identical")
    assert passed + len(failures) == 17
    assert not failures, failures
