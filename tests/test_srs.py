"""SRS addresses: what we write reverses, and nothing shorter or altered does.

srslib on its own accepts a hash cut to any length the address chooses, so a one-character
hash verifies about once in 38 tries, and our MX would relay the "bounce" anywhere. These
tests forge addresses the way an attacker would and check every one is refused.
"""

from __future__ import annotations

import pytest

from postvern.delivery.srs import HASH_LENGTH, SRS, ForgedSRS

SECRET = b"s" * 32


def test_round_trip() -> None:
    srs = SRS(SECRET)
    rewritten = srs.forward("sender@origin.example", "example.test")
    assert rewritten.lower().startswith("srs0=")
    assert srs.reverse(rewritten) == "sender@origin.example"


def _parts(address: str) -> tuple[str, str, str]:
    local, _, domain = address.partition("@")
    _prefix, hash_, rest = local.split("=", 2)
    return hash_, rest, domain


def test_a_truncated_hash_is_refused_whatever_it_is() -> None:
    """Every one- to three-character prefix of the right hash, and every other character."""
    srs = SRS(SECRET)
    hash_, rest, domain = _parts(srs.forward("victim@target.example", "example.test"))
    assert len(hash_) == HASH_LENGTH
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789+/"
    forged = [f"SRS0={hash_[:n]}={rest}@{domain}" for n in range(1, HASH_LENGTH)]
    forged += [f"SRS0={c}={rest}@{domain}" for c in alphabet]
    for address in forged:
        with pytest.raises(ForgedSRS):
            srs.reverse(address)


def test_an_altered_address_or_another_key_is_refused() -> None:
    srs = SRS(SECRET)
    rewritten = srs.forward("sender@origin.example", "example.test")
    hash_, rest, domain = _parts(rewritten)
    with pytest.raises(ForgedSRS):
        srs.reverse(f"SRS0={hash_}={rest.replace('sender', 'other')}@{domain}")
    with pytest.raises(ForgedSRS):
        SRS(b"x" * 32).reverse(rewritten)
    # Case does not matter (libsrs2 compares hashes without case; some MTAs lower-case).
    assert srs.reverse(f"SRS0={hash_.swapcase()}={rest}@{domain}") == "sender@origin.example"
