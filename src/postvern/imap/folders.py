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


def list_folders(
    request: ListRequest, folders: Sequence[Folder], subscriptions: Iterable[str] = ()
) -> list[tuple[ListData, Folder | None]]:
    """The LIST/LSUB answers, each with the folder it names (None for a subscribed name
    whose folder does not exist), in name order."""
    names = {f.name for f in folders}
    subscribed = frozenset(subscriptions)
    if request.subscribed_only:
        return _list_subscribed(request, {f.name: f for f in folders}, names, subscribed)
    out: list[tuple[ListData, Folder | None]] = []
    for folder in folders:
        if not _matches_any(request, folder.name):
            continue
        if request.special_use_only and folder.special_use is None:
            continue
        attributes = _attributes(folder, names, request, folder.subscribed)
        out.append((ListData(folder.name, attributes, DELIMITER), folder))
    return out


def _matches_any(request: ListRequest, name: str) -> bool:
    return any(matches(p, name) for p in request.patterns)


def _list_subscribed(
    request: ListRequest, by_name: dict[str, Folder], names: set[str], subscribed: frozenset[str]
) -> list[tuple[ListData, Folder | None]]:
    """LIST (SUBSCRIBED [RECURSIVEMATCH]) and LSUB: the subscribed names, existing or not,
    and with RECURSIVEMATCH or LSUB the parents of subscribed names.

    RFC 5258 §3.5 (its table repeated in RFC 9051 §6.3.9.4): a name that meets the
    selection criteria is returned with its attributes (\\NonExistent too if its folder is
    gone), and with RECURSIVEMATCH a CHILDINFO ("SUBSCRIBED") if a descendant is subscribed;
    a name that does not meet them is returned, with only \\NonExistent if it does not exist
    and a CHILDINFO, for a subscribed descendant the pattern does not reach — one the
    pattern matches is returned on its own line, so its parent is not returned for it. LSUB
    returns such a parent as \\Noselect (RFC 3501 §6.3.9: "%" stopping above a subscribed
    name).
    """
    parents = request.recursive_match or request.lsub
    candidates = set(subscribed)
    if parents:
        for name in subscribed:
            parts = name.split(DELIMITER)
            candidates.update(DELIMITER.join(parts[:depth]) for depth in range(1, len(parts)))
    out: list[tuple[ListData, Folder | None]] = []
    for name in sorted(candidates):
        if not _matches_any(request, name):
            continue
        folder = by_name.get(name)
        meets = name in subscribed and not (
            request.special_use_only and (folder is None or folder.special_use is None)
        )
        prefix = name + DELIMITER
        below = [s for s in subscribed if s.startswith(prefix)]
        if meets:
            childinfo = bool(below) and request.recursive_match
        elif parents and any(not _matches_any(request, s) for s in below):
            childinfo = True
        else:
            continue
        if request.lsub:
            selectable = meets and folder is not None
            attributes = _attributes(folder, names, request, False) if selectable else []
            attributes = attributes or ["\\Noselect"]
        elif meets:
            attributes = _attributes(folder, names, request, True)
        else:
            attributes = [] if folder is not None else ["\\NonExistent"]
        data = ListData(
            name,
            attributes,
            DELIMITER,
            childinfo=["SUBSCRIBED"] if childinfo and request.childinfo else (),
            lsub=request.lsub,
        )
        out.append((data, folder))
    return out


def _attributes(
    folder: Folder | None, names: set[str], request: ListRequest, subscribed: bool
) -> list[str]:
    """Name attributes: \\NonExistent for a subscribed name without a folder (RFC 5258
    §3.1), \\HasChildren or \\HasNoChildren always (RFC 3348, RFC 5258 §4 CHILDREN), and
    \\Subscribed when asked for (RETURN (SUBSCRIBED) or the SUBSCRIBED selection)."""
    attributes = [] if folder is not None else ["\\NonExistent"]
    if folder is None:
        attributes.append("\\HasNoChildren")  # every folder's parents exist in this store
    else:
        attributes.append(
            "\\HasChildren" if _has_children(folder.name, names) else "\\HasNoChildren"
        )
    if request.show_subscribed and subscribed:
        attributes.append("\\Subscribed")
    if folder is not None and folder.special_use is not None:
        attributes.append(folder.special_use)
    return attributes


def root_answer() -> ListData:
    """RFC 9051 §6.3.9: LIST "" "" asks for the hierarchy delimiter and the root name."""
    return ListData("", ["\\Noselect"], DELIMITER)


def status_items(
    items: Iterable[str], status: FolderStatus, *, append_limit: int
) -> list[tuple[str, int]]:
    """RFC 9051 §6.3.11 STATUS data, with RFC 8438 SIZE, RFC 7162 HIGHESTMODSEQ and RFC 7889
    APPENDLIMIT; RECENT (RFC 3501 only) counts the messages no session has seen as recent."""
    values = {
        "MESSAGES": status.messages,
        "UIDNEXT": status.uidnext,
        "UIDVALIDITY": status.uidvalidity,
        "UNSEEN": status.unseen,
        "DELETED": status.deleted,
        "SIZE": status.size,
        "HIGHESTMODSEQ": status.highestmodseq,
        "RECENT": status.recent,
        "APPENDLIMIT": append_limit,
    }
    return [(item, values[item]) for item in items]
