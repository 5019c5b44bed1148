"""The mailbox's full-text index: what text goes in, how it is tokenised, how it is queried.

IMAP SEARCH TEXT and BODY ask whether a message "contains the specified string" (RFC 9051
§6.4.4), case-insensitively: a substring, not a word (``sdfghjk`` is found in ``asdfghjkl``).
An FTS5 index with the ``trigram`` tokenizer answers exactly that at index speed: every
needle of three characters or more is a phrase of its trigrams, and a phrase of consecutive
trigrams matches exactly where the needle occurs (SQLite FTS5 §4.3.4). Shorter needles have
no trigram; :func:`match_query` says so and the caller scans the text instead.

Indexed text and needles go through one :func:`normalise`, so they fold alike:

* case: ``case_sensitive 0`` (Unicode simple case folding, as SQLite's unicode61 does);
* diacritics: ``remove_diacritics 2`` (``café`` matches ``cafe``; the "2" also folds
  characters whose composed form carries several marks — accepted by trigram since SQLite
  3.45);
* compatibility forms: NFKC here, so a ``ﬁ`` ligature or full-width letters match their
  plain spelling, as the exact check in ``imap.searchexec.fold`` (NFKD) would;
* white space: every run (line breaks, tabs, folding) becomes one space, so a needle spelt
  across a line break still matches, as RFC 9051 clients expect of a phrase;
* NUL: becomes a space. A message may hold NULs (SMTP without BINARYMIME cannot forbid them
  in practice); the text after one is indexed and found like any other.

The index is contentless (``content=''``): the text itself is not stored a second time; the
raw message is, and the text is derived from it again when needed.
"""

from __future__ import annotations

import re
import unicodedata

import apsw

from postvern import mime
from postvern.mime.model import BodyPart, body_from_json

TABLE = "fts"
TOKENIZER = "trigram case_sensitive 0 remove_diacritics 2"
# The trigram tokenizer cannot look up a needle shorter than one trigram: such a MATCH
# returns no rows at all (SQLite FTS5 §4.3.4), so a needle shorter than this is scanned.
MIN_INDEXED_CHARS = 3
# Text fed to the full-text index per message: enough for any real mail body; bounded so a
# 50 MB attachment-free text part does not bloat the index.
FTS_BODY_CHARS = 1_000_000
_SPACE = re.compile(r"[\s\x00]+")

CREATE_TABLE = f"""
    CREATE VIRTUAL TABLE {TABLE} USING fts5(
        headers, body,
        content='', contentless_delete=1,
        tokenize='{TOKENIZER}'
    )
"""


def normalise(text: str) -> str:
    """The form both the index and the needles are in (see the module docstring)."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def index_texts(raw: bytes, body: BodyPart) -> tuple[str, str]:
    """(headers, body) text of one message as the index holds it."""
    return (
        normalise(mime.headers_text(raw, body)),
        normalise(mime.body_text(raw, body, FTS_BODY_CHARS)),
    )


def match_query(needle: str) -> str | None:
    """An FTS5 phrase matching ``needle`` as a substring; None if it is too short for the
    index (an empty needle included: it matches every message, RFC 9051 §6.4.4)."""
    text = normalise(needle)
    if len(text) < MIN_INDEXED_CHARS:
        return None
    return '"' + text.replace('"', '""') + '"'


def rebuild(conn: apsw.Connection) -> None:
    """(Re)create the index and fill it from every stored message (a schema migration)."""
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(CREATE_TABLE)
    ids = [int(r[0]) for r in conn.execute("SELECT id FROM bodies ORDER BY id")]
    for body_id in ids:
        # One message at a time: a large mailbox is never held in memory at once.
        row = conn.execute(
            "SELECT b.structure, r.raw FROM bodies b JOIN raws r ON r.body_id=b.id WHERE b.id=?",
            (body_id,),
        ).fetchone()
        if row is None:
            continue
        headers, text = index_texts(bytes(row[1]), body_from_json(str(row[0])))
        conn.execute(
            f"INSERT INTO {TABLE}(rowid, headers, body) VALUES(?, ?, ?)",
            (body_id, headers, text),
        )
