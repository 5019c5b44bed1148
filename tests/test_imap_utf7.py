"""Modified UTF-7 (RFC 3501 §5.1.3): round trips, the RFC's example, and every refusal."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postvern.imap import utf7


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        # RFC 3501 §5.1.3: English, Chinese and Japanese in one name.
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("&", "&-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("Gelöschte Elemente", "Gel&APY-schte Elemente"),
        ("☺!", "&Jjo-!"),
        ("📧", "&2D3c5w-"),  # outside the BMP: a UTF-16 surrogate pair
        ("", ""),
        ("plain/ascii", "plain/ascii"),
        ("tab\there", "tab&AAk-here"),  # control characters are base64 too
    ],
)
def test_known_spellings(text: str, wire: str) -> None:
    assert utf7.encode(text) == wire
    assert utf7.decode(wire) == text


@pytest.mark.parametrize(
    "wire",
    [
        "&U,BTFw",  # no closing "-"
        "&AGE-",  # encodes "a": printable ASCII must stand for itself
        "&U,BTFw-&ZeVnLIqe-",  # two adjacent runs must be one
        "&APx-",  # padding bits are not zero
        "&AP-",  # leaves a partial UTF-16 unit
        "&2D0-",  # a lone high surrogate
        "&A*k-",  # not base64
        "caf\u00e9",  # raw 8-bit
        "a\x01b",  # raw control character
        "&AOk=-",  # base64 padding is not part of modified UTF-7
    ],
)
def test_invalid_spellings_are_refused(wire: str) -> None:
    with pytest.raises(utf7.MUTF7Error):
        utf7.decode(wire)


def test_ampersand_run_next_to_shift_is_fine() -> None:
    assert utf7.decode("&-&APw-") == "&ü"


def test_lone_surrogate_cannot_be_encoded() -> None:
    with pytest.raises(utf7.MUTF7Error):
        utf7.encode("\ud800")


@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_round_trip(text: str) -> None:
    wire = utf7.encode(text)
    assert wire.isascii()
    assert utf7.decode(wire) == text


@given(st.text(alphabet="&-ABCDEFGHabcdefgh0123456789+,/ ~é", max_size=24))
def test_decode_never_raises_anything_else(text: str) -> None:
    try:
        decoded = utf7.decode(text)
    except utf7.MUTF7Error:
        return
    # What decodes is canonical: encoding it gives back the same spelling.
    assert utf7.encode(decoded) == text
