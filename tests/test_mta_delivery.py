"""The outbound MTA end to end: a real queue, a loopback DNS server, real receiving servers.

Every receiving MX is a ``serve_smtp`` server on its own loopback address (127.0.0.x) and
the MTA's configured port, with a certificate from a test CA (or a bad one, or none); what it
accepted, and whether TLS was on, is recorded by the server itself.
"""

from __future__ import annotations

import email
import email.policy

from mta_kit import (
    OUR_HOSTNAME,
    SENDER,
    MTAEnv,
    make_message,
    mta_env,
    parse_dsn,
    status_blocks,
    wait_until,
)
from postvern.mta import QueueRecipient, RecipientState
from postvern.smtp.replies import Reply

__all__ = ["mta_env"]


async def test_delivers_over_verified_starttls_in_one_transaction(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("remote.test", [(10, "mx.remote.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.remote.test")
    queue = await env.open_queue()
    message = make_message("Verified")
    queue_id = await queue.enqueue(SENDER, ["bob@remote.test", "carol@remote.test"], message)
    await env.start_mta()

    await env.drained()
    assert len(sink.received) == 1
    got = sink.received[0]
    assert got.tls is True
    assert got.mail_from == SENDER
    assert sorted(got.recipients) == ["bob@remote.test", "carol@remote.test"]
    assert got.message == message
    assert env.reports[0].entry_id == queue_id
    assert env.reports[0].tls == "verified"
    assert env.bounces == []


async def test_mx_preference_order_and_fallback_when_the_first_is_down(mta_env: MTAEnv) -> None:
    env = mta_env
    # mx1 (best) has no server listening; mx2 must get the mail, never mx3.
    env.domain(
        "pref.test",
        [
            (30, "mx3.pref.test", "127.0.0.4"),
            (10, "mx1.pref.test", "127.0.0.2"),
            (20, "mx2.pref.test", "127.0.0.3"),
        ],
    )
    second = await env.sink("127.0.0.3", "mx2.pref.test")
    third = await env.sink("127.0.0.4", "mx3.pref.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@pref.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert second.recipients == ["bob@pref.test"]
    assert third.connections == 0
    assert env.reports[-1].remote_mta == "mx2.pref.test"


async def test_equal_preference_hosts_share_the_load(mta_env: MTAEnv) -> None:
    env = mta_env
    env.settings.mta.concurrency_per_domain = 1
    env.domain(
        "spread.test",
        [(10, "a.spread.test", "127.0.0.2"), (10, "b.spread.test", "127.0.0.3")],
    )
    first = await env.sink("127.0.0.2", "a.spread.test")
    second = await env.sink("127.0.0.3", "b.spread.test")
    queue = await env.open_queue()
    await env.start_mta()
    # One message at a time, so each delivery picks a host afresh (no connection reuse).
    for n in range(16):
        await queue.enqueue(SENDER, [f"u{n}@spread.test"], make_message())
        await env.drained()
    assert first.received and second.received
    assert len(first.received) + len(second.received) == 16


async def test_domain_without_mx_uses_its_address(mta_env: MTAEnv) -> None:
    env = mta_env
    env.dns.add("plain.test", "A", "127.0.0.5")
    sink = await env.sink("127.0.0.5", "plain.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@plain.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert sink.recipients == ["bob@plain.test"]
    assert sink.received[0].tls
    assert env.reports[-1].tls == "verified"


async def test_null_mx_fails_at_once_with_a_notification(mta_env: MTAEnv) -> None:
    env = mta_env
    env.dns.add("nomail.test", "MX", (0, "."))
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@nomail.test"], make_message("Null MX"))
    await env.start_mta()

    await wait_until(lambda: len(env.bounces) == 1)
    await env.drained()
    message, address = env.bounces[0]
    assert address == SENDER
    _, blocks = parse_dsn(message)
    assert blocks[0]["Action"] == "failed"
    assert blocks[0]["Status"] == "5.1.10"
    assert blocks[0]["Final-Recipient"] == "rfc822; bob@nomail.test"
    # Not even an address lookup was made for a host: the null MX ends it.
    assert ("nomail.test", "A") not in env.dns.queries


async def test_temporary_failure_is_retried_until_delivered(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("flaky.test", [(10, "mx.flaky.test", "127.0.0.2")])
    tempfail = Reply(451, "4.3.0", "Try again later")
    sink = await env.sink(
        "127.0.0.2", "mx.flaky.test", data_reply=lambda n: tempfail if n <= 2 else None
    )
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@flaky.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert sink.data_attempts == 3
    assert sink.recipients == ["bob@flaky.test"]
    assert env.bounces == []


async def test_receiver_down_then_back(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("later.test", [(10, "mx.later.test", "127.0.0.2")])
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@later.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.reports) >= 2)  # two failed connection attempts
    info = (await queue.call(lambda s: s.list_entries()))[0]
    assert info.recipients[0].state is RecipientState.PENDING
    assert "cannot connect" in (info.recipients[0].diagnostic or "")
    sink = await env.sink("127.0.0.2", "mx.later.test")
    await env.drained()
    assert sink.recipients == ["bob@later.test"]


async def test_permanent_failure_returns_a_notification_with_the_right_fields(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("strict.test", [(10, "mx.strict.test", "127.0.0.2")])

    def rcpt(address: str) -> Reply | None:
        if address.startswith("nobody@"):
            return Reply(550, "5.1.1", "No such user here")
        return None

    sink = await env.sink("127.0.0.2", "mx.strict.test", rcpt_reply=rcpt)
    queue = await env.open_queue()
    original = make_message("Quarterly figures", body="SECRET-BODY-TEXT")
    queue_id = await queue.enqueue(
        SENDER,
        [
            QueueRecipient("nobody@strict.test", orcpt="rfc822;nobody@strict.test"),
            "ok@strict.test",
        ],
        original,
        envid="ENV-42",
    )
    await env.start_mta()

    await wait_until(lambda: len(env.bounces) == 1)
    await env.drained()
    assert sink.recipients == ["ok@strict.test"]
    message, address = env.bounces[0]
    assert address == SENDER
    parsed, blocks = parse_dsn(message)
    assert parsed["To"] == f"<{SENDER}>"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed.get_param("report-type") == "delivery-status"
    per_message = status_blocks(parsed)[0]
    assert per_message["Reporting-MTA"] == f"dns; {OUR_HOSTNAME}"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["X-Postvern-Queue-ID"] == queue_id
    assert len(blocks) == 1
    block = blocks[0]
    assert block["Final-Recipient"] == "rfc822; nobody@strict.test"
    assert block["Original-Recipient"] == "rfc822;nobody@strict.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.strict.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    assert block["Last-Attempt-Date"]
    # RET was not FULL: only the original header section comes back.
    returned = [p for p in parsed.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert len(returned) == 1
    assert b"Subject: Quarterly figures" in returned[0].get_payload(decode=True)
    assert b"SECRET-BODY-TEXT" not in message


async def test_ret_full_returns_the_whole_message(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("strict.test", [(10, "mx.strict.test", "127.0.0.2")])
    await env.sink(
        "127.0.0.2",
        "mx.strict.test",
        rcpt_reply=lambda a: Reply(550, "5.7.1", "Rejected by policy"),
    )
    queue = await env.open_queue()
    await queue.enqueue(
        SENDER, ["x@strict.test"], make_message(body="FULL-BODY-MARKER"), ret="FULL"
    )
    await env.start_mta()
    await wait_until(lambda: len(env.bounces) == 1)
    parsed, blocks = parse_dsn(env.bounces[0][0])
    assert blocks[0]["Status"] == "5.7.1"
    returned = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
    assert len(returned) == 1
    assert b"FULL-BODY-MARKER" in env.bounces[0][0]


async def test_expiry_returns_a_failure_notification(mta_env: MTAEnv) -> None:
    env = mta_env
    env.settings.mta.max_queue_days = 1.0 / 86400  # one second
    env.domain("slow.test", [(10, "mx.slow.test", "127.0.0.2")])
    sink = await env.sink(
        "127.0.0.2",
        "mx.slow.test",
        rcpt_reply=lambda a: Reply(452, "4.2.2", "Mailbox full, try later"),
    )
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@slow.test"], make_message())
    await env.start_mta(delay_warning_after=None)

    await wait_until(lambda: len(env.bounces) == 1)
    await env.drained()
    assert sink.received == []
    assert sink.mails_offered >= 2  # retried before giving up
    _, blocks = parse_dsn(env.bounces[0][0])
    assert blocks[0]["Action"] == "failed"
    assert blocks[0]["Status"] == "4.4.7"
    assert blocks[0]["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full, try later"


async def test_delay_notice_then_delivery(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("flaky.test", [(10, "mx.flaky.test", "127.0.0.2")])
    tempfail = Reply(451, "4.3.0", "Busy")
    sink = await env.sink(
        "127.0.0.2", "mx.flaky.test", data_reply=lambda n: tempfail if n <= 3 else None
    )
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@flaky.test"], make_message())
    await env.start_mta(delay_warning_after=0.0)

    await env.drained()
    assert sink.recipients == ["bob@flaky.test"]
    assert len(env.bounces) == 1  # one delay notice, never repeated
    parsed, blocks = parse_dsn(env.bounces[0][0])
    assert blocks[0]["Action"] == "delayed"
    assert blocks[0]["Will-Retry-Until"]
    assert "Delayed" in parsed["Subject"]


async def test_null_sender_is_never_bounced(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("strict.test", [(10, "mx.strict.test", "127.0.0.2")])
    await env.sink(
        "127.0.0.2", "mx.strict.test", rcpt_reply=lambda a: Reply(550, "5.1.1", "No such user")
    )
    queue = await env.open_queue()
    await queue.enqueue("", ["nobody@strict.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.reports) == 1)
    await env.drained()
    assert env.bounces == []


async def test_default_bounce_requeues_the_notice_from_the_null_sender(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("strict.test", [(10, "mx.strict.test", "127.0.0.2")])
    env.domain("sender.test", [(10, "mx.sender.test", "127.0.0.3")])
    await env.sink(
        "127.0.0.2", "mx.strict.test", rcpt_reply=lambda a: Reply(550, "5.1.1", "No such user")
    )
    home = await env.sink("127.0.0.3", "mx.sender.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["nobody@strict.test"], make_message())
    mta = await env.start_mta()
    mta._bounce = mta._requeue_notice  # the default: no callback given

    await wait_until(lambda: len(home.received) == 1)
    notice = home.received[0]
    assert notice.mail_from == ""
    assert notice.recipients == [SENDER]
    parse_dsn(notice.message)


async def test_opportunistic_tls_when_the_certificate_does_not_validate(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("selfsigned.test", [(10, "mx.selfsigned.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.selfsigned.test", tls_mode="self-signed")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@selfsigned.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert sink.received[0].tls is True  # encrypted even though not authenticated
    assert sink.plaintext_mails == 0
    assert env.reports[-1].tls == "unverified"
    assert "certificate" in (env.reports[-1].tls_error or "")


async def test_plaintext_only_when_starttls_is_not_offered(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("old.test", [(10, "mx.old.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.old.test", tls_mode="none")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@old.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert sink.received[0].tls is False
    assert env.reports[-1].tls == "none"


async def test_own_name_as_best_mx_is_a_loop(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("loop.test", [(10, OUR_HOSTNAME, "127.0.0.2")])
    sink = await env.sink("127.0.0.2", OUR_HOSTNAME)
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@loop.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.bounces) == 1)
    _, blocks = parse_dsn(env.bounces[0][0])
    assert blocks[0]["Status"] == "5.4.6"
    assert sink.connections == 0


async def test_dsn_parameters_are_passed_on_or_answered_as_relayed(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("dsn.test", [(10, "mx.dsn.test", "127.0.0.2")])
    env.domain("nodsn.test", [(10, "mx.nodsn.test", "127.0.0.3")])
    with_dsn = await env.sink("127.0.0.2", "mx.dsn.test", dsn=True)
    await env.sink("127.0.0.3", "mx.nodsn.test")
    queue = await env.open_queue()
    notify = frozenset({"SUCCESS", "FAILURE"})
    await queue.enqueue(
        SENDER,
        [
            QueueRecipient("a+b@dsn.test", notify=notify, orcpt="rfc822;a+b@dsn.test"),
            QueueRecipient("c@nodsn.test", notify=notify),
        ],
        make_message(),
        envid="E=1",
        ret="HDRS",
    )
    await env.start_mta()

    await wait_until(lambda: len(env.bounces) == 1)
    await env.drained()
    got = with_dsn.received[0]
    assert got.mail_params.envid == "E=1"
    assert got.mail_params.ret == "HDRS"
    assert got.rcpt_params[0].notify == notify
    assert got.rcpt_params[0].orcpt == "rfc822;a+b@dsn.test"
    # The hop without DSN support cannot report success, so this MTA says "relayed".
    _, blocks = parse_dsn(env.bounces[0][0])
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; c@nodsn.test"]
    assert blocks[0]["Action"] == "relayed"


async def test_one_connection_carries_several_messages(mta_env: MTAEnv) -> None:
    env = mta_env
    env.settings.mta.concurrency_per_domain = 1
    env.domain("bulk.test", [(10, "mx.bulk.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.bulk.test")
    queue = await env.open_queue()
    for n in range(6):
        await queue.enqueue(SENDER, [f"u{n}@bulk.test"], make_message(f"n{n}"))
    await env.start_mta()

    await env.drained()
    assert len(sink.received) == 6
    assert sink.connections == 1


async def test_per_domain_concurrency_limit(mta_env: MTAEnv) -> None:
    env = mta_env
    env.settings.mta.concurrency_per_domain = 2
    env.domain("busy.test", [(10, "mx.busy.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.busy.test")
    queue = await env.open_queue()
    for n in range(12):
        await queue.enqueue(SENDER, [f"u{n}@busy.test"], make_message())
    await env.start_mta()
    await env.drained()
    assert len(sink.received) == 12
    assert 1 <= sink.connections <= 2


async def test_restart_resumes_pending_entries(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("resume.test", [(10, "mx.resume.test", "127.0.0.2")])
    queue = await env.open_queue()
    ids = [await queue.enqueue(SENDER, [f"u{n}@resume.test"], make_message()) for n in range(3)]
    await queue.close()
    env.queue = None

    sink = await env.sink("127.0.0.2", "mx.resume.test")
    await env.start_mta()
    assert env.queue is not None
    await env.drained()
    assert sorted(sink.recipients) == [f"u{n}@resume.test" for n in range(3)]
    assert {r.entry_id for r in env.reports} == set(ids)


async def test_message_bytes_arrive_unchanged(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("exact.test", [(10, "mx.exact.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.exact.test")
    queue = await env.open_queue()
    body = "Line one\r\n.leading dot\r\n..two dots\r\nÜnïcödé 8-bit\r\n"
    message = make_message("Exact", body=body)
    await queue.enqueue(SENDER, ["bob@exact.test"], message)
    await env.start_mta()
    await env.drained()
    assert sink.received[0].message == message
    assert sink.received[0].mail_params.body == "8BITMIME"
    parsed = email.message_from_bytes(sink.received[0].message, policy=email.policy.default)
    assert parsed["Subject"] == "Exact"


async def test_mx_pointing_at_loopback_is_refused_outside_tests(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("sneaky.test", [(10, "mx.sneaky.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "mx.sneaky.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@sneaky.test"], make_message())
    await env.start_mta(allow_loopback_mx=False)

    await wait_until(lambda: len(env.bounces) == 1)
    _, blocks = parse_dsn(env.bounces[0][0])
    assert blocks[0]["Status"] == "5.4.4"
    assert sink.connections == 0


async def test_a_server_greeting_with_our_own_name_is_a_loop(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("alias.test", [(10, "other-name.alias.test", "127.0.0.2")])
    sink = await env.sink("127.0.0.2", "other-name.alias.test", hostname=OUR_HOSTNAME)
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@alias.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.bounces) == 1)
    _, blocks = parse_dsn(env.bounces[0][0])
    assert blocks[0]["Status"] == "5.4.6"
    assert "loops back to myself" in " ".join(blocks[0]["Diagnostic-Code"].split())
    assert sink.mails_offered == 0
