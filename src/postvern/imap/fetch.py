"""FETCH (RFC 9051 §6.4.5, RFC 3516 BINARY, RFC 7162 CHANGEDSINCE): message data rendered in
bulk, off the event loop.

A FETCH is planned once (which store data its items need), then rendered in batches inside a
store worker thread: each batch loads metadata, cached ENVELOPE/BODYSTRUCTURE and raw bytes
for many messages in a few queries and returns the finished wire bytes, so a 50,000-message
FETCH costs a few hundred thread hops, never one per message, and the event loop only writes.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from postvern.imap.grammar import commands as c
from postvern.imap.serialize import FetchData, Response
from postvern.imap.wire import WireContext, format_date_time, to_bytes, write_string
from postvern.mime import section as mime_section
from postvern.mime.cte import UnknownTransferEncoding
from postvern.mime.model import BodyPart, body_from_json, envelope_from_json
from postvern.store.mailbox import CachedStructure, Folder, Mailbox, MessageInfo, StoreError

SEEN = "\\Seen"
RECENT = "\\Recent"
# Messages per worker-thread batch when only metadata and cached structures are needed:
# large enough to amortise the thread hop and the SQL, small enough to keep a batch's
# output (~300 bytes per message for FLAGS ENVELOPE) well under a megabyte.
META_BATCH = 1000
# Messages per batch when bodies are read, and the output at which a batch stops early:
# together they bound the message bytes held at once (one message can still be as large as
# APPENDLIMIT allows).
BODY_BATCH = 32
BODY_BATCH_BYTES = 4 * 1024 * 1024
_META_ITEMS = frozenset({"FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})
_STRUCTURE_ITEMS = frozenset({"ENVELOPE", "BODY", "BODYSTRUCTURE"})
_RAW_ITEMS = frozenset({"RFC822", "RFC822.HEADER", "RFC822.TEXT", "BINARY", "BINARY.SIZE"})
# RFC 9051 §6.4.5: the RFC 822 names are aliases of BODY sections, answered under their own
# name; RFC822.HEADER never sets \Seen (it is BODY.PEEK[HEADER]).
_ALIASES = {
    "RFC822": c.Section(),
    "RFC822.HEADER": c.Section(specifier="HEADER"),
    "RFC822.TEXT": c.Section(specifier="TEXT"),
}


class Rendered(Response):
    """Wire bytes produced in a worker thread, queued as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def write(self, out: bytearray, ctx: WireContext) -> None:
        out += self.data


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """The items to send and what the store must supply for them."""

    items: tuple[c.FetchItem, ...]
    sets_seen: bool
    needs_info: bool
    needs_structure: bool
    needs_body_tree: bool
    needs_raw: bool
    fast: bool  # every item is simple enough for the direct renderer

    @classmethod
    def build(cls, items: Sequence[c.FetchItem], *, read_only: bool) -> FetchPlan:
        wanted = list(items)
        sets_seen = not read_only and any(i.sets_seen for i in wanted)
        if sets_seen and not any(i.name == "FLAGS" for i in wanted):
            # RFC 9051 §6.4.5: a \Seen set by this FETCH is reported in the same response.
            wanted.append(c.FetchItem(name="FLAGS"))
        names = {i.name for i in wanted}
        raw = bool(names & _RAW_ITEMS) or any(
            i.name == "BODY" and i.section is not None for i in wanted
        )
        tree = raw or bool(names & {"BODY", "BODYSTRUCTURE"})
        return cls(
            items=tuple(wanted),
            sets_seen=sets_seen,
            needs_info=bool(names & _META_ITEMS) or sets_seen,
            needs_structure=tree or "ENVELOPE" in names,
            needs_body_tree=tree,
            needs_raw=raw,
            fast=names <= _FAST_ITEMS,
        )

    @property
    def batch_size(self) -> int:
        return BODY_BATCH if self.needs_raw else META_BATCH


@dataclass(slots=True)
class BatchResult:
    consumed: int  # how many of the given messages were done (a body batch may stop early)
    data: bytes = b""
    missing: list[int] = field(default_factory=list)  # UIDs expunged meanwhile
    unknown_cte: bool = False
    keywords: set[str] = field(default_factory=set)  # in the FLAGS shown: announce them first


