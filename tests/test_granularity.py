"""The g= key granularity of DomainKeys (RFC 4870 §3.2.3) and RFC 4871 DKIM (§3.6.1): "*"
matches any run of characters. It used to be a regular expression built from g=, which a
hostile key record turned into minutes of backtracking per message (g=*a*a*a*a*a*a*a*a*b
against a long local-part): now one pass per literal piece, the same answers."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from postvern.emailauth import domainkeys
from postvern.emailauth.dkim import key_record_problem
from postvern.emailauth.domainkeys import star_fullmatch

# Short strings over few letters, so pieces repeat and overlap; "." and "+" prove that no
# regular-expression syntax leaks through.
PATTERNS = st.text(alphabet="ab.+*", max_size=10)
TEXTS = st.text(alphabet="ab.+", max_size=12)


def _regex_answer(pattern: str, text: str) -> bool:
    """What the old regular expression said (fast enough on strings this short)."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), text) is not None


@given(PATTERNS, TEXTS)
def test_same_answers_as_the_regular_expression(pattern: str, text: str) -> None:
    assert star_fullmatch(pattern, text) == _regex_answer(pattern, text)


def test_pieces_keep_their_order_and_ends() -> None:
    assert star_fullmatch("jl*g", "jlong")
    assert star_fullmatch("a*a", "aa")
    assert not star_fullmatch("a*a", "a")  # the first and last pieces may not share a char
    assert star_fullmatch("*b*a*", "xbya")
    assert not star_fullmatch("*b*a*", "xayb")
    assert star_fullmatch("**", "")
    assert not star_fullmatch("", "x")


def test_hostile_pattern_against_a_long_local_part() -> None:
    """Twenty stars against 64 characters: the regex took longer than the test suite."""
    hostile = "*a" * 20 + "b"
    assert not domainkeys.granularity_matches(hostile, "a" * 64)
    assert domainkeys.granularity_matches(hostile, "a" * 64 + "b")


def test_dkim_key_record_with_a_hostile_g() -> None:
    """The RFC 4871 path (LEGACY_POLICY) reads g= from the key record and the local-part
    from the signature's i=: both the sender's to choose."""
    record = b"v=DKIM1; k=rsa; p=AAAA; g=" + b"*a" * 20 + b"b"
    signature = {b"d": b"example.org", b"i": b"a" * 64 + b"@example.org"}
    _, problem = key_record_problem(record, b"rsa-sha256", signature, granularity=True)
    assert problem == "i= local-part does not match the key's g="
    signature[b"i"] = b"a" * 64 + b"b@example.org"
    assert key_record_problem(record, b"rsa-sha256", signature, granularity=True) == (
        b"k=rsa; p=AAAA",
        "",
    )
