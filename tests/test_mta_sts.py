"""MTA-STS (RFC 8461) end to end: policy discovery over the loopback DNS server, the policy
fetched from a real HTTPS server with a certificate from the test CA, and real receiving MX
servers that record whether a delivery was attempted and whether TLS was on."""

from __future__ import annotations

from mta_kit import SENDER, MTAEnv, make_message, mta_env, wait_until
from postvern.mta import Queue, RecipientState
from postvern.mta.mtasts import Mode

__all__ = ["mta_env"]


async def pending_recipients(queue: Queue) -> list[tuple[str, str | None]]:
    entries = await queue.call(lambda s: s.list_entries())
    return [
        (str(r.state), r.diagnostic)
        for e in entries
        for r in e.recipients
        if r.state is RecipientState.PENDING
    ]


async def test_enforce_delivers_to_a_listed_mx_with_a_valid_certificate(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.secure.test", "127.0.0.2")])
    policy = await env.policy("secure.test", "enforce", ["mx.secure.test"])
    sink = await env.sink("127.0.0.2", "mx.secure.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert sink.received[0].tls
    assert env.reports[-1].sts_mode == "enforce"
    assert env.reports[-1].tls == "verified"
    assert policy.requests == [
        "GET /.well-known/mta-sts.txt HTTP/1.1 " + (f"mta-sts.secure.test:{policy.port}")
    ]


async def test_enforce_keeps_mail_queued_when_the_mx_is_not_in_the_policy(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.attacker.test", "127.0.0.2")])
    await env.policy("secure.test", "enforce", ["mx.secure.test", "*.backup.secure.test"])
    sink = await env.sink("127.0.0.2", "mx.attacker.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.reports) >= 3)  # retried, refused each time
    assert sink.connections == 0
    pending = await pending_recipients(queue)
    assert len(pending) == 1
    assert "not listed in the MTA-STS policy" in (pending[0][1] or "")
    assert env.bounces == []


async def test_enforce_never_delivers_without_a_valid_certificate(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.secure.test", "127.0.0.2")])
    await env.policy("secure.test", "enforce", ["mx.secure.test"])
    sink = await env.sink("127.0.0.2", "mx.secure.test", tls_mode="self-signed")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.reports) >= 3)
    assert sink.connections >= 3  # it tried, and walked away at the handshake
    assert sink.mails_offered == 0  # no transaction, encrypted or not
    assert sink.plaintext_mails == 0
    assert sink.received == []
    pending = await pending_recipients(queue)
    assert "certificate not valid" in (pending[0][1] or "")


async def test_enforce_refuses_a_certificate_for_another_name(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.secure.test", "127.0.0.2")])
    await env.policy("secure.test", "enforce", ["mx.secure.test"])
    sink = await env.sink("127.0.0.2", "mx.secure.test", tls_mode="wrong-name")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.reports) >= 2)
    assert sink.mails_offered == 0
    assert len(await pending_recipients(queue)) == 1


async def test_enforce_never_falls_back_to_plaintext(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.secure.test", "127.0.0.2")])
    await env.policy("secure.test", "enforce", ["mx.secure.test"])
    sink = await env.sink("127.0.0.2", "mx.secure.test", tls_mode="none")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.start_mta()

    await wait_until(lambda: len(env.reports) >= 2)
    assert sink.mails_offered == 0
    pending = await pending_recipients(queue)
    assert "STARTTLS not offered" in (pending[0][1] or "")


async def test_enforce_skips_a_bad_mx_for_a_good_one(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain(
        "secure.test",
        [(10, "mx1.secure.test", "127.0.0.2"), (20, "mx2.secure.test", "127.0.0.3")],
    )
    await env.policy("secure.test", "enforce", ["*.secure.test"])
    bad = await env.sink("127.0.0.2", "mx1.secure.test", tls_mode="self-signed")
    good = await env.sink("127.0.0.3", "mx2.secure.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert bad.mails_offered == 0
    assert good.recipients == ["bob@secure.test"]


async def test_testing_mode_delivers_despite_failures(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("trial.test", [(10, "mx.unlisted.test", "127.0.0.2")])
    await env.policy("trial.test", "testing", ["mx.trial.test"])
    sink = await env.sink("127.0.0.2", "mx.unlisted.test", tls_mode="self-signed")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@trial.test"], make_message())
    await env.start_mta()

    await env.drained()
    assert sink.recipients == ["bob@trial.test"]
    assert sink.received[0].tls  # still encrypted: testing changes nothing else
    assert env.reports[-1].sts_mode == "testing"
    assert env.reports[-1].tls == "unverified"


async def test_policy_cache_is_honoured_and_refreshed_when_the_id_changes(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.secure.test", "127.0.0.2")])
    policy = await env.policy("secure.test", "enforce", ["mx.secure.test"])
    sink = await env.sink("127.0.0.2", "mx.secure.test")
    queue = await env.open_queue()
    await env.start_mta()

    for n in range(3):
        await queue.enqueue(SENDER, [f"u{n}@secure.test"], make_message())
        await env.drained()
    assert len(policy.requests) == 1  # one fetch, then the cache

    # A new id in DNS means a new policy: fetched once more.
    env.dns.set("_mta-sts.secure.test", "TXT", "v=STSv1; id=2;")
    await queue.enqueue(SENDER, ["u3@secure.test"], make_message())
    await env.drained()
    assert len(policy.requests) == 2
    assert len(sink.received) == 4

    # The record vanishes and the policy host goes down: the cached policy still applies,
    # so an MX swapped in by an attacker is refused.
    env.dns.remove("_mta-sts.secure.test")
    await policy.stop()
    env.dns.set("secure.test", "MX", (10, "mx.evil.test"))
    env.dns.add("mx.evil.test", "A", "127.0.0.3")
    evil = await env.sink("127.0.0.3", "mx.evil.test")
    reports = len(env.reports)
    await queue.enqueue(SENDER, ["u4@secure.test"], make_message())
    await wait_until(lambda: len(env.reports) >= reports + 2)
    assert evil.connections == 0
    assert len(await pending_recipients(queue)) == 1


async def test_cached_policy_survives_a_restart_encrypted(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("secure.test", [(10, "mx.secure.test", "127.0.0.2")])
    policy = await env.policy("secure.test", "enforce", ["mx.secure.test"])
    await env.sink("127.0.0.2", "mx.secure.test")
    queue = await env.open_queue()
    mta = await env.start_mta()
    await queue.enqueue(SENDER, ["bob@secure.test"], make_message())
    await env.drained()
    await mta.stop()
    await queue.close()

    queue = await env.open_queue()
    cached = await queue.get_policy("secure.test")
    assert cached is not None
    assert cached.policy.mode is Mode.ENFORCE
    assert cached.policy.mx == ("mx.secure.test",)
    assert cached.policy_id == "1"
    await env.start_mta()
    await queue.enqueue(SENDER, ["carol@secure.test"], make_message())
    await env.drained()
    assert len(policy.requests) == 1
    raw = b"".join(p.read_bytes() for p in env.directory.glob("queue.sqlite*"))
    assert b"mx.secure.test" not in raw


async def test_unfetchable_policy_without_cache_means_no_policy(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("broken.test", [(10, "mx.broken.test", "127.0.0.2")])
    policy = await env.policy("broken.test", "enforce", ["mx.other.test"])
    policy.status = 404
    sink = await env.sink("127.0.0.2", "mx.broken.test", tls_mode="self-signed")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@broken.test"], make_message())
    await env.start_mta()

    # RFC 8461 §3.3: no valid policy could be fetched and none was cached: deliver as
    # without MTA-STS (opportunistic TLS).
    await env.drained()
    assert sink.recipients == ["bob@broken.test"]
    assert env.reports[-1].sts_mode is None


async def test_policy_with_the_wrong_media_type_is_ignored(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("typed.test", [(10, "mx.typed.test", "127.0.0.2")])
    policy = await env.policy("typed.test", "enforce", ["mx.nowhere.test"])
    policy.content_type = "text/html"
    sink = await env.sink("127.0.0.2", "mx.typed.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@typed.test"], make_message())
    await env.start_mta()
    await env.drained()
    assert sink.recipients == ["bob@typed.test"]


async def test_policy_host_with_an_invalid_certificate_is_not_trusted(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("spoof.test", [(10, "mx.spoof.test", "127.0.0.2")])
    policy = await env.policy("spoof.test", "enforce", ["mx.nowhere.test"])
    # Swap in a certificate the CA did not sign: the policy must not be believed.
    await policy.stop()
    policy.context = env.ca.context("mta-sts.spoof.test", self_signed=True)
    await policy.start()
    sink = await env.sink("127.0.0.2", "mx.spoof.test")
    queue = await env.open_queue()
    await queue.enqueue(SENDER, ["bob@spoof.test"], make_message())
    await env.start_mta(policy_port=policy.port)
    await env.drained()
    assert sink.recipients == ["bob@spoof.test"]
    assert policy.requests == []  # the handshake failed before any request