def render_batch(
    box: Mailbox,
    folder: Folder,
    pairs: Sequence[tuple[int, int]],
    plan: FetchPlan,
    ctx: WireContext,
    *,
    changed_since: int | None = None,
    origin: object = None,
    recent: frozenset[int] = frozenset(),
) -> BatchResult:
    """Render ``* n FETCH`` for (number, uid) ``pairs``; runs in a store worker thread.
    ``recent``: the UIDs whose FLAGS show \\Recent (RFC 3501, the session's own)."""
    result = BatchResult(consumed=len(pairs))
    uids = [uid for _, uid in pairs]
    infos: dict[int, MessageInfo] = {}
    if plan.needs_info or changed_since is not None:
        infos = {m.uid: m for m in box.messages(folder.id, uids)}
        if changed_since is not None:
            pairs = [(n, u) for n, u in pairs if u in infos and infos[u].modseq > changed_since]
            uids = [u for _, u in pairs]
        if plan.sets_seen:
            _set_seen(box, folder.id, uids, infos, origin)
        for uid in recent.intersection(infos):
            infos[uid] = replace(infos[uid], flags=(*infos[uid].flags, RECENT))
        if any(item.name == "FLAGS" for item in plan.items):
            flags = {f for u in uids if u in infos for f in infos[u].flags}
            result.keywords = {f for f in flags if not f.startswith("\\")}
    if plan.fast:
        _render_fast(box, folder, pairs, plan, ctx, infos, result)
        return result
    structures: dict[int, CachedStructure] = {}
    if plan.needs_structure:
        structures = {s.uid: s for s in box.structures(folder.id, uids)}
    out = bytearray()
    for index, (number, uid) in enumerate(pairs):
        if len(out) >= BODY_BATCH_BYTES:
            result.consumed = index
            break
        info = infos.get(uid)
        cached = structures.get(uid)
        if (plan.needs_info and info is None) or (plan.needs_structure and cached is None):
            result.missing.append(uid)
            continue
        body = body_from_json(cached.structure) if plan.needs_body_tree and cached else None
        try:
            raw = box.raw(folder.id, uid) if plan.needs_raw else b""
            values = [_value(item, uid, info, cached, body, raw) for item in plan.items]
        except StoreError:
            result.missing.append(uid)
            continue
        except UnknownTransferEncoding:
            result.unknown_cte = True
            continue
        FetchData(number, values).write(out, ctx)
    result.data = bytes(out)
    return result


def _set_seen(
    box: Mailbox, folder_id: int, uids: list[int], infos: dict[int, MessageInfo], origin: object
) -> None:
    unseen = [u for u in uids if u in infos and SEEN not in infos[u].flags]
    if unseen:
        changed = box.store_flags(folder_id, unseen, "add", [SEEN], origin=origin)
        for info in changed.changed:
            infos[info.uid] = info


# -- the direct renderer -------------------------------------------------------------------
# FETCH (FLAGS ENVELOPE) over a whole folder is what every client does first, so its common
# items are written straight to bytes from the cached JSON, without building the Envelope
# dataclass and walking the generic value writer (5-10x faster). It spells exactly what
# postvern.imap.structure and postvern.imap.wire spell; a test holds the two to that.

_FAST_ITEMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ", "ENVELOPE"})
# Text that may stand inside a quoted string as it is (RFC 9051 §4.3): printable US-ASCII
# except the two characters that need escaping. Anything else takes the generic path.
_PLAIN = re.compile(r"[ !#-\[\]-~]*").fullmatch


def _nstring(value: str | None, ctx: WireContext) -> bytes:
    if value is None:
        return b"NIL"
    if _PLAIN(value):
        return b'"' + value.encode("ascii") + b'"'
    out = bytearray()
    write_string(to_bytes(value), out, ctx)
    return bytes(out)


def _addresses(items: list[dict[str, str | None]], ctx: WireContext) -> bytes:
    """RFC 9051 env-from etc.: "(" 1*address ")" with no space between addresses, or NIL."""
    if not items:
        return b"NIL"
    parts = [
        b"(%s %s %s %s)"
        % (
            _nstring(a["name"], ctx),
            _nstring(a["adl"], ctx),
            _nstring(a["mailbox"], ctx),
            _nstring(a["host"], ctx),
        )
        for a in items
    ]
    return b"(" + b"".join(parts) + b")"


def fast_envelope(envelope_json: str, ctx: WireContext) -> bytes:
    """The ENVELOPE value from the cached JSON (RFC 9051 §7.5.2; RFC 3501 §7.4.2: an absent
    Sender or Reply-To is the From)."""
    env = json.loads(envelope_json)
    sender = env["from_"]
    return b" ".join(
        (
            b"(" + _nstring(env["date"], ctx),
            _nstring(env["subject"], ctx),
            _addresses(sender, ctx),
            _addresses(env["sender"] or sender, ctx),
            _addresses(env["reply_to"] or sender, ctx),
            _addresses(env["to"], ctx),
            _addresses(env["cc"], ctx),
            _addresses(env["bcc"], ctx),
            _nstring(env["in_reply_to"], ctx),
            _nstring(env["message_id"], ctx) + b")",
        )
    )


