"""The selected mailbox as one session sees it: message numbers, and changes not yet told.

RFC 9051 §7.5.1 lets a server report other sessions' changes only at certain points, so a
session's view lags the store: an expunged message keeps its number until its EXPUNGE (or
VANISHED) has been sent, and a new one has none until EXISTS. :class:`UidMap` holds the
message-number map as runs of consecutive UIDs in two machine-int arrays, a few bytes for a
whole folder that was never expunged in the middle; :class:`SelectedView` keeps the map
and the pending changes, and says what may be sent now.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from postvern.imap.sequence import SequenceSet
from postvern.store.mailbox import Change, Folder

# The system flags every mailbox offers (RFC 9051 §2.3.2); \Recent is gone in IMAP4rev2
# and never stored.
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
# Keywords may be created by STORE and APPEND (RFC 9051 §7.1: "\*" in PERMANENTFLAGS).
NEW_KEYWORDS = "\\*"


class UidMap:
    """Message number ↔ UID, ascending, as runs: ``starts[i]`` is the first UID of run i and
    ``before[i]`` the number of messages in earlier runs (unsigned 32-bit, RFC 9051 §2.3.1.1)."""

    __slots__ = ("_before", "_count", "_starts")

    def __init__(self, uids: Iterable[int] = ()) -> None:
        self._starts = array("I")
        self._before = array("I")
        self._count = 0
        ordered = array("I", uids)
        if ordered:
            self._add_runs(ordered, 0, len(ordered))
            self._count = len(ordered)

    def _add_runs(self, uids: array[int], low: int, high: int) -> None:
        """Split ascending ``uids[low:high]`` into runs by halving: O(runs · log n) steps in
        Python, so a 50,000-message folder never expunged in the middle costs one test."""
        if uids[high - 1] - uids[low] != high - 1 - low:
            middle = (low + high) // 2
            self._add_runs(uids, low, middle)
            self._add_runs(uids, middle, high)
            return
        if self._starts and uids[low] == self._starts[-1] + (low - self._before[-1]):
            return  # continues the previous run
        self._starts.append(uids[low])
        self._before.append(low)

    def __len__(self) -> int:
        return self._count

    @property
    def last_uid(self) -> int:
        """The highest UID in the map, 0 when empty."""
        return self.uid(self._count) if self._count else 0

    def _run_end(self, run: int) -> int:
        """Messages up to and including run ``run``."""
        return self._before[run + 1] if run + 1 < len(self._before) else self._count

    def append(self, uid: int) -> None:
        """Add a UID above every UID in the map (new mail only ever gets a higher UID)."""
        if self._count and uid <= self.last_uid:
            raise ValueError("UIDs must be appended in ascending order")
        if not self._count or uid != self.last_uid + 1:
            self._starts.append(uid)
            self._before.append(self._count)
        self._count += 1

    def uid(self, number: int) -> int:
        """The UID of message ``number`` (1-based)."""
        if not 1 <= number <= self._count:
            raise IndexError(number)
        run = bisect.bisect_right(self._before, number - 1) - 1
        return self._starts[run] + (number - 1 - self._before[run])

    def number(self, uid: int) -> int | None:
        """The message number of ``uid``, or None if it is not in the map."""
        run = bisect.bisect_right(self._starts, uid) - 1
        if run < 0:
            return None
        offset = uid - self._starts[run]
        if self._before[run] + offset >= self._run_end(run):
            return None
        return self._before[run] + offset + 1

    def __iter__(self) -> Iterator[int]:
        for run, start in enumerate(self._starts):
            yield from range(start, start + self._run_end(run) - self._before[run])

    def pairs_by_number(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """(number, uid) for the numbers low..high that exist."""
        low, high = max(low, 1), min(high, self._count)
        number = low
        while number <= high:
            run = bisect.bisect_right(self._before, number - 1) - 1
            run_end = min(self._run_end(run), high)
            first_uid = self._starts[run] + (number - 1 - self._before[run])
            for k in range(run_end - number + 1):
                yield number + k, first_uid + k
            number = run_end + 1

    def pairs_by_uid(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """(number, uid) for the UIDs low..high that are in the map."""
        run = max(bisect.bisect_right(self._starts, low) - 1, 0)
        while run < len(self._starts) and self._starts[run] <= high:
            start = self._starts[run]
            length = self._run_end(run) - self._before[run]
            first = max(low, start)
            last = min(high, start + length - 1)
            for uid in range(first, last + 1):
                yield self._before[run] + (uid - start) + 1, uid
            run += 1

    def remove(self, gone: set[int]) -> None:
        """Drop the given UIDs; the numbers of later messages shift down."""
        if not gone:
            return
        kept = [uid for uid in self if uid not in gone]
        self.__init__(kept)  # type: ignore[misc]


@dataclass(slots=True)
class Pending:
    """Changes made by others (or by this session outside a reporting command) not yet sent."""

    expunged: set[int] = field(default_factory=set)
    appended: list[int] = field(default_factory=list)
    flags: set[int] = field(default_factory=set)
    folder_changed: bool = False  # the folder was renamed or deleted

    def __bool__(self) -> bool:
        return bool(self.expunged or self.appended or self.flags or self.folder_changed)


class SelectedView:
    """The selected folder: its number map (announced messages only) and pending changes."""

    def __init__(
        self,
        folder: Folder,
        uids: Iterable[int],
        *,
        read_only: bool,
        keywords: Iterable[str] = (),
    ) -> None:
        self.folder = folder
        self.read_only = read_only
        self.map = UidMap(uids)
        self.pending = Pending()
        self.highest_modseq = folder.highestmodseq
        # Everything up to this MODSEQ has been accounted for (the base of a resync).
        self.resync_from = folder.highestmodseq
        # The lowest MODSEQ among expunges noted but not yet reported (RFC 9051 §7.5.1 may
        # hold them back), or None.
        self._held_expunge_modseq: int | None = None
        # Keywords announced in FLAGS beyond the system flags: at SELECT every keyword in use
        # in the folder, then each one the session meets before it is shown. The set only
        # grows, so no FLAGS ever leaves out a keyword still set on a message (§7.3.5).
        self.keywords: set[str] = set(keywords)
        self.saved: list[int] = []  # RFC 5182 SEARCHRES: UIDs of the last SAVE
        # RFC 3501 §2.3.2: the UIDs this session is the first to be told of (IMAP4rev1 only).
        self.recent: set[int] = set()

    @property
    def exists(self) -> int:
        return len(self.map)

    def flags_list(self) -> list[str]:
        return [*SYSTEM_FLAGS, *sorted(self.keywords, key=str.lower)]

    def permanent_flags(self) -> list[str]:
        """RFC 9051 §7.1 PERMANENTFLAGS: nothing in a read-only session; otherwise the flags
        announced and any new keyword."""
        if self.read_only:
            return []
        return [*self.flags_list(), NEW_KEYWORDS]

    def learn_keywords(self, flags: Iterable[str]) -> bool:
        """Note keywords the client has not been told about; True if FLAGS must be resent
        before a FETCH that shows them (RFC 9051 §7.3.5)."""
        new = {f for f in flags if not f.startswith("\\")} - self.keywords
        self.keywords |= new
        return bool(new)

    # -- changes from the feed --------------------------------------------------------------

    def note(self, change: Change, *, own_flags: bool) -> None:
        """Record one committed change. ``own_flags``: a flag change this session caused and
        answers itself (STORE without .SILENT), so nothing is pending for it."""
        if change.kind == "folders":
            self.pending.folder_changed = True
            return
        if change.folder_id != self.folder.id:
            return
        self.highest_modseq = max(self.highest_modseq, change.modseq)
        if change.kind == "append":
            last = self.pending.appended[-1] if self.pending.appended else self.map.last_uid
            self.pending.appended.extend(uid for uid in change.uids if uid > last)
        elif change.kind == "expunge":
            fresh = set(change.uids)
            # A message that arrived and left before EXISTS was sent is simply never shown.
            if self.pending.appended:
                self.pending.appended = [u for u in self.pending.appended if u not in fresh]
            shown = {u for u in fresh if self.map.number(u) is not None}
            if shown:
                held = self._held_expunge_modseq
                self._held_expunge_modseq = min(held or change.modseq, change.modseq)
            self.pending.expunged |= shown
            self.pending.flags -= fresh
        elif change.kind == "flags" and not own_flags:
            self.pending.flags.update(change.uids)

    @property
    def reported_modseq(self) -> int:
        """The HIGHESTMODSEQ the client may be told: every change up to it has been reported
        (or is reported with it). An expunge still held back keeps it below that expunge's
        MODSEQ, lest a client that caches it never learn of the expunge (RFC 7162 §3.1.2.1)."""
        if self._held_expunge_modseq is None:
            return self.highest_modseq
        return min(self.highest_modseq, self._held_expunge_modseq - 1)

    def take_appended(self) -> list[int]:
        """Put the new messages into the map; the caller sends EXISTS for ``exists``."""
        new, self.pending.appended = self.pending.appended, []
        for uid in new:
            self.map.append(uid)
        return new

    def take_expunged(self) -> list[tuple[int, int]]:
        """(number, uid) of the expunged messages, highest number first, removed from the map.

        Sent in that order, each EXPUNGE names a number that is still right when the client
        reads it (RFC 9051 §7.5.1: every EXPUNGE renumbers the messages after it).
        """
        gone, self.pending.expunged = self.pending.expunged, set()
        self._held_expunge_modseq = None
        pairs = [(n, uid) for uid in gone if (n := self.map.number(uid)) is not None]
        pairs.sort(reverse=True)
        self.map.remove(gone)
        self.pending.flags -= gone
        self.recent -= gone
        return pairs

    def take_flag_changes(self) -> list[int]:
        """UIDs whose flags changed (those not expunged meanwhile), ascending."""
        changed, self.pending.flags = self.pending.flags, set()
        return sorted(uid for uid in changed if uid not in self.pending.expunged)

    def is_expunged(self, uid: int) -> bool:
        return uid in self.pending.expunged

    # -- naming messages ----------------------------------------------------------------------

    def resolve(self, sequence: SequenceSet, *, uid: bool) -> list[tuple[int, int]]:
        """(number, uid) of the messages a set names, ascending.

        ``*`` is the highest number or UID the client has been told of (RFC 9051 §9); ``$``
        the saved search result (RFC 5182 §2.1). ``n:*`` with n above every UID still names
        the last message, since the range is read either way round (RFC 9051 §6.4.8).
        """
        out: list[tuple[int, int]] = []
        if uid:
            largest = self.map.last_uid
            saved = [u for u in self.saved if self.map.number(u) is not None]
            for low, high in sequence.resolve(largest, saved):
                out.extend(self.map.pairs_by_uid(low, high))
        else:
            saved_numbers = [n for u in self.saved if (n := self.map.number(u)) is not None]
            for low, high in sequence.resolve(len(self.map), saved_numbers):
                out.extend(self.map.pairs_by_number(low, high))
        return out

    def numbers_valid(self, sequence: SequenceSet) -> bool:
        """RFC 9051 §9: a message number above EXISTS is a client error (BAD); ``*`` in an
        empty mailbox names nothing, which is not an error."""
        largest = len(self.map)
        return all(bound is None or bound <= largest for pair in sequence.ranges for bound in pair)
