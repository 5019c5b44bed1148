"""Crash safety of the outbound queue: the MTA runs in a child process that is killed with
SIGKILL (or dies at a named crash point) while mail is queued and in flight, and is then
started again. Every message must reach the receiving server exactly once — except in the
one window SMTP itself cannot close (after the remote 250, before our commit), where the
message may arrive twice and nothing else may.

Run as a script, this module is the child: it opens the queue, optionally enqueues, runs
``OutboundMTA`` and exits once the queue is empty.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from mta_kit import SENDER, MTAEnv, make_message, mta_env, wait_until

__all__ = ["mta_env"]

CHILD_READY = "child: started"
CHILD_DRAINED = "child: drained"
# The child gets this long to finish one run; it needs a second or two.
CHILD_LIMIT = 60.0


# --- The child ------------------------------------------------------------------------------


async def child_main(spec: dict[str, Any]) -> None:
    from postvern.config import Settings
    from postvern.dns import Resolver
    from postvern.mta import OutboundMTA, Queue

    settings = Settings(data_dir=Path(spec["dir"]), hostname="out.sender.test")
    settings.mta.port = spec["port"]
    settings.mta.retry_base = 0.05
    settings.mta.concurrency_per_domain = 1
    settings.tls.ca_bundle = spec["ca"]
    resolver = Resolver([("127.0.0.1", spec["dns_port"])], timeout=1.0, cache_size=0)
    queue = await Queue.open(Path(spec["queue"]), bytes.fromhex(spec["key"]))
    for recipients, message in spec.get("enqueue", []):
        await queue.enqueue(SENDER, recipients, message.encode())
    mta = OutboundMTA(settings, queue, resolver, allow_loopback_mx=True)
    await mta.start()
    print(CHILD_READY, flush=True)
    await wait_drained(queue)
    await mta.stop()
    await queue.close()
    print(CHILD_DRAINED, flush=True)


async def wait_drained(queue: Any) -> None:
    """Poll the queue (another process's view: no event to wait on) until it is empty."""
    while True:
        if not await queue.pending_count():
            return
        await asyncio.sleep(0.02)


# --- The parent -----------------------------------------------------------------------------


class Child:
    def __init__(self, env: MTAEnv, crash_at: str | None = None) -> None:
        self.env = env
        self.crash_at = crash_at
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def start(self, enqueue: list[tuple[list[str], str]] | None = None) -> Child:
        env = self.env
        spec = {
            "dir": str(env.directory),
            "queue": str(env.directory / "queue.sqlite"),
            "key": "00" * 32,
            "port": env.port,
            "dns_port": env.dns.port,
            "ca": str(env.ca.path),
            "enqueue": enqueue or [],
        }
        environ = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
        if self.crash_at:
            environ["POSTVERN_CRASH_AT"] = self.crash_at
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=environ,
        )
        return self

    async def wait_for_line(self, wanted: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(CHILD_LIMIT):
            while wanted not in self.lines:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError("child ended early:\n" + "\n".join(self.lines[-30:]))
                self.lines.append(line.decode(errors="replace").rstrip())

    async def wait_exit(self) -> int:
        assert self.proc is not None
        async with asyncio.timeout(CHILD_LIMIT):
            if self.proc.stdout is not None:
                self.lines += (await self.proc.stdout.read()).decode(errors="replace").splitlines()
            return await self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)


def workload() -> list[tuple[list[str], str]]:
    """Seven messages, one of them for three recipients, all to one domain."""
    entries = [([f"user{n}@crash.test"], make_message(f"msg-{n}").decode()) for n in range(6)]
    entries.append(
        (
            ["multi1@crash.test", "multi2@crash.test", "multi3@crash.test"],
            make_message("msg-multi").decode(),
        )
    )
    return entries


def deliveries(env: MTAEnv) -> collections.Counter[tuple[str, str]]:
    """(subject, recipient) → how many times the receiving server accepted it."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for sink in env.sinks:
        for received in sink.received:
            subject = received.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for recipient in received.recipients:
                counts[(subject, recipient)] += 1
    return counts


def expected(work: list[tuple[list[str], str]]) -> set[tuple[str, str]]:
    out = set()
    for recipients, message in work:
        subject = message.split("Subject: ", 1)[1].split("\r\n", 1)[0]
        out |= {(subject, r) for r in recipients}
    return out


async def test_sigkill_mid_delivery_then_restart_delivers_each_message_once(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("crash.test", [(10, "mx.crash.test", "127.0.0.2")])
    hold = asyncio.Event()
    sink = await env.sink("127.0.0.2", "mx.crash.test", hold=hold, hold_after=3)
    work = workload()

    # First run: three messages are accepted, the fourth is held open at the receiver
    # (the child is waiting for the reply to its message) when the child is killed.
    child = await Child(env).start(enqueue=work)
    await wait_until(lambda: sink.holding >= 1, limit=CHILD_LIMIT)
    child.kill()
    assert await child.wait_exit() == -signal.SIGKILL
    assert len(sink.received) == 3
    sink.hold = None
    hold.set()  # the held transaction gets a 451: it was never accepted

    # Second run: everything left is delivered, nothing twice.
    child = await Child(env).start()
    await child.wait_for_line(CHILD_DRAINED)
    assert await child.wait_exit() == 0
    counts = deliveries(env)
    assert set(counts) == expected(work)
    assert set(counts.values()) == {1}


async def test_sigkill_before_any_delivery_loses_nothing(mta_env: MTAEnv) -> None:
    env = mta_env
    env.domain("crash.test", [(10, "mx.crash.test", "127.0.0.2")])
    hold = asyncio.Event()
    sink = await env.sink("127.0.0.2", "mx.crash.test", hold=hold, hold_after=0)
    work = workload()

    child = await Child(env).start(enqueue=work)
    await wait_until(lambda: sink.holding >= 1, limit=CHILD_LIMIT)
    child.kill()
    await child.wait_exit()
    sink.hold = None
    hold.set()

    child = await Child(env).start()
    await child.wait_for_line(CHILD_DRAINED)
    await child.wait_exit()
    counts = deliveries(env)
    assert set(counts) == expected(work)
    assert set(counts.values()) == {1}


async def test_crash_after_the_remote_250_duplicates_at_most_that_message(
    mta_env: MTAEnv,
) -> None:
    env = mta_env
    env.domain("crash.test", [(10, "mx.crash.test", "127.0.0.2")])
    await env.sink("127.0.0.2", "mx.crash.test")
    work = workload()

    # The child dies right after the first 250, before recording it (RFC 5321 §6.1).
    child = await Child(env, crash_at="mta.after-remote-reply").start(enqueue=work)
    assert await child.wait_exit() == 86  # faults.CRASH_EXIT_CODE
    first = deliveries(env)
    assert sum(first.values()) >= 1

    child = await Child(env).start()
    await child.wait_for_line(CHILD_DRAINED)
    await child.wait_exit()
    counts = deliveries(env)
    assert set(counts) == expected(work)
    duplicated = [key for key, n in counts.items() if n > 1]
    # Exactly the message in flight at the crash came twice (for each of its recipients).
    assert all(counts[key] == 2 for key in duplicated)
    assert {subject for subject, _ in duplicated} == {subject for subject, _ in first}


if __name__ == "__main__":
    asyncio.run(child_main(json.loads(sys.argv[1])))