def _render_fast(
    box: Mailbox,
    folder: Folder,
    pairs: Sequence[tuple[int, int]],
    plan: FetchPlan,
    ctx: WireContext,
    infos: dict[int, MessageInfo],
    result: BatchResult,
) -> None:
    envelopes: dict[int, bytes] = {}
    if plan.needs_structure:
        envelopes = _envelopes(box, folder, [uid for _, uid in pairs], ctx)
    out = bytearray()
    for number, uid in pairs:
        info = infos.get(uid)
        envelope = envelopes.get(uid)
        if (plan.needs_info and info is None) or (plan.needs_structure and envelope is None):
            result.missing.append(uid)
            continue
        parts = []
        for item in plan.items:
            name = item.name
            if name == "UID":
                parts.append(b"UID %d" % uid)
            elif name == "ENVELOPE":
                parts.append(b"ENVELOPE " + envelope)  # type: ignore[operator]
            else:
                assert info is not None
                parts.append(_meta_item(name, info))
        out += b"* %d FETCH (" % number + b" ".join(parts) + b")\r\n"
    result.data = bytes(out)


def _meta_item(name: str, info: MessageInfo) -> bytes:
    if name == "FLAGS":
        return b"FLAGS (" + " ".join(info.flags).encode("ascii") + b")"
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % info.size
    if name == "MODSEQ":
        return b"MODSEQ (%d)" % info.modseq
    return b'INTERNALDATE "' + format_date_time(info.internaldate).encode("ascii") + b'"'


# Rendered ENVELOPEs of each unlocked mailbox, the in-memory counterpart of Dovecot's index
# cache: a message's envelope never changes, so it is rendered once per unlock and the
# cached JSON is not read again. It lives as long as the Mailbox object (closed when the
# user's last session ends) and is bounded; past the bound it starts over.
ENVELOPE_CACHE_BYTES = 32 * 1024 * 1024
_CacheKey = tuple[int, int, int, bool]  # folder id, UIDVALIDITY, UID, UTF-8 wire form


class EnvelopeCache:
    def __init__(self) -> None:
        self.values: dict[_CacheKey, bytes] = {}
        self.size = 0

    def put(self, key: _CacheKey, value: bytes) -> None:
        if self.size + len(value) > ENVELOPE_CACHE_BYTES:
            self.values.clear()
            self.size = 0
        self.values[key] = value
        self.size += len(value)


_CACHES: weakref.WeakKeyDictionary[Mailbox, EnvelopeCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def _cache(box: Mailbox) -> EnvelopeCache:
    with _CACHES_LOCK:
        cache = _CACHES.get(box)
        if cache is None:
            cache = _CACHES[box] = EnvelopeCache()
        return cache


def _envelopes(box: Mailbox, folder: Folder, uids: list[int], ctx: WireContext) -> dict[int, bytes]:
    """Rendered ENVELOPE of each UID that still exists, from the cache or the store."""
    cache = _cache(box)
    found: dict[int, bytes] = {}
    missing: list[int] = []
    for uid in uids:
        value = cache.values.get((folder.id, folder.uidvalidity, uid, ctx.utf8))
        if value is None:
            missing.append(uid)
        else:
            found[uid] = value
    if missing:
        for cached in box.structures(folder.id, missing):
            value = fast_envelope(cached.envelope, ctx)
            cache.put((folder.id, folder.uidvalidity, cached.uid, ctx.utf8), value)
            found[cached.uid] = value
    return found


# -- the generic renderer ------------------------------------------------------------------


def _value(
    item: c.FetchItem,
    uid: int,
    info: MessageInfo | None,
    cached: CachedStructure | None,
    body: BodyPart | None,
    raw: bytes,
) -> tuple[str, object]:
    name = item.name
    if name == "UID":
        return name, uid
    if name == "FLAGS":
        assert info is not None
        return name, info.flags
    if name == "INTERNALDATE":
        assert info is not None
        return name, info.internaldate
    if name == "RFC822.SIZE":
        assert info is not None
        return name, info.size
    if name == "MODSEQ":
        assert info is not None
        return name, info.modseq
    if name == "ENVELOPE":
        assert cached is not None
        return name, envelope_from_json(cached.envelope)
    if name in ("BODYSTRUCTURE", "BODY") and item.section is None:
        return name, body
    assert body is not None
    if name in _ALIASES:
        return name, section_bytes(raw, body, _ALIASES[name])
    section = item.section or c.Section()
    if name == "BODY":
        return item.response_name, _partial(section_bytes(raw, body, section), item.partial)
    decoded = mime_section.binary_bytes(raw, body, section.part)
    if name == "BINARY.SIZE":
        return item.response_name, 0 if decoded is None else len(decoded)
    return item.response_name, _partial(decoded, item.partial)


def section_bytes(raw: bytes, body: BodyPart, section: c.Section) -> bytes | None:
    """The octets of a BODY section (RFC 9051 §6.4.5), None if the part does not exist."""
    wanted = mime_section.Section(section.part, section.specifier, section.fields)
    return mime_section.section_bytes(raw, body, wanted)


def _partial(data: bytes | None, partial: tuple[int, int] | None) -> bytes | None:
    """RFC 9051 §6.4.5: <origin.count> takes a substring; past the end it is empty."""
    if data is None or partial is None:
        return data
    origin, count = partial
    return data[origin : origin + count]
