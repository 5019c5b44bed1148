"""The mailbox store API that IMAP, POP3 and delivery share."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from postvern import mime
from postvern.crypto import keyslots, seal
from postvern.encdb import WrongKey, open_encrypted
from postvern.mime.model import body_from_json, body_to_json, envelope_from_json, envelope_to_json
from postvern.store.mailbox import (
    BadFlag,
    BadFolderName,
    Change,
    FolderExists,
    FolderInUse,
    Mailbox,
    NoSuchFolder,
    OverQuota,
)
from postvern.store.schema import MIGRATIONS


def msg(subject: str, body: str = "hello", extra: str = "") -> bytes:
    return (
        f"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n{extra}\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def box(tmp_path: Path) -> Mailbox:
    private, _ = seal.generate_keypair()
    b = Mailbox.create(tmp_path / "m.sqlite", keyslots.new_mailbox_key(), private)
    yield b
    b.close()


def test_default_folders_and_special_use(box: Mailbox) -> None:
    names = {f.name: f.special_use for f in box.folders()}
    assert names == {
        "INBOX": None,
        "Drafts": "\\Drafts",
        "Sent": "\\Sent",
        "Archive": "\\Archive",
        "Junk": "\\Junk",
        "Trash": "\\Trash",
    }
    assert box.folder("inbox").name == "INBOX"
    assert box.folder_by_use("\\Junk").name == "Junk"
    validities = [f.uidvalidity for f in box.folders()]
    assert len(set(validities)) == len(validities)


def test_append_fetch_and_cached_structure(box: Mailbox) -> None:
    inbox = box.folder("INBOX")
    when = datetime.datetime(
        2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    raw = msg("first one")
    uid, validity = box.append(inbox.id, raw, ["\\Seen", "$Label1"], when)
    assert (uid, validity) == (1, inbox.uidvalidity)
    assert box.raw(inbox.id, uid) == raw
    (info,) = box.messages(inbox.id)
    assert info.flags == ("$Label1", "\\Seen")
    assert info.internaldate == when and info.size == len(raw)
    (cached,) = box.structures(inbox.id, [uid])
    env = envelope_from_json(cached.envelope)
    assert env.subject == "first one"
    assert env.from_[0].mailbox == "alice" and env.from_[0].host == "example.test"
    body = body_from_json(cached.structure)
    assert (body.type, body.subtype) == ("TEXT", "PLAIN")
    status = box.status(inbox.id)
    assert (status.messages, status.unseen, status.uidnext) == (1, 0, 2)


def test_flags_modseq_and_unchangedsince(box: Mailbox) -> None:
    inbox = box.folder("INBOX")
    for i in range(3):
        box.append(inbox.id, msg(f"m{i}"))
    start = box.folder("INBOX").highestmodseq
    r = box.store_flags(inbox.id, [1, 2], "add", ["\\Flagged"])
    assert [c.uid for c in r.changed] == [1, 2]
    modseq = r.changed[0].modseq
    assert modseq > start and box.folder("INBOX").highestmodseq == modseq
    # no change → no new modseq
    assert box.store_flags(inbox.id, [1], "add", ["\\flagged"]).changed == ()
    # UNCHANGEDSINCE older than message 1's modseq: refused and reported (RFC 7162)
    r = box.store_flags(inbox.id, [1, 3], "add", ["\\Seen"], unchangedsince=start)
    assert r.modified == (1,) and [c.uid for c in r.changed] == [3]
    r = box.store_flags(inbox.id, [1], "replace", ["kw"])
    assert r.changed[0].flags == ("kw",)
    assert [m.uid for m in box.changed_since(inbox.id, modseq)] == [1, 3]
    with pytest.raises(BadFlag):
        box.store_flags(inbox.id, [1], "add", ["\\Bogus"])
    with pytest.raises(BadFlag):
        box.store_flags(inbox.id, [1], "add", ["bad(kw"])


def test_copy_move_expunge_vanished(box: Mailbox) -> None:
    inbox, trash = box.folder("INBOX"), box.folder("Trash")
    for i in range(4):
        box.append(inbox.id, msg(f"m{i}"))
    usage = box.usage()
    pairs, validity = box.copy(inbox.id, [2, 3, 99], trash.id)
    assert pairs == [(2, 1), (3, 2)] and validity == trash.uidvalidity
    assert box.raw(trash.id, 1) == box.raw(inbox.id, 2)
    assert box.usage() > usage
    before = box.folder("INBOX").highestmodseq
    pairs, _ = box.move(inbox.id, [1], box.folder("Archive").id)
    assert pairs == [(1, 1)]
    assert box.uids(inbox.id) == [2, 3, 4]
    assert box.vanished_since(inbox.id, before) == [1]
    box.store_flags(inbox.id, [3, 4], "add", ["\\Deleted"])
    assert box.expunge(inbox.id, [4]) == [4]  # UID EXPUNGE only touches the given UIDs
    assert box.expunge(inbox.id) == [3]
    assert box.uids(inbox.id) == [2]
    # bodies shared by copies survive until the last reference goes
    box.store_flags(inbox.id, [2], "add", ["\\Deleted"])
    box.expunge(inbox.id)
    assert box.raw(trash.id, 1).startswith(b"From: Alice")


def test_quota(box: Mailbox) -> None:
    inbox = box.folder("INBOX")
    raw = msg("q", "x" * 1000)
    box.append(inbox.id, raw, quota=2500)
    box.append(inbox.id, raw, quota=2500)
    with pytest.raises(OverQuota):
        box.append(inbox.id, raw, quota=2500)
    with pytest.raises(OverQuota):
        box.copy(inbox.id, [1], box.folder("Trash").id, quota=2500)
    assert box.usage() == 2 * len(raw)


def test_search_text(box: Mailbox) -> None:
    inbox = box.folder("INBOX")
    box.append(inbox.id, msg("Quarterly report", "The numbers are excellent."))
    box.append(inbox.id, msg("Lunch", "Café at noon?"))
    assert box.search_text(inbox.id, "text", "quarterly") == {1}
    assert box.search_text(inbox.id, "body", "quarterly") == set()
    assert box.search_text(inbox.id, "body", "EXCELL") == {1}  # prefix match
    assert box.search_text(inbox.id, "body", "cafe") == {2}  # diacritics folded
    assert box.search_text(inbox.id, "headers", "lunch") == {2}
    assert box.search_text(inbox.id, "text", "numbers are") == {1}


def test_folders_create_rename_delete(box: Mailbox) -> None:
    box.create_folder("Projects/2024/Q1")
    assert {"Projects", "Projects/2024", "Projects/2024/Q1"} <= {f.name for f in box.folders()}
    with pytest.raises(FolderExists):
        box.create_folder("Projects/2024")
    for bad in ("", "a//b", "/a", "a/", "x*y", "x%y", "tab\there", "a" * 300):
        with pytest.raises(BadFolderName):
            box.create_folder(bad)
    q1 = box.folder("Projects/2024/Q1")
    box.append(q1.id, msg("in q1"))
    box.rename_folder("Projects", "Work/Old")
    moved = box.folder("Work/Old/2024/Q1")
    assert moved.id == q1.id and moved.uidvalidity != q1.uidvalidity
    assert box.uids(moved.id) == [1]
    with pytest.raises(NoSuchFolder):
        box.folder("Projects")
    with pytest.raises(FolderInUse):
        box.delete_folder("Work/Old")
    with pytest.raises(FolderInUse):
        box.delete_folder("INBOX")
    box.delete_folder("Work/Old/2024/Q1")
    assert box.usage() == 0
    # renaming INBOX moves its messages and leaves an empty INBOX
    inbox = box.folder("INBOX")
    box.append(inbox.id, msg("a"))
    box.rename_folder("INBOX", "Old Inbox")
    assert box.uids(inbox.id) == [] and box.uids(box.folder("Old Inbox").id) == [1]


def test_change_feed_reports_after_commit(box: Mailbox) -> None:
    seen: list[Change] = []
    cancel = box.subscribe(seen.append)
    inbox = box.folder("INBOX")
    box.append(inbox.id, msg("a"), origin="s1")
    box.store_flags(inbox.id, [1], "add", ["\\Deleted"], origin="s2")
    box.expunge(inbox.id)
    assert [(c.kind, c.uids, c.origin) for c in seen] == [
        ("append", (1,), "s1"),
        ("flags", (1,), "s2"),
        ("expunge", (1,), None),
    ]
    cancel()
    box.append(inbox.id, msg("b"))
    assert len(seen) == 3


def test_wrong_key_refused(tmp_path: Path) -> None:
    private, _ = seal.generate_keypair()
    key = keyslots.new_mailbox_key()
    Mailbox.create(tmp_path / "m.sqlite", key, private).close()
    with pytest.raises(WrongKey):
        Mailbox.open(tmp_path / "m.sqlite", keyslots.new_mailbox_key())
    with Mailbox.open(tmp_path / "m.sqlite", key) as b:
        assert b.folder("INBOX").name == "INBOX"
    assert os.path.getsize(tmp_path / "m.sqlite") > 0


def test_search_text_matches_substrings(box: Mailbox) -> None:
    """RFC 9051 §6.4.4: TEXT/BODY "contains the specified string", not a word of it."""
    inbox = box.folder("INBOX")
    box.append(inbox.id, msg("Keys", "asdfghjkl qwertyuiop\r\nzxcv Bnm\r\n"))
    box.append(inbox.id, msg("Other", "nothing to see"))
    assert box.search_text(inbox.id, "body", "sdfghjk") == {1}  # inside a word
    assert box.search_text(inbox.id, "body", "SDFG") == {1}  # case-insensitive
    assert box.search_text(inbox.id, "body", "iop zxcv b") == {1}  # across a line break
    assert box.search_text(inbox.id, "text", "eys") == {1}  # in a header
    assert box.search_text(inbox.id, "body", "eys") == set()
    assert box.search_text(inbox.id, "body", 'a "quote') == set()  # quotes are literal text
    # One or two characters have no trigram: the caller is told to scan instead.
    assert box.search_text(inbox.id, "body", "kl") is None


def schema1_mailbox(path: Path, key: bytes, raws: list[bytes]) -> None:
    """A mailbox file as schema 1 left it (the word index), written with plain SQL."""
    conn = open_encrypted(path, key, MIGRATIONS[:1], create=True)
    with conn:
        conn.execute(
            "INSERT INTO folders(id, name, uidvalidity, uidnext, created)"
            " VALUES(1, 'INBOX', 1, ?, 0)",
            (len(raws) + 1,),
        )
        for uid, raw in enumerate(raws, 1):
            envelope, body = mime.describe(raw)
            conn.execute(
                "INSERT INTO bodies VALUES(?, ?, ?, ?, 1)",
                (uid, len(raw), envelope_to_json(envelope), body_to_json(body)),
            )
            conn.execute("INSERT INTO raws VALUES(?, ?)", (uid, raw))
            conn.execute(
                "INSERT INTO messages(folder_id, uid, body_id, modseq, internaldate, size,"
                " crlf_size) VALUES(1, ?, ?, 1, 0, ?, ?)",
                (uid, uid, len(raw), len(raw)),
            )
            conn.execute(
                "INSERT INTO fts(rowid, headers, body) VALUES(?, ?, ?)",
                (uid, mime.headers_text(raw), mime.body_text(raw, body)),
            )
    conn.close()


def test_migration_rebuilds_the_index_as_substrings(tmp_path: Path) -> None:
    """A mailbox made with the word index (schema 1) finds substrings once reopened."""
    key = keyslots.new_mailbox_key()
    path = tmp_path / "old.sqlite"
    schema1_mailbox(path, key, [msg("Keys", "asdfghjkl"), msg("Café", "crème brûlée")])
    with Mailbox.open(path, key) as box:
        inbox = box.folder("INBOX")
        assert box.search_text(inbox.id, "body", "sdfghjk") == {1}
        assert box.search_text(inbox.id, "body", "creme brul") == {2}
        assert box.search_text(inbox.id, "headers", "afe") == {2}
