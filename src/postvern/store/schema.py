"""The mailbox database schema and its numbered migrations (run on open, one transaction each).

Folders are rows. A message row points at a body row, so COPY shares the raw bytes instead of
duplicating them; a body is removed with its last reference. The parsed ENVELOPE and
BODYSTRUCTURE are cached in the body row, computed once at insert; the raw bytes sit in a
table of their own, so a folder-wide FETCH ENVELOPE never pages through message bodies.
Expunges are logged with their MODSEQ so QRESYNC can answer VANISHED (RFC 7162 §3.2.10).
The full-text index is a contentless FTS5 table in the same encrypted file
(:mod:`postvern.store.fulltext`).
"""

from __future__ import annotations

import apsw

from postvern.store import fulltext


def _v1(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE meta(
            key TEXT PRIMARY KEY,
            value
        );
        CREATE TABLE folders(
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            special_use TEXT,
            uidvalidity INTEGER NOT NULL,
            uidnext INTEGER NOT NULL DEFAULT 1,
            highestmodseq INTEGER NOT NULL DEFAULT 1,
            subscribed INTEGER NOT NULL DEFAULT 1,
            created INTEGER NOT NULL
        );
        CREATE TABLE bodies(
            id INTEGER PRIMARY KEY,
            size INTEGER NOT NULL,
            envelope TEXT NOT NULL,
            structure TEXT NOT NULL,
            refs INTEGER NOT NULL
        );
        CREATE TABLE raws(
            body_id INTEGER PRIMARY KEY REFERENCES bodies(id) ON DELETE CASCADE,
            raw BLOB NOT NULL
        );
        CREATE TABLE messages(
            folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
            uid INTEGER NOT NULL,
            body_id INTEGER NOT NULL REFERENCES bodies(id),
            modseq INTEGER NOT NULL,
            flags TEXT NOT NULL DEFAULT '',
            internaldate INTEGER NOT NULL,
            tzoffset INTEGER NOT NULL DEFAULT 0,
            size INTEGER NOT NULL,
            crlf_size INTEGER NOT NULL,
            seen INTEGER GENERATED ALWAYS AS (instr(' ' || flags || ' ', ' \\Seen ') > 0) VIRTUAL,
            deleted INTEGER GENERATED ALWAYS AS
                (instr(' ' || flags || ' ', ' \\Deleted ') > 0) VIRTUAL,
            PRIMARY KEY(folder_id, uid)
        ) WITHOUT ROWID;
        CREATE INDEX messages_modseq ON messages(folder_id, modseq);
        CREATE INDEX messages_body ON messages(body_id);
        CREATE TABLE expunged(
            folder_id INTEGER NOT NULL,
            uid INTEGER NOT NULL,
            modseq INTEGER NOT NULL,
            PRIMARY KEY(folder_id, uid)
        ) WITHOUT ROWID;
        CREATE INDEX expunged_modseq ON expunged(folder_id, modseq);
        CREATE VIRTUAL TABLE fts USING fts5(
            headers, body,
            content='', contentless_delete=1,
            tokenize='unicode61 remove_diacritics 2'
        );
        CREATE TABLE spool_imported(
            id TEXT PRIMARY KEY,
            imported INTEGER NOT NULL
        );
        """
    )


def _v2(conn: apsw.Connection) -> None:
    """The word index (unicode61) becomes a trigram index: SEARCH TEXT/BODY match substrings
    (RFC 9051 §6.4.4). The text is derived again from each stored message."""
    fulltext.rebuild(conn)


def _v3(conn: apsw.Connection) -> None:
    """Subscriptions become names of their own: a name stays subscribed after its folder is
    deleted (RFC 9051 §6.3.7: the server SHOULD NOT remove it unilaterally), and LIST
    (SUBSCRIBED) reports it as \\NonExistent (RFC 5258 §3.1)."""
    conn.execute(
        """
        CREATE TABLE subscriptions(name TEXT PRIMARY KEY) WITHOUT ROWID;
        INSERT INTO subscriptions SELECT name FROM folders WHERE subscribed;
        ALTER TABLE folders DROP COLUMN subscribed;
        """
    )


def _v4(conn: apsw.Connection) -> None:
    """RFC 3501 \\Recent: each folder's recent floor, the lowest UID no IMAP4rev1 session
    has been shown as recent yet. Mail stored before this migration is not recent."""
    conn.execute(
        """
        ALTER TABLE folders ADD COLUMN recent_floor INTEGER NOT NULL DEFAULT 1;
        UPDATE folders SET recent_floor = uidnext;
        """
    )


MIGRATIONS = [_v1, _v2, _v3, _v4]
