"""SEARCH evaluation (RFC 9051 §6.4.4, RFC 7162 MODSEQ, RFC 5032 WITHIN) against the store.

The criteria tree is evaluated as sets of UIDs, narrowing a candidate set key by key with the
cheapest keys first, in one store worker thread. Each kind of data is loaded in bulk and only
if a key needs it: flags and dates with one query, ENVELOPE fields from the cached JSON, BODY
and TEXT from the full-text index, a substring index (then checked exactly against the
decoded text when there are few candidates; needles of one or two characters, which the
index cannot look up, are matched by that check alone), HEADER from the raw header of the
candidates that are left.
"""

from __future__ import annotations

import datetime
import email.utils
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from postvern.imap import search as s
from postvern.imap.selected import UidMap
from postvern.imap.wire import to_bytes
from postvern.mime.encoded_words import decode_header_value
from postvern.mime.model import Address, Envelope, body_from_json, envelope_from_json
from postvern.mime.text import header_values
from postvern.store.fulltext import index_texts, normalise
from postvern.store.mailbox import Mailbox, MessageInfo, StoreError

# BODY/TEXT candidates from the full-text index are confirmed against the decoded message
# only up to this many (each needs its raw message read and decoded); past it the index's
# substring match stands, as with Dovecot's FTS. The two differ only where SQLite's and
# Python's Unicode folding differ.
EXACT_CHECK_LIMIT = 200
# Relative cost of evaluating each kind of key, to run cheap keys first and hand the
# expensive ones the smallest candidate set.
_COST = {
    s.All: 0,
    s.SequenceTest: 0,
    s.FlagTest: 1,
    s.SizeTest: 1,
    s.ModSeqTest: 1,
    s.AgeTest: 1,
    s.DateTest: 2,
    s.TextContains: 3,
    s.HeaderContains: 4,
}
_ENVELOPE_FIELDS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT"})


@dataclass(frozen=True, slots=True)
class Universe:
    """The messages a search may match: the session's number map less the messages whose
    expunge it has not reported yet, and the saved result that ``$`` stands for."""

    map: UidMap
    excluded: frozenset[int] = frozenset()
    saved_uids: Sequence[int] = ()

    def pairs(self) -> list[tuple[int, int]]:
        """(number, uid) of every message that can match, ascending."""
        excluded = self.excluded
        return [(n, uid) for n, uid in enumerate(self.map, 1) if uid not in excluded]


