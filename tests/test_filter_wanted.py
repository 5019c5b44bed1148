"""Wanted-mail evidence: verified list posts, replies to the user, correspondents; learned
from the Sent folder inside the encrypted mailbox and applied when the spool is imported."""

from __future__ import annotations

import asyncio

import pytest

from harness import DataDir, services
from postvern.filters import AuthSummary, ScanContext, analyse, decide
from postvern.filters.content import read_content
from postvern.filters.learning import CORRESPONDENCE_BLOB, JunkLearner
from postvern.filters.verdict import Hit
from postvern.filters.wanted import (
    Authenticated,
    Correspondence,
    CorrespondenceError,
    check_wanted,
)
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"
AUTHSERV = "mx.example.test"


def sent(to: str, message_id: str) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: Carol <{to}>\r\nCc: dave@example.org\r\n"
        f"Subject: plans\r\nMessage-ID: <{message_id}>\r\n\r\nSee you there.\r\n"
    ).encode()


def incoming(
    sender: str = "carol@friends.test", reply_to: str = "", score: float = 6.0, extra: str = ""
) -> bytes:
    thread = (
        f"In-Reply-To: <{reply_to}>\r\nReferences: <x@y.test> <{reply_to}>\r\n" if reply_to else ""
    )
    return (
        f"X-Postvern-Spam: yes score={score:.1f} required=5.0 action=junk\r\n"
        f"From: Someone <{sender}>\r\nTo: {ALICE}\r\nSubject: Re: plans\r\n{thread}{extra}\r\n"
        "Cheap watches, limited offer, click now.\r\n"
    ).encode()


def codes(hits: list[Hit]) -> set[str]:
    return {h.code for h in hits}


def test_correspondence_learns_recipients_and_message_ids() -> None:
    c = Correspondence()
    assert not c
    c.learn_sent(sent("carol@friends.test", "m1@example.test"))
    assert set(c.addresses) == {"carol@friends.test", "dave@example.org"}
    assert "m1@example.test" in c.sent_ids
    again = Correspondence.from_bytes(c.to_bytes())
    assert again == c
    with pytest.raises(CorrespondenceError):
        Correspondence.from_bytes(b"PVWM1 not zlib")
    with pytest.raises(CorrespondenceError):
        Correspondence.from_bytes(b"garbage")


def test_replies_and_correspondents() -> None:
    c = Correspondence()
    c.learn_sent(sent("carol@friends.test", "m1@example.test"))
    reply = read_content(incoming(sender="eve@else.test", reply_to="m1@example.test"))
    assert codes(check_wanted(reply, Authenticated(), c)) == {"WANTED_THREAD_REPLY"}
    known = read_content(incoming())
    verified = check_wanted(known, Authenticated(from_verified=True), c)
    unverified = check_wanted(known, Authenticated(), c)
    assert verified[0].points < unverified[0].points < 0
    # DMARC failed: the address was borrowed, no credit
    assert check_wanted(known, Authenticated(from_failed=True), c) == []
    stranger = read_content(incoming(sender="spam@else.test"))
    assert check_wanted(stranger, Authenticated(), c) == []


def test_a_list_post_counts_only_when_the_list_signed_it() -> None:
    fields = (
        "List-Id: R help <r-help.r-project.org>\r\nList-Unsubscribe: <mailto:x@r-project.org>\r\n"
    )
    post = read_content(incoming(extra=fields))
    signed = check_wanted(post, Authenticated(signers=("r-project.org",)), None)
    assert codes(signed) == {"WANTED_LIST_VERIFIED"}
    assert check_wanted(post, Authenticated(signers=("spammer.test",)), None) == []
    assert check_wanted(post, Authenticated(), None) == []
    # the same through the scan context: an ARC seal of the list's domain is as good
    ctx = ScanContext(macro_checker=None, auth=AuthSummary(arc_sealers=("r-project.org",)))
    assert "WANTED_LIST_VERIFIED" in codes(analyse(incoming(extra=fields), ctx).hits)


def test_a_correspondent_is_never_junked_on_content_alone() -> None:
    c = Correspondence()
    c.learn_sent(sent("carol@friends.test", "m1@example.test"))
    ctx = ScanContext(macro_checker=None, correspondence=c)
    analysis = analyse(incoming(), ctx)
    analysis.hits.append(Hit("SPAM_MODEL", 4.0))  # the content model at its loudest
    assert decide(analysis, ctx.settings).action == "inbox"


def test_sent_mail_is_learned_and_replies_are_refiled_at_unlock(data_dir: DataDir) -> None:
    async def main() -> None:
        s = services(data_dir)
        s.registry.hook_factory = lambda box: JunkLearner(box, AUTHSERV, 5.0)
        try:
            alice = s.app.directory.user(ALICE)
            assert alice is not None
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "t")
            h, box = logged.mailbox, logged.mailbox.box
            sent_folder = await h.run(box.folder, "Sent")
            # the mail client stores its copy of a sent message: the user's own action
            await h.run(box.append, sent_folder.id, sent("carol@friends.test", "m1@example.test"),
                        origin="session")  # fmt: skip
            blob = await h.run(box.get_blob, CORRESPONDENCE_BLOB)
            assert (
                blob is not None and "m1@example.test" in Correspondence.from_bytes(blob).sent_ids
            )
            await h.release()
            # while locked, the MX junked a reply (score 6.0) and a stranger's spam
            junk_items = [
                incoming(sender="eve@else.test", reply_to="m1@example.test"),
                incoming(sender="spam@else.test"),
            ]
            for raw in junk_items:
                await s.registry.deliver(alice, SpoolItem(raw, special_use="\\Junk"))
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "t")
            h, box = logged.mailbox, logged.mailbox.box
            inbox = await h.run(box.folder, "INBOX")
            junk = await h.run(box.folder, "Junk")
            in_inbox = [await h.run(box.raw, inbox.id, u) for u in await h.run(box.uids, inbox.id)]
            in_junk = [await h.run(box.raw, junk.id, u) for u in await h.run(box.uids, junk.id)]
            assert any(b"eve@else.test" in m for m in in_inbox)
            assert any(b"spam@else.test" in m for m in in_junk)
            await h.release()
        finally:
            await s.close()

    asyncio.run(main())
