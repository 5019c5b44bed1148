"""A local URL/domain blocklist, read from a file and re-read when the file changes.

Operators feed known phishing hosts (from a feed, or by hand) into one text file; the
filter checks every URL host of a message against it. One entry per line: a domain (it
and every subdomain match) or a URL prefix (``https://host/path``, matched without the
scheme); ``#`` starts a comment. The file is re-read when its mtime or size changes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from postvern.filters.urls import Url, to_ascii_host

# A blocklist past these sizes is a mistake (or an attack on memory): the file is refused
# and the previous list kept.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ENTRIES = 2_000_000
# Suffixes tried per host, shortest first ("example.com", "c.example.com", ...); a host
# may have 127 labels, nobody blocks a name that deep.
MAX_LABELS_TRIED = 10


class BlocklistError(Exception):
    """The blocklist file could not be read or is over its limits."""


@dataclass(slots=True)
class _Entries:
    domains: frozenset[str] = frozenset()
    prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # host -> paths


def parse_blocklist(text: str) -> _Entries:
    domains: set[str] = set()
    prefixes: dict[str, list[str]] = {}
    for count, line in enumerate(text.splitlines()):
        if count >= MAX_ENTRIES:
            raise BlocklistError("blocklist has too many entries")
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        lowered = entry.lower()
        for scheme in ("https://", "http://", "hxxps://", "hxxp://"):
            if lowered.startswith(scheme):
                lowered = lowered[len(scheme) :]
                break
        host, slash, path = lowered.partition("/")
        host = to_ascii_host(host.strip(".").rpartition("@")[2].split(":")[0])
        if not host:
            continue
        if slash and path:
            prefixes.setdefault(host, []).append("/" + path)
        else:
            domains.add(host)
    return _Entries(frozenset(domains), {h: tuple(p) for h, p in prefixes.items()})


class Blocklist:
    """The list in *path*; :meth:`match` re-reads the file when it changed.

    A file that disappears or fails to parse leaves the last good list in force (and
    :attr:`error` says why), so a bad edit never switches the blocklist off silently.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.error: str | None = None
        self._entries = _Entries()
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def _refresh(self) -> _Entries:
        try:
            st = self.path.stat()
        except OSError:
            self.error = "blocklist file is missing"
            return self._entries
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._entries
        with self._lock:
            if stamp != self._stamp:
                self._load(stamp, st.st_size)
        return self._entries

    def _load(self, stamp: tuple[int, int], size: int) -> None:
        try:
            if size > MAX_FILE_BYTES:
                raise BlocklistError("blocklist file is too large")
            text = self.path.read_bytes().decode("utf-8", "replace")
            self._entries = parse_blocklist(text)
            self.error = None
        except (OSError, BlocklistError) as exc:
            self.error = str(exc) if isinstance(exc, BlocklistError) else "unreadable"
        self._stamp = stamp

    def match(self, url: Url) -> str | None:
        """The entry that blocks *url*, or None."""
        entries = self._refresh()
        return _match_host(entries, url.host, url.path or "/")

    def match_host(self, host: str) -> str | None:
        return _match_host(self._refresh(), to_ascii_host(host.lower().strip(".")), None)

    def __len__(self) -> int:
        entries = self._refresh()
        return len(entries.domains) + sum(len(p) for p in entries.prefixes.values())


def _match_host(entries: _Entries, host: str, path: str | None) -> str | None:
    labels = host.split(".")
    for depth in range(1, min(len(labels), MAX_LABELS_TRIED) + 1):
        candidate = ".".join(labels[-depth:])
        if candidate in entries.domains:
            return candidate
    if path is not None:
        for prefix in entries.prefixes.get(host, ()):
            if path.lower().startswith(prefix):
                return host + prefix
    return None