def fold(text: str) -> str:
    """Case- and accent-insensitive form for substring matching (RFC 9051 §6.4.4 asks for
    case-insensitive matching; accents are folded as the full-text index folds them)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


class MessageData:
    """Per-search lazy loader: metadata and envelopes are fetched once, for many UIDs at a
    time; raw messages one at a time, for the few keys that need them."""

    def __init__(self, box: Mailbox, folder_id: int, universe: Universe) -> None:
        self.box = box
        self.folder_id = folder_id
        self.universe = universe
        self.pairs = universe.pairs()
        self._infos: dict[int, MessageInfo] | None = None
        self._envelopes: dict[int, Envelope] = {}

    @property
    def loaded_infos(self) -> dict[int, MessageInfo] | None:
        return self._infos

    def infos(self) -> dict[int, MessageInfo]:
        if self._infos is None:
            self._infos = {m.uid: m for m in self.box.messages(self.folder_id)}
        return self._infos

    def envelopes(self, uids: Iterable[int]) -> dict[int, Envelope]:
        missing = [u for u in uids if u not in self._envelopes]
        if missing:
            for cached in self.box.structures(self.folder_id, missing):
                self._envelopes[cached.uid] = envelope_from_json(cached.envelope)
        return self._envelopes

    def raw(self, uid: int) -> bytes | None:
        """One raw message, not kept: a search over large mail must not hold it all."""
        try:
            return self.box.raw(self.folder_id, uid)
        except StoreError:  # expunged meanwhile: it simply does not match
            return None


class Evaluator:
    """Evaluates one criteria tree; every method returns the subset of ``candidates`` that
    matches."""

    def __init__(self, data: MessageData) -> None:
        self.data = data
        self.today = datetime.datetime.now(datetime.UTC)

    def run(self, key: s.SearchKey) -> set[int]:
        return self.eval(key, {uid for _, uid in self.data.pairs})

    def eval(self, key: s.SearchKey, candidates: set[int]) -> set[int]:
        if not candidates:
            return candidates
        if isinstance(key, s.And):
            for sub in sorted(key.keys, key=_cost):
                candidates = self.eval(sub, candidates)
            return candidates
        if isinstance(key, s.Or):
            left = self.eval(key.left, candidates)
            return left | self.eval(key.right, candidates - left)
        if isinstance(key, s.Not):
            return candidates - self.eval(key.key, candidates)
        if isinstance(key, s.All):
            return candidates
        if isinstance(key, s.SequenceTest):
            return candidates & self._sequence(key)
        if isinstance(key, s.TextContains):
            return self._text(key, candidates)
        if isinstance(key, s.HeaderContains):
            return self._header(key, candidates)
        if isinstance(key, s.DateTest) and key.sent:
            return self._sent(key, candidates)
        return self._by_info(_info_test(key, self.today), candidates)

    def _by_info(self, test: Callable[[MessageInfo], bool], candidates: set[int]) -> set[int]:
        infos = self.data.infos()
        return {uid for uid in candidates if (info := infos.get(uid)) is not None and test(info)}

    def _sequence(self, key: s.SequenceTest) -> set[int]:
        universe, pairs = self.data.universe, self.data.pairs
        if key.uid:
            ranges = key.sequence.resolve(universe.map.last_uid, universe.saved_uids)
            return {uid for _, uid in pairs if _in(uid, ranges)}
        saved = set(universe.saved_uids)
        numbers = sorted(n for n, u in pairs if u in saved)
        ranges = key.sequence.resolve(len(universe.map), numbers)
        return {uid for number, uid in pairs if _in(number, ranges)}

    def _text(self, key: s.TextContains, candidates: set[int]) -> set[int]:
        field = "text" if key.headers else "body"
        indexed = self.data.box.search_text(self.data.folder_id, field, key.value)
        needle = fold(normalise(key.value))
        if indexed is None:
            if not needle:
                return candidates  # RFC 9051 §6.4.4: every message contains ""
            # A needle of one or two characters has no trigram to look up: each candidate's
            # text is scanned instead. The cost is bounded like the index's: one message at
            # a time, and no more of its text than the index holds (FTS_BODY_CHARS).
            return {uid for uid in candidates if needle in self._decoded_text(uid, key.headers)}
        found = candidates & indexed
        if len(found) > EXACT_CHECK_LIMIT:
            return found
        return {uid for uid in found if needle in self._decoded_text(uid, key.headers)}

    def _decoded_text(self, uid: int, headers: bool) -> str:
        """The message's text as the index sees it, folded like a needle."""
        raw = self.data.raw(uid)
        if raw is None:
            return ""
        body = body_from_json(self.data.box.structures(self.data.folder_id, [uid])[0].structure)
        head, text = index_texts(raw, body)
        return fold(head + " " + text if headers else text)

    def _sent(self, key: s.DateTest, candidates: set[int]) -> set[int]:
        envelopes = self.data.envelopes(candidates)
        out = set()
        for uid in candidates:
            envelope = envelopes.get(uid)
            when = sent_date(envelope) if envelope is not None else None
            if when is not None and _compare(when.date(), key):
                out.add(uid)
        return out

    def _header(self, key: s.HeaderContains, candidates: set[int]) -> set[int]:
        needle = fold(key.value)
        if key.field in _ENVELOPE_FIELDS:
            envelopes = self.data.envelopes(candidates)
            return {
                uid
                for uid in candidates
                if (env := envelopes.get(uid)) is not None
                and _envelope_matches(env, key.field, needle)
            }
        out = set()
        for uid in candidates:
            raw = self.data.raw(uid)
            if raw is None:
                continue
            values = header_values(raw, key.field)
            # RFC 9051 §6.4.4: an empty string matches every message that has the field.
            if values and any(needle in fold(v) for v in values):
                out.add(uid)
        return out


