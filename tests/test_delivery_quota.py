"""The MX refuses mail over quota, with the same quota IMAP reports (the user's, else the
configured default), and says 452 so the sender retries once the user has made room."""

from __future__ import annotations

from pathlib import Path

from harness import make_data_dir, services
from postvern.delivery.pipeline import InboundPipeline
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"


async def test_default_quota_applies_to_users_without_their_own(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d")
    svc = services(data)
    try:
        user = svc.app.directory.user(ALICE)
        assert user is not None and user.quota == 0
        pipeline = InboundPipeline(
            hostname="mx.example.test",
            directory=svc.app.directory,
            registry=svc.registry,
            default_quota=10_000,
        )
        reply, recipient = await pipeline.check_recipient(ALICE)
        assert reply.code == 250 and recipient is not None
        await svc.registry.deliver(user, SpoolItem(b"Subject: big\r\n\r\n" + b"x" * 12_000))
        reply, recipient = await pipeline.check_recipient(ALICE)
        assert (reply.code, reply.status) == (452, "4.2.2") and recipient is None
        unlimited = InboundPipeline(
            hostname="mx.example.test", directory=svc.app.directory, registry=svc.registry
        )
        assert (await unlimited.check_recipient(ALICE))[0].code == 250
    finally:
        await svc.close()
