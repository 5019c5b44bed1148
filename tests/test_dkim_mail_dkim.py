"""The Mail::DKIM verifier corpus through our DKIM and DomainKeys verifiers, keys on loopback DNS.

Mail::DKIM reports one result per message (the best of its signatures, DKIM-Signature and
DomainKey-Signature alike): pass, fail or invalid (the signature could not be checked: bad
tags, bad or missing key, DNS error). The corpus dates from 2005-2007, so it runs under
``LEGACY_POLICY`` (rsa-sha1, 512-bit keys, draft signatures, RFC 4871 g=); a second test
checks that the default policy refuses what RFC 8301 forbids.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dnsserver import DNSTestServer
from harness import CORPORA
from postvern.dns import Resolver
from postvern.emailauth import dkim, domainkeys

CORPUS = CORPORA / "auth" / "dkim_mail_dkim"
# What Mail::DKIM calls "invalid": the signature could not be checked either way.
UNCHECKED = {"permerror", "temperror", "neutral", "policy"}
EXPECTED_MESSAGES = 79


def load_fake_dns(server: DNSTestServer) -> None:
    """FAKE_DNS.dat: "name value" lines; NXDOMAIN, timeouts and SERVFAIL are spelled out."""
    for line in (CORPUS / "FAKE_DNS.dat").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, value = line.split(None, 1)
        value = value.strip()
        if value == "NXDOMAIN":
            continue
        if value == "~~Query timed out~~":
            server.fail(name, mode="timeout")
        elif value == "~~SERVFAIL~~":
            server.fail(name, mode="servfail")
        else:
            server.add(name, "TXT", "" if value == '""' else value)


def expected_results() -> list[tuple[str, str]]:
    rows = []
    for line in (CORPUS / "expected_results.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, expected, *_ = line.split("\t")
            rows.append((name, expected))
    return rows


def mail_dkim_result(statuses: list[str]) -> str:
    """Mail::DKIM's summary: the best signature's result."""
    if "pass" in statuses:
        return "pass"
    if "fail" in statuses:
        return "fail"
    return "invalid" if statuses else "none"


async def legacy_statuses(message: bytes, resolver: Resolver) -> list[str]:
    """Every DKIM and DomainKeys signature's status, as a 2007 verifier would judge them."""
    dkim_results = await dkim.verify(message, resolver, policy=dkim.LEGACY_POLICY)
    dk_results = await domainkeys.verify(
        message, resolver, min_rsa_bits=dkim.LEGACY_POLICY.min_rsa_bits
    )
    return [str(r.status) for r in dkim_results] + [str(r.status) for r in dk_results]


@pytest.fixture(scope="module")
def corpus_dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        load_fake_dns(server)
        yield server


def _resolver(server: DNSTestServer) -> Resolver:
    # Short: one key record times out on purpose.
    return server.resolver(timeout=0.3)


async def test_mail_dkim_corpus(corpus_dns: DNSTestServer) -> None:
    resolver = _resolver(corpus_dns)
    rows = expected_results()
    as_upstream, wrong = 0, []
    for name, expected in rows:
        statuses = await legacy_statuses((CORPUS / "corpus" / name).read_bytes(), resolver)
        got = mail_dkim_result(statuses)
        if got == "invalid":
            assert set(statuses) <= UNCHECKED, (name, statuses)
        if got == expected:
            as_upstream += 1
        else:
            wrong.append(f"{name}: expected {expected}, got {got} {statuses}")
    print(f"Mail::DKIM corpus: {as_upstream}/{len(rows)} as Mail::DKIM expects")
    assert len(rows) == EXPECTED_MESSAGES
    assert not wrong, "\n".join(wrong)


async def test_dns_failures_are_temperror(corpus_dns: DNSTestServer) -> None:
    resolver = _resolver(corpus_dns)
    for name in ("badkey_14.txt", "badkey_15.txt"):  # key lookup times out / SERVFAILs
        message = (CORPUS / "corpus" / name).read_bytes()
        results = await dkim.verify(message, resolver, policy=dkim.LEGACY_POLICY)
        assert [r.status for r in results] == [dkim.Status.TEMPERROR]


async def test_default_policy_refuses_what_rfc8301_forbids(corpus_dns: DNSTestServer) -> None:
    """What passes only for a 2007 verifier (rsa-sha1, short keys, drafts) does not pass now."""
    resolver = _resolver(corpus_dns)
    refused = kept = 0
    for name, _ in expected_results():
        message = (CORPUS / "corpus" / name).read_bytes()
        legacy = await dkim.verify(message, resolver, policy=dkim.LEGACY_POLICY)
        default = await dkim.verify(message, resolver)
        for old, new in zip(legacy, default, strict=True):
            if old.status is not dkim.Status.PASS:
                assert new.status is not dkim.Status.PASS, (name, new)
            elif old.algorithm == "rsa-sha1" or (
                old.algorithm == "rsa-sha256" and (old.key_bits or 0) < 1024
            ):
                assert new.status is dkim.Status.POLICY or new.reason == "v= is not 1", (name, new)
                refused += 1
            else:
                assert new.status is dkim.Status.PASS or new.reason == "v= is not 1", (name, new)
                kept += new.status is dkim.Status.PASS
    assert refused and kept


async def test_ed25519_corpus_message(corpus_dns: DNSTestServer) -> None:
    message = (CORPUS / "corpus" / "goodkey_ed25519.txt").read_bytes()
    (result,) = await dkim.verify(message, _resolver(corpus_dns))
    assert result.status is dkim.Status.PASS
    assert (result.algorithm, result.domain) == ("ed25519-sha256", "wander.science")
    assert result.key_bits == 256


async def test_draft00_signatures_verify_only_under_the_legacy_policy(
    corpus_dns: DNSTestServer,
) -> None:
    """draft-ietf-dkim-base-00 (no bh=): one hash over headers, body and the signature."""
    resolver = _resolver(corpus_dns)
    message = (CORPUS / "corpus" / "good_ietf00_1.txt").read_bytes()
    (legacy,) = await dkim.verify(message, resolver, policy=dkim.LEGACY_POLICY)
    assert legacy.status is dkim.Status.PASS and "draft-00" in legacy.reason
    # The body is covered by the one hash, so changing it breaks the signature.
    tampered = message.replace(b"lazy dog", b"lazy cat")
    (broken,) = await dkim.verify(tampered, resolver, policy=dkim.LEGACY_POLICY)
    assert broken.status is dkim.Status.FAIL
    (default,) = await dkim.verify(message, resolver)
    assert (default.status, default.reason) == (dkim.Status.PERMERROR, "v= is not 1")


async def test_domainkeys_default_key_floor(corpus_dns: DNSTestServer) -> None:
    """512-bit DomainKeys keys pass only for the legacy measurement; 1024-bit ones always."""
    resolver = _resolver(corpus_dns)
    short = (CORPUS / "corpus" / "good_dk_6.txt").read_bytes()
    (result,) = await domainkeys.verify(short, resolver)
    assert (result.status, result.key_bits) == (domainkeys.Status.POLICY, 512)
    gmail = (CORPUS / "corpus" / "good_dk_gmail.txt").read_bytes()
    (result,) = await domainkeys.verify(gmail, resolver)
    assert (result.status, result.domain, result.sender_field) == (
        domainkeys.Status.PASS,
        "gmail.com",
        "from",
    )
    assert result.testing  # beta._domainkey.gmail.com says t=y
