"""SORT and THREAD (RFC 5256, RFC 5957 DISPLAYFROM/DISPLAYTO): ordering and threading of the
messages a search matched, by the RFC's own rules.

The base subject (§2.1) strips "Re:", "Fwd:", "[list]" blobs and "(fwd)" trailers so that a
reply sorts and threads with its original. THREAD=REFERENCES is the algorithm of §4 (Jamie
Zawinski's), with its steps kept in order and named after them.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from postvern.imap.grammar import commands as c
from postvern.imap.searchexec import (
    MessageData,
    Universe,
    address_text,
    decoded,
    matching,
    sent_date,
)
from postvern.imap.serialize import ThreadNode
from postvern.mime.model import Address, Envelope
from postvern.mime.text import header_values
from postvern.store.mailbox import Mailbox, MessageInfo

_WSP = re.compile(r"[ \t\r\n]+")
# RFC 5256 §5: subj-trailer = "(fwd)" / WSP
_TRAILER = re.compile(r"(?:\(fwd\)|[ \t])+\Z", re.IGNORECASE)
# subj-blob = "[" *BLOBCHAR "]" *WSP;  subj-refwd = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(rf"(?:(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t]+)", re.IGNORECASE)
_LEADING_BLOB = re.compile(_BLOB)
_FWD_HEADER = "[fwd:"
# A Message-ID that appears nowhere, for messages without one (RFC 5256 §4 step 1B).
_MISSING_ID = "<missing-{}@postvern.invalid>"
_MESSAGE_ID = re.compile(r"<[^<>]*>")


def base_subject(subject: str | None) -> tuple[str, bool]:
    """RFC 5256 §2.1: the base subject, and whether the subject marked a reply or forward."""
    text = _WSP.sub(" ", decoded(subject)).strip()
    reply = False
    while True:
        trimmed = _TRAILER.sub("", text)  # step 2
        reply |= trimmed != text and "(fwd)" in text.lower()
        text = trimmed
        while True:  # steps 3-5
            match = _LEADER.match(text)
            if match and match.end() > 0:
                reply |= ":" in match.group(0)
                text = text[match.end() :]
                continue
            blob = _LEADING_BLOB.match(text)
            if blob and text[blob.end() :]:
                text = text[blob.end() :]
                continue
            break
        # step 6: "[fwd: …]" wraps a forwarded subject
        if text.lower().startswith(_FWD_HEADER) and text.endswith("]"):
            text = text[len(_FWD_HEADER) : -1]
            reply = True
            continue
        return text, reply


@dataclass(slots=True)
class Item:
    """What sorting and threading know of one message."""

    number: int
    uid: int
    info: MessageInfo
    envelope: Envelope
    references: list[str] = field(default_factory=list)

    @property
    def date(self) -> datetime.datetime:
        """RFC 5256 §2.2: the sent date, or the internal date when it is missing or invalid."""
        sent = sent_date(self.envelope)
        when = sent or self.info.internaldate
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.astimezone(datetime.UTC)


def casemap(text: str) -> bytes:
    """The sort key of ``text`` under i;ascii-casemap (RFC 4790 §9.2), the collation SORT
    compares strings with (RFC 5256 §3): the UTF-8 octets, with only ASCII letters folded,
    to upper case — so ``_`` and ``[`` sort after the letters, not before them as they would
    after a lower-casing."""
    return text.encode("utf-8", "surrogatepass").upper()


def _first_mailbox(addresses: list[Address]) -> bytes:
    """RFC 5256 §3: the addr-mailbox of the first address (IMAP ENVELOPE's first entry: for
    a group, the group's start, whose addr-mailbox is the group name, as Dovecot sorts)."""
    if not addresses:
        return b""
    return casemap(addresses[0].mailbox or "")


def _display(addresses: list[Address]) -> bytes:
    """RFC 5957 §3: the display name of the first address, else its addr-spec."""
    for address in addresses:
        if address.host is not None:
            name = decoded(address.name).strip()
            return casemap(name or address_text(address))
    return b""


def subject_key(item: Item) -> bytes:
    """RFC 5256 §3 SUBJECT: the base subject (§2.1) under i;ascii-casemap."""
    return casemap(base_subject(item.envelope.subject)[0])


_SORT_KEYS: dict[str, Callable[[Item], Any]] = {
    "ARRIVAL": lambda i: i.info.internaldate,
    "CC": lambda i: _first_mailbox(i.envelope.cc),
    "DATE": lambda i: i.date,
    "FROM": lambda i: _first_mailbox(i.envelope.from_),
    "SIZE": lambda i: i.info.size,
    "SUBJECT": subject_key,
    "TO": lambda i: _first_mailbox(i.envelope.to),
    "DISPLAYFROM": lambda i: _display(i.envelope.from_),
    "DISPLAYTO": lambda i: _display(i.envelope.to),
}


def sort_items(items: Sequence[Item], criteria: Sequence[c.SortCriterion]) -> list[Item]:
    """RFC 5256 §3: by each criterion in turn; ties go to the message number."""
    ordered = sorted(items, key=lambda i: i.number)
    for criterion in reversed(criteria):
        ordered.sort(key=_SORT_KEYS[criterion.key], reverse=criterion.reverse)
    return ordered


# -- THREAD=ORDEREDSUBJECT -----------------------------------------------------------------


def thread_ordered_subject(items: Sequence[Item]) -> list[ThreadNode]:
    """RFC 5256 §4 ORDEREDSUBJECT: group by base subject, each group flat under its first
    message, groups ordered by the date of that first message."""
    groups: dict[bytes, list[Item]] = {}
    for item in sorted(items, key=lambda i: (subject_key(i), i.date, i.number)):
        groups.setdefault(subject_key(item), []).append(item)
    roots = []
    for members in groups.values():
        first, rest = members[0], members[1:]
        roots.append(
            (
                first.date,
                first.number,
                ThreadNode(first.number, [ThreadNode(m.number) for m in rest]),
            )
        )
    roots.sort(key=lambda r: (r[0], r[1]))
    return [node for _, _, node in roots]


# -- THREAD=REFERENCES ---------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Container:
    item: Item | None = None
    parent: _Container | None = None
    children: list[_Container] = field(default_factory=list)

    def reaches(self, other: _Container) -> bool:
        """Whether ``other`` is this container or one of its ancestors."""
        node: _Container | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False

    def adopt(self, child: _Container) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)

    def sort_date(self) -> tuple[datetime.datetime, int]:
        """A dummy sorts by its first child (RFC 5256 §4 step 4)."""
        if self.item is not None:
            return self.item.date, self.item.number
        if self.children:
            return self.children[0].sort_date()
        return datetime.datetime.min.replace(tzinfo=datetime.UTC), 0


def message_ids(text: str | None) -> list[str]:
    return _MESSAGE_ID.findall(text or "")


def thread_references(items: Sequence[Item]) -> list[ThreadNode]:
    """RFC 5256 §4 REFERENCES."""
    table: dict[str, _Container] = {}
    for item in sorted(items, key=lambda i: i.number):
        _link(item, table)
    roots = [node for node in table.values() if node.parent is None]  # step 2
    roots = _prune(roots)  # step 3
    _sort_siblings(roots)  # step 4
    roots = _group_by_subject(roots)  # step 5
    _sort_siblings(roots)  # step 6
    return [_node(root) for root in roots]


def _link(item: Item, table: dict[str, _Container]) -> None:
    """Step 1: the message's container, and the parent chain its references describe."""
    own_ids = message_ids(item.envelope.message_id)
    own_id = own_ids[0] if own_ids else ""
    container = table.get(own_id) if own_id else None
    if container is None or container.item is not None:
        if container is not None or not own_id:
            own_id = _MISSING_ID.format(item.uid)  # step 1B: duplicate or missing
        container = table[own_id] = _Container()
    container.item = item
    chain = item.references or message_ids(item.envelope.in_reply_to)[:1]
    previous: _Container | None = None
    for ref in chain:  # step 1A
        node = table.setdefault(ref, _Container())
        if previous is not None and node.parent is None and not previous.reaches(node):
            previous.adopt(node)
        previous = node
    # Step 1C: the last reference is the parent, unless that would make a loop.
    if container.parent is not None:
        container.parent.children.remove(container)
        container.parent = None
    if previous is not None and previous is not container and not previous.reaches(container):
        previous.adopt(container)


def _prune(nodes: list[_Container]) -> list[_Container]:
    """Step 3: drop empty dummies, promote the children of dummies (not of a root dummy
    with several children, which holds a thread together)."""
    out: list[_Container] = []
    for node in nodes:
        node.children = _prune(node.children)
        for child in node.children:
            child.parent = node
        if node.item is None:
            if not node.children:
                continue
            if node.parent is not None or len(node.children) == 1:
                for child in node.children:
                    child.parent = node.parent
                out.extend(node.children)
                continue
        out.append(node)
    return out


def _sort_siblings(nodes: list[_Container]) -> None:
    nodes.sort(key=_Container.sort_date)
    for node in nodes:
        _sort_siblings(node.children)


def _subject_of(node: _Container) -> tuple[str, bool]:
    item = node.item if node.item is not None else node.children[0].item
    return base_subject(item.envelope.subject if item is not None else None)


def _group_by_subject(roots: list[_Container]) -> list[_Container]:
    """Step 5: threads whose roots share a base subject are merged."""
    table: dict[str, _Container] = {}
    for root in roots:  # 5B: pick the container each subject is filed under
        subject, reply = _subject_of(root)
        if not subject:
            continue
        current = table.get(subject)
        if (
            current is None
            or (current.item is not None and root.item is None)
            or (current.item is not None and _subject_of(current)[1] and not reply)
        ):
            table[subject] = root
    replaced: dict[int, _Container] = {}
    for root in roots:  # 5C: merge
        subject, reply = _subject_of(root)
        target = table.get(subject) if subject else None
        if target is None or target is root or root.parent is not None:
            continue
        if target.item is None and root.item is None:
            for child in list(root.children):
                target.adopt(child)
        elif target.item is None or (reply and not _subject_of(target)[1]):
            target.adopt(root)
        else:
            dummy = _Container()
            replaced[id(target)] = dummy
            dummy.adopt(target)
            dummy.adopt(root)
            table[subject] = dummy
    kept = {id(r) for r in roots if r.parent is None and (r.item is not None or r.children)}
    return [replaced.get(id(r), r) for r in roots if id(r) in kept or id(r) in replaced]


def _node(container: _Container) -> ThreadNode:
    number = container.item.number if container.item is not None else None
    return ThreadNode(number, [_node(child) for child in container.children])


def _items(data: MessageData, command: c.Sort | c.Thread) -> list[Item]:
    """The messages the search matched, with what ordering them needs; numbered by UID
    for the UID forms of the commands."""
    pairs = matching(data, command.search)
    infos = data.infos()
    envelopes = data.envelopes(uid for _, uid in pairs)
    return [
        Item(uid if command.uid else number, uid, infos[uid], envelopes[uid])
        for number, uid in pairs
        if uid in infos and uid in envelopes
    ]


def sort_messages(box: Mailbox, folder_id: int, command: c.Sort, universe: Universe) -> list[int]:
    """SORT in one store worker call: search, load, order."""
    items = _items(MessageData(box, folder_id, universe), command)
    return [item.number for item in sort_items(items, command.criteria)]


def thread_messages(
    box: Mailbox, folder_id: int, command: c.Thread, universe: Universe
) -> list[ThreadNode]:
    """THREAD in one store worker call: search, load, thread."""
    data = MessageData(box, folder_id, universe)
    items = _items(data, command)
    if command.algorithm == "ORDEREDSUBJECT":
        return thread_ordered_subject(items)
    for item in items:
        raw = data.raw(item.uid)
        if raw is not None:
            item.references = message_ids(" ".join(header_values(raw, "References")))
    return thread_references(items)
