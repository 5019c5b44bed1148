"""Per-user learning inside the encrypted mailbox, and re-filing of spooled mail at unlock."""

from __future__ import annotations

import asyncio

from harness import DataDir, services
from postvern.filters.learning import JunkLearner, recorded_score
from postvern.filters.spam import UserModel
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"
AUTHSERV = "mx.example.test"


def message(n: int, sender: str = "deals@spammy.test", score: float = 2.0) -> bytes:
    domain = sender.rpartition("@")[2]
    return (
        f"X-Postvern-Spam: no score={score:.1f} required=5.0 action=inbox\r\n"
        f"Authentication-Results: {AUTHSERV}; spf=pass smtp.mailfrom={sender};"
        f" dkim=pass header.d={domain}; dmarc=pass header.from={domain}\r\n"
        f"From: Deals <{sender}>\r\nTo: {ALICE}\r\nSubject: offer number {n}\r\n\r\n"
        f"Exclusive limited offer {n}: discount vouchers, act now, unsubscribe below.\r\n"
    ).encode()


def test_recorded_score() -> None:
    assert recorded_score(message(1, score=7.5)) == 7.5
    assert recorded_score(b"Subject: x\r\n\r\nbody") is None


def test_moves_and_keywords_train_the_model(data_dir: DataDir) -> None:
    async def main() -> None:
        s = services(data_dir)
        s.registry.hook_factory = lambda box: JunkLearner(box, AUTHSERV, 5.0)
        try:
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "t")
            h, box = logged.mailbox, logged.mailbox.box
            inbox = await h.run(box.folder, "INBOX")
            junk = await h.run(box.folder, "Junk")
            for i in range(3):
                await h.run(box.append, inbox.id, message(i))
            learner = JunkLearner(box, AUTHSERV, 5.0)
            # a delivery into Junk teaches nothing (origin None)
            await h.run(box.append, junk.id, message(99))
            assert (await h.run(learner.load)).spam_messages == 0
            # the user moves two into Junk: spam x2
            await h.run(box.move, inbox.id, [1, 2], junk.id, origin="session")
            model = await h.run(learner.load)
            assert (model.spam_messages, model.ham_messages) == (2, 0)
            # moving one back out of Junk: it becomes ham (unlearned as spam)
            junk_uids = await h.run(box.uids, junk.id)
            await h.run(box.move, junk.id, [junk_uids[-1]], inbox.id, origin="session")
            model = await h.run(learner.load)
            assert (model.spam_messages, model.ham_messages) == (1, 1)
            # $NotJunk on the remaining inbox message: ham; setting it twice counts once
            await h.run(box.store_flags, inbox.id, [3], "add", ["$NotJunk"], origin="s")
            await h.run(box.store_flags, inbox.id, [3], "add", ["\\Seen"], origin="s")
            model = await h.run(learner.load)
            assert (model.spam_messages, model.ham_messages) == (1, 2)
            # the model is inside the encrypted mailbox, serialised
            blob = await h.run(box.get_blob, "filter-model")
            assert UserModel.from_bytes(blob).ham_messages == 2
            await h.release()
        finally:
            await s.close()

    asyncio.run(main())


def test_spooled_mail_is_refiled_by_the_users_marks(data_dir: DataDir) -> None:
    async def main() -> None:
        s = services(data_dir)
        s.registry.hook_factory = lambda box: JunkLearner(box, AUTHSERV, 5.0)
        try:
            alice = s.app.directory.user(ALICE)
            assert alice is not None
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "t")
            h, box = logged.mailbox, logged.mailbox.box
            inbox = await h.run(box.folder, "INBOX")
            junk = await h.run(box.folder, "Junk")
            for i in range(6):
                await h.run(box.append, inbox.id, message(i))
            await h.run(box.move, inbox.id, list(range(1, 7)), junk.id, origin="session")
            await h.release()
            # while locked: the same sender again (the MX said inbox), and a friend
            await s.registry.deliver(alice, SpoolItem(message(50)))
            # (the user's word marks may junk alone, so the friend writes her own words)
            friend = (
                message(51, sender="carol@friends.test", score=1.0)
                .replace(b"Subject: offer number 51", b"Subject: Sunday")
                .replace(
                    b"Exclusive limited offer 51: discount vouchers, act now, unsubscribe below.",
                    b"Photos from Sunday's hike are in the shared album; the lake was lovely.",
                )
            )
            await s.registry.deliver(alice, SpoolItem(friend))
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "t")
            h, box = logged.mailbox, logged.mailbox.box
            in_junk = [await h.run(box.raw, junk.id, u) for u in await h.run(box.uids, junk.id)]
            in_inbox = [await h.run(box.raw, inbox.id, u) for u in await h.run(box.uids, inbox.id)]
            assert any(b"offer number 50" in m for m in in_junk)
            assert any(b"Subject: Sunday" in m for m in in_inbox)
            await h.release()
        finally:
            await s.close()

    asyncio.run(main())