def _cost(key: s.SearchKey) -> int:
    if isinstance(key, s.Not):
        return _cost(key.key)
    if isinstance(key, s.Or | s.And):
        return max(_cost(k) for k in s.walk(key) if not isinstance(k, s.Or | s.And | s.Not))
    return _COST.get(type(key), 5)


def _in(number: int, ranges: list[tuple[int, int]]) -> bool:
    return any(low <= number <= high for low, high in ranges)


def _info_test(key: s.SearchKey, now: datetime.datetime) -> Callable[[MessageInfo], bool]:
    if isinstance(key, s.FlagTest):
        flag = key.flag.lower()
        if flag == "\\recent":
            # Reached only by IMAP4rev2 sessions, which never see \Recent (RFC 9051
            # Appendix E): for IMAP4rev1 sessions the executor rewrites RECENT into a set of
            # the session's recent UIDs before the search runs.
            return lambda info: not key.present
        return lambda info: (flag in (f.lower() for f in info.flags)) == key.present
    if isinstance(key, s.SizeTest):
        if key.larger:
            return lambda info: info.size > key.size
        return lambda info: info.size < key.size
    if isinstance(key, s.ModSeqTest):
        return lambda info: info.modseq >= key.modseq
    if isinstance(key, s.AgeTest):
        limit = now - datetime.timedelta(seconds=key.seconds)
        if key.older:
            return lambda info: info.internaldate <= limit
        return lambda info: info.internaldate >= limit
    if isinstance(key, s.DateTest) and not key.sent:
        # RFC 9051 §6.4.4: the date of the internal date, in its own time zone.
        return lambda info: _compare(info.internaldate.date(), key)
    raise TypeError(f"no metadata test for {type(key).__name__}")


def _compare(day: datetime.date, key: s.DateTest) -> bool:
    if key.relation == "BEFORE":
        return day < key.value
    if key.relation == "ON":
        return day == key.value
    return day >= key.value


def sent_date(envelope: Envelope) -> datetime.datetime | None:
    """The Date: header as a datetime, None when absent or unreadable."""
    if not envelope.date:
        return None
    try:
        return email.utils.parsedate_to_datetime(envelope.date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def decoded(text: str | None) -> str:
    """A header value as stored in ENVELOPE (undecoded), with RFC 2047 words decoded."""
    return "" if not text else decode_header_value(to_bytes(text))


def address_text(address: Address) -> str:
    """``Name <mailbox@host>`` for matching; group markers give their group name."""
    mailbox = address.mailbox or ""
    spec = f"{mailbox}@{address.host}" if address.host else mailbox
    name = decoded(address.name)
    return f"{name} <{spec}>" if name else spec


def _envelope_matches(envelope: Envelope, field: str, needle: str) -> bool:
    if field == "SUBJECT":
        if envelope.subject is None:
            return False
        return needle in fold(decoded(envelope.subject))
    addresses = {
        "FROM": envelope.from_,
        "TO": envelope.to,
        "CC": envelope.cc,
        "BCC": envelope.bcc,
    }[field]
    if not addresses:
        return False
    return any(needle in fold(address_text(a)) for a in addresses)


def matching(data: MessageData, key: s.SearchKey) -> list[tuple[int, int]]:
    """(number, uid) of the messages that match, ascending."""
    found = Evaluator(data).run(key)
    return [(n, uid) for n, uid in data.pairs if uid in found]


def evaluate(
    box: Mailbox, folder_id: int, key: s.SearchKey, universe: Universe
) -> tuple[list[tuple[int, int]], dict[int, MessageInfo] | None]:
    """The matches and, if it was loaded, the metadata (for RFC 7162 MODSEQ results)."""
    data = MessageData(box, folder_id, universe)
    return matching(data, key), data.loaded_infos
