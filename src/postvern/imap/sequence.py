"""Sequence sets (RFC 9051 §9 ``sequence-set``): the ``2,4:7,9:*`` lists that name messages.

A set is kept as the ranges the client wrote, with ``*`` unresolved and ``$`` (RFC 5182
SEARCHRES, the result of the last SAVE) as a flag, because both mean different numbers at
different times; :meth:`SequenceSet.resolve` turns it into concrete ranges once the session
knows the mailbox. :func:`format_numbers` writes the compact form for COPYUID, VANISHED and
ESEARCH ALL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# RFC 9051 §9: nz-number and uniqueid are unsigned 32-bit numbers.
MAX_NUMBER = 4294967295
# A 32-bit number is at most 10 digits; longer runs are refused before int() sees them.
_MAX_DIGITS = 10
STAR = None
"""``*``: the largest number in use, resolved by :meth:`SequenceSet.resolve`."""

Bound = int | None


class SequenceSetError(ValueError):
    """Text that is not a sequence set."""


def _bound(text: str) -> Bound:
    if text == "*":
        return STAR
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_DIGITS or text[0] == "0":
        raise SequenceSetError(f"invalid sequence number {text[:12]!r}")
    number = int(text)
    if number > MAX_NUMBER:
        raise SequenceSetError("sequence number out of range")
    return number


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """Ranges as written (``(lo, hi)``, either order, ``None`` for ``*``) plus ``$``."""

    ranges: tuple[tuple[Bound, Bound], ...] = ()
    saved: bool = False  # "$" — RFC 5182: the set saved by the last SEARCH RETURN (SAVE)

    @classmethod
    def parse(cls, text: str) -> SequenceSet:
        if not text:
            raise SequenceSetError("empty sequence set")
        ranges: list[tuple[Bound, Bound]] = []
        saved = False
        for item in text.split(","):
            if item == "$":
                saved = True
                continue
            low, sep, high = item.partition(":")
            first = _bound(low)
            ranges.append((first, _bound(high) if sep else first))
        return cls(tuple(ranges), saved)

    @classmethod
    def of(cls, numbers: Iterable[int]) -> SequenceSet:
        items = list(numbers)
        return cls.parse(format_numbers(items)) if items else cls()

    def uses_star(self) -> bool:
        return any(STAR in pair for pair in self.ranges)

    def resolve(self, largest: int, saved: Iterable[int] = ()) -> list[tuple[int, int]]:
        """Concrete, sorted, merged ranges, ``*`` meaning ``largest`` and ``$`` meaning ``saved``.

        RFC 9051 §9: a range may be written high to low, and ``*`` stands for the largest
        number in use. Numbers above ``largest`` are kept: for UIDs they simply match nothing.
        """
        pairs: list[tuple[int, int]] = []
        for low, high in self.ranges:
            a = largest if low is STAR else low
            b = largest if high is STAR else high
            lo, hi = min(a, b), max(a, b)
            if hi >= 1:
                pairs.append((max(lo, 1), hi))
        if self.saved:
            pairs.extend((n, n) for n in saved)
        return _merge(pairs)

    def contains(self, number: int, largest: int) -> bool:
        return any(lo <= number <= hi for lo, hi in self.resolve(largest))

    def numbers(self, largest: int, saved: Iterable[int] = ()) -> Iterator[int]:
        """Each number in the set, ascending; the caller bounds ``largest`` (it may be 2³²)."""
        for lo, hi in self.resolve(largest, saved):
            yield from range(lo, hi + 1)

    def __str__(self) -> str:
        items = [_format_range(lo, hi) for lo, hi in self.ranges]
        if self.saved:
            items.append("$")
        return ",".join(items)


def _format_bound(bound: Bound) -> str:
    return "*" if bound is STAR else str(bound)


def _format_range(low: Bound, high: Bound) -> str:
    if low == high:
        return _format_bound(low)
    return f"{_format_bound(low)}:{_format_bound(high)}"


def _merge(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(pairs):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def format_numbers(numbers: Iterable[int], *, sort: bool = False) -> str:
    """The compact form of ``numbers``: runs of consecutive ascending numbers become ``a:b``.

    Order is kept unless ``sort``: RFC 4315 COPYUID pairs the n-th source UID with the n-th
    destination UID, so neither list may be reordered on its own.
    """
    items = sorted(set(numbers)) if sort else list(numbers)
    parts: list[str] = []
    start = prev = None
    for number in items:
        if prev is not None and number == prev + 1:
            prev = number
            continue
        if start is not None:
            parts.append(_format_range(start, prev))
        start = prev = number
    if start is not None:
        parts.append(_format_range(start, prev))
    return ",".join(parts)
