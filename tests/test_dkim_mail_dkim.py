"""The Mail::DKIM verifier corpus through postvern.emailauth.dkim, keys served by loopback DNS.

Mail::DKIM reports one result per message (the best of its signatures): pass, fail or
invalid (the signature could not be checked: bad tags, bad or missing key, DNS error). The
corpus dates from 2005-2007, so it runs under ``LEGACY_POLICY`` (rsa-sha1, 512-bit keys,
draft signatures, RFC 4871 g=); a second test checks that the default policy refuses what
RFC 8301 forbids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from postvern.dns import Resolver
from postvern.emailauth import dkim

CORPUS = Path("/work/shared/corpora/auth/dkim_mail_dkim")
UNCHECKED = {dkim.Status.PERMERROR, dkim.Status.TEMPERROR, dkim.Status.NEUTRAL}

_DOMAINKEYS = (
    "DomainKeys (RFC 4870, Historic) is not implemented: a DomainKey-Signature is not a "
    "DKIM signature, so the message has none"
)
_DRAFT_00 = (
    "draft-ietf-dkim-base-00 signature without bh=, which no RFC defines; Mail::DKIM's own "
    "test suite skips these too"
)
# Messages whose result differs from Mail::DKIM's, with the result we give and why.
EXCEPTIONS: dict[str, tuple[str, str]] = {
    **{
        name: ("none", _DOMAINKEYS)
        for name in (
            "good_dk_gmail.txt", "good_dk_yahoo.txt", "good_dk_1.txt", "good_dk_2.txt",
            "good_dk_3.txt", "good_dk_4.txt", "good_dk_5.txt", "good_dk_6.txt",
            "good_dk_7.txt", "dk_headers_1.txt", "dk_headers_2.txt", "dk_multiple_1.txt",
            "bad_dk_1.txt", "bad_dk_2.txt", "bad_dk_3.txt", "bad_dk_4.txt", "bad_dk_5.txt",
        )
    },
    **{f"good_ietf00_{n}.txt": ("invalid", _DRAFT_00) for n in range(1, 6)},
}  # fmt: skip


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


def mail_dkim_result(results: list[dkim.Result]) -> str:
    """Mail::DKIM's summary: the best signature's result."""
    statuses = {r.status for r in results}
    if dkim.Status.PASS in statuses:
        return "pass"
    if dkim.Status.FAIL in statuses:
        return "fail"
    return "invalid" if results else "none"


@pytest.fixture(scope="module")
def corpus_dns() -> object:
    with DNSTestServer() as server:
        load_fake_dns(server)
        yield server


def _resolver(server: DNSTestServer) -> Resolver:
    # Short: one key record times out on purpose.
    return server.resolver(timeout=0.3)


async def test_mail_dkim_corpus(corpus_dns: DNSTestServer) -> None:
    resolver = _resolver(corpus_dns)
    rows = expected_results()
    as_upstream, exceptions, wrong = 0, [], []
    for name, expected in rows:
        message = (CORPUS / "corpus" / name).read_bytes()
        results = await dkim.verify(message, resolver, policy=dkim.LEGACY_POLICY)
        got = mail_dkim_result(results)
        if got == "invalid":
            assert {r.status for r in results} <= UNCHECKED | {dkim.Status.POLICY}
        if name in EXCEPTIONS:
            ours, reason = EXCEPTIONS[name]
            exceptions.append(f"{name}: Mail::DKIM {expected}, ours {got} ({reason})")
            if got != ours:
                wrong.append(f"{name}: expected our documented {ours}, got {got}")
        elif got == expected:
            as_upstream += 1
        else:
            wrong.append(f"{name}: expected {expected}, got {got} {[r.reason for r in results]}")
    print(f"Mail::DKIM corpus: {as_upstream}/{len(rows)} as Mail::DKIM expects, ", end="")
    print(f"{len(exceptions)} documented exceptions, {len(wrong)} wrong")
    for line in exceptions:
        print("  EXCEPTION", line)
    assert len(rows) == 79
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
