"""Mailbox names and lists: LIST and LSUB (RFC 9051 §6.3.9, RFC 5258 LIST-EXTENDED, RFC 6154
SPECIAL-USE, RFC 3348 CHILDREN) and STATUS items, computed from the user's folder rows.

Each user has one personal namespace and nothing else (RFC 2342): there are no shared or
other-users namespaces, so a name can only ever mean a folder in the user's own mailbox file.
Names that look like another namespace ("#shared", "~bob") or a path ("..") are refused at
CREATE and RENAME, so that a client is never misled into thinking it reached someone else's
mail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from postvern.imap.grammar import commands as c
from postvern.imap.grammar.parse import normalise_inbox
from postvern.imap.serialize import ListData
from postvern.store.mailbox import DELIMITER, Folder, FolderStatus

# RFC 2342 namespace prefixes by convention ("#news.", "#shared", "~user"): never folder names.
RESERVED_PREFIXES = ("#", "~")
# Levels that mean "this" and "parent" in a path: harmless in a database, but a name that
# reads like a way out of one's own mailbox is refused rather than stored.
RESERVED_LEVELS = frozenset({".", ".."})
# A pattern is compiled to a regular expression; a bound on its wildcards keeps a hostile
# pattern such as "%*%*%*…" from making matching exponential.
MAX_PATTERN_WILDCARDS = 32


class BadPattern(ValueError):
    """The LIST pattern has too many wildcards to match safely."""


def reserved_name(name: str) -> bool:
    """Whether CREATE or RENAME must refuse ``name`` (see RESERVED_PREFIXES/LEVELS)."""
    return name.startswith(RESERVED_PREFIXES) or any(
        level in RESERVED_LEVELS for level in name.split(DELIMITER)
    )


@lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    """RFC 9051 §6.3.9: "*" matches anything, "%" anything but the hierarchy delimiter."""
    if pattern.count("*") + pattern.count("%") > MAX_PATTERN_WILDCARDS:
        raise BadPattern("too many wildcards in a LIST pattern")
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append(f"[^{re.escape(DELIMITER)}]*")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def full_pattern(reference: str, pattern: str) -> str:
    """Reference and pattern combined (RFC 9051 §6.3.9): a pattern that starts with the
    delimiter is taken from the root; INBOX is matched case-insensitively."""
    if pattern.startswith(DELIMITER) or not reference:
        combined = pattern
    elif reference.endswith(DELIMITER):
        combined = reference + pattern
    else:
        combined = reference + DELIMITER + pattern
    return normalise_inbox(combined)


def matches(pattern: str, name: str) -> bool:
    return _compile(pattern).fullmatch(name) is not None


def _has_children(name: str, names: set[str]) -> bool:
    prefix = name + DELIMITER
    return any(other.startswith(prefix) for other in names)


@dataclass(frozen=True, slots=True)
class ListRequest:
    """What a LIST or LSUB asks for, whichever syntax the client used."""

    patterns: tuple[str, ...]
    subscribed_only: bool = False
    recursive_match: bool = False
    special_use_only: bool = False
    show_subscribed: bool = False
    lsub: bool = False
    childinfo: bool = False

    @classmethod
    def from_list(cls, command: c.List) -> ListRequest:
        patterns = tuple(full_pattern(command.reference, p) for p in command.patterns)
        subscribed = "SUBSCRIBED" in command.selection
        return cls(
            patterns=patterns,
            subscribed_only=subscribed,
            recursive_match="RECURSIVEMATCH" in command.selection,
            special_use_only="SPECIAL-USE" in command.selection,
            show_subscribed=subscribed or command.return_subscribed,
            childinfo=command.extended,
        )

    @classmethod
    def from_lsub(cls, command: c.Lsub) -> ListRequest:
        return cls(
            patterns=(full_pattern(command.reference, command.pattern),),
            subscribed_only=True,
            lsub=True,
        )


def list_folders(request: ListRequest, folders: Sequence[Folder]) -> list[tuple[ListData, Folder]]:
    """The LIST/LSUB answers, each with the folder it names (for LIST-STATUS)."""
    names = {f.name for f in folders}
    out: list[tuple[ListData, Folder]] = []
    for folder in folders:
        if not any(matches(p, folder.name) for p in request.patterns):
            continue
        if request.special_use_only and folder.special_use is None:
            continue
        childinfo: list[str] = []
        if request.subscribed_only and not folder.subscribed:
            # RFC 5258 §3.5: with RECURSIVEMATCH a parent is listed for its subscribed
            # children, saying why in CHILDINFO.
            if not (request.recursive_match and _subscribed_child(folder, folders)):
                continue
            childinfo = ["SUBSCRIBED"]
        attributes = _attributes(folder, names, request)
        data = ListData(
            folder.name,
            attributes,
            DELIMITER,
            childinfo=childinfo if request.childinfo else (),
            lsub=request.lsub,
        )
        out.append((data, folder))
    if request.lsub:
        out += _lsub_parents(request, folders, {d.mailbox for d, _ in out})
    return out


def _subscribed_child(folder: Folder, folders: Iterable[Folder]) -> bool:
    prefix = folder.name + DELIMITER
    return any(f.subscribed and f.name.startswith(prefix) for f in folders)


def _attributes(folder: Folder, names: set[str], request: ListRequest) -> list[str]:
    attributes = ["\\HasChildren" if _has_children(folder.name, names) else "\\HasNoChildren"]
    if request.show_subscribed and folder.subscribed:
        attributes.append("\\Subscribed")
    if folder.special_use is not None:
        attributes.append(folder.special_use)
    return attributes


def _lsub_parents(
    request: ListRequest, folders: Sequence[Folder], listed: set[str]
) -> list[tuple[ListData, Folder]]:
    """RFC 3501 §6.3.9: when "%" stops at a level whose folder is not subscribed but has
    subscribed children, LSUB lists that level as \\Noselect."""
    out: list[tuple[ListData, Folder]] = []
    by_name = {f.name: f for f in folders}
    for folder in folders:
        if not folder.subscribed:
            continue
        parts = folder.name.split(DELIMITER)
        for depth in range(1, len(parts)):
            parent = DELIMITER.join(parts[:depth])
            if parent in listed or parent not in by_name:
                continue
            if any(matches(p, parent) for p in request.patterns):
                listed.add(parent)
                data = ListData(parent, ["\\Noselect"], DELIMITER, lsub=True)
                out.append((data, by_name[parent]))
    return out


def root_answer() -> ListData:
    """RFC 9051 §6.3.9: LIST "" "" asks for the hierarchy delimiter and the root name."""
    return ListData("", ["\\Noselect"], DELIMITER)


def status_items(
    items: Iterable[str], status: FolderStatus, *, append_limit: int
) -> list[tuple[str, int]]:
    """RFC 9051 §6.3.11 STATUS data, with RFC 8438 SIZE, RFC 7162 HIGHESTMODSEQ and RFC 7889
    APPENDLIMIT; RECENT (IMAP4rev1 only) is always 0, since no session has it any more."""
    values = {
        "MESSAGES": status.messages,
        "UIDNEXT": status.uidnext,
        "UIDVALIDITY": status.uidvalidity,
        "UNSEEN": status.unseen,
        "DELETED": status.deleted,
        "SIZE": status.size,
        "HIGHESTMODSEQ": status.highestmodseq,
        "RECENT": 0,
        "APPENDLIMIT": append_limit,
    }
    return [(item, values[item]) for item in items]
