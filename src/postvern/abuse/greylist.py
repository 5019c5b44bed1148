"""Greylisting (RFC 6647): ask an unknown sender to come back later, and remember who did.

Real MTAs queue and retry a temporary failure; much bulk-sending software does not. The
first message for a triplet (sending network, envelope sender, recipient) is deferred; a
retry after ``delay`` and within ``window`` passes, and the triplet then passes at once
for ``pass_period``, renewed by every message. The decision is a pure function of the
stored entry and the time; where entries live is the store's business.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

# RFC 6647 §4.2 asks for configurable timing without fixing numbers. Five minutes is the
# common minimum (postgrey's default): long enough that ratware gives up, short enough that
# an MTA's first retry (typically after 5-15 minutes) already passes.
DEFAULT_DELAY = 5 * 60.0
# A retry is honoured within a day of the first attempt; MTAs whose retry interval grows
# past that are rare, and a later retry simply starts a fresh entry.
DEFAULT_WINDOW = 24 * 3600.0
# A triplet that passed is let through at once for 36 days, renewed by each message
# (postgrey keeps 35): a monthly newsletter is never delayed again.
DEFAULT_PASS_PERIOD = 36 * 86400.0

_ENTRY = struct.Struct("!dd")


class Decision(enum.Enum):
    ACCEPT = "accept"
    DEFER = "defer"


@dataclass(frozen=True, slots=True)
class GreylistPolicy:
    delay: float = DEFAULT_DELAY
    window: float = DEFAULT_WINDOW
    pass_period: float = DEFAULT_PASS_PERIOD

    def __post_init__(self) -> None:
        if not 0 <= self.delay < self.window or self.pass_period <= 0:
            raise ValueError("greylisting needs 0 <= delay < window and a positive pass period")

    @classmethod
    def from_settings(cls, settings: Any) -> GreylistPolicy:
        """``greylist_delay``, ``greylist_window``, ``greylist_pass_period`` from ``[abuse]``."""
        return cls(
            float(settings.greylist_delay),
            float(settings.greylist_window),
            float(settings.greylist_pass_period),
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """What is remembered of one triplet: its first attempt, and until when it passes."""

    first_seen: float
    passes_until: float = 0.0

    def pack(self) -> bytes:
        return _ENTRY.pack(self.first_seen, self.passes_until)

    @classmethod
    def unpack(cls, data: bytes) -> Entry | None:
        if len(data) != _ENTRY.size:
            return None
        first_seen, passes_until = _ENTRY.unpack(data)
        return cls(first_seen, passes_until)


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    entry: Entry  # to store (unchanged entries may be stored again; it is idempotent)
    keep_until: float  # the entry is useless after this time and may be dropped
    wait: float  # DEFER: seconds until a retry can pass


def decide(entry: Entry | None, now: float, policy: GreylistPolicy) -> Outcome:
    """Greylisting's whole rule: defer the unknown, pass the patient, remember who passed."""
    if entry is not None and entry.passes_until > now:
        return _passed(now, policy)
    if entry is None or now - entry.first_seen > policy.window:
        # First sight, or the earlier attempt was never retried in time: start again.
        fresh = Entry(now)
        return Outcome(Decision.DEFER, fresh, now + policy.window, policy.delay)
    waited = now - entry.first_seen
    if waited < policy.delay:
        # An early retry does not restart the clock: an MTA retrying every minute would
        # otherwise never get through.
        keep = entry.first_seen + policy.window
        return Outcome(Decision.DEFER, entry, keep, policy.delay - waited)
    return _passed(now, policy)


def _passed(now: float, policy: GreylistPolicy) -> Outcome:
    renewed = Entry(now, now + policy.pass_period)
    return Outcome(Decision.ACCEPT, renewed, renewed.passes_until, 0.0)
