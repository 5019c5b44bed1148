"""Outbound benchmark: the queue and MTA against sending straight to the receiver.

Both runs deliver the same messages over STARTTLS (certificate validated against a test CA)
to one loopback receiving server (``serve_smtp`` with a handler that discards), through a
loopback DNS server. Each run is its own process so peak RSS is measured separately:

  * baseline — aiosmtplib sends the messages directly, on as many reused connections as
    the MTA may open (domains × concurrency_per_domain);
  * mta — the messages are injected into the encrypted queue by concurrent submitters
    (durable enqueue, as submission does) while ``OutboundMTA`` delivers them; the clock
    stops when the queue is empty.

Prints messages per second for each, their ratio, and peak RSS.

The message source and the injection step are pluggable, so the same harness can start from
SMTP submission and DKIM signing: ``--source module:function`` names a function
``(count, domains) -> Iterable[Submission]``; ``--inject module:function`` names an async
function ``(queue, submission) -> None`` (default: ``queue.enqueue``). Python callers can use
:func:`run_mta` / :func:`run_baseline` directly.

Usage: python bench/outbound.py [--messages 2000] [--size 5000] [--domains 4]
                                [--concurrency 4] [--submitters 16]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dnsserver import DNSTestServer
from postvern.config import Settings
from postvern.crypto import tls
from postvern.mta import AttemptReport, OutboundMTA, Queue
from postvern.mta.client import Disposition
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import BaseHandler, SessionState, serve_smtp
from test_mta_kit import TestCA, free_port

SINK_ADDRESS = "127.0.0.2"
SINK_NAME = "mx.bench.test"
SENDER = "bench@sender.test"
WORDS = "report budget team project deadline review invoice schedule update draft".split()


@dataclass(frozen=True)
class Submission:
    mail_from: str
    recipients: list[str]
    message: bytes


MessageSource = Callable[[int, list[str]], Iterable[Submission]]
Injector = Callable[[Queue, Submission], Awaitable[None]]


def text_messages(count: int, domains: list[str], size: int = 5000) -> Iterable[Submission]:
    """The default source: plain-text messages of about ``size`` bytes, round-robin domains."""
    rng = random.Random(1)
    for i in range(count):
        words: list[str] = []
        length = 0
        while length < size:
            words.append(rng.choice(WORDS))
            length += len(words[-1]) + 1
        body = "\r\n".join(" ".join(words[j : j + 12]) for j in range(0, len(words), 12))
        domain = domains[i % len(domains)]
        head = (
            f"From: <{SENDER}>\r\nTo: <user{i}@{domain}>\r\nSubject: bench #{i}\r\n"
            f"Message-ID: <{i}.{rng.random()}@sender.test>\r\n\r\n"
        )
        yield Submission(SENDER, [f"user{i}@{domain}"], (head + body + "\r\n").encode())


async def enqueue_directly(queue: Queue, submission: Submission) -> None:
    await queue.enqueue(submission.mail_from, submission.recipients, submission.message)


# --- The receiving side ---------------------------------------------------------------------


class DiscardHandler(BaseHandler):
    """Accepts every recipient and message and keeps nothing but a count."""

    accepted = 0

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        return replies.recipient_ok()

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        DiscardHandler.accepted += 1
        return replies.message_accepted()


@dataclass
class World:
    dns: DNSTestServer
    ca: TestCA
    port: int
    domains: list[str]
    directory: Path


async def build_world(directory: Path, domains: int) -> tuple[World, object]:
    dns = DNSTestServer().start()
    names = [f"d{i}.bench.test" for i in range(domains)]
    for name in names:
        dns.add(name, "MX", (10, SINK_NAME))
    dns.add(SINK_NAME, "A", SINK_ADDRESS)
    ca = TestCA(directory)
    port = free_port()
    server = await serve_smtp(
        SINK_ADDRESS, port, DiscardHandler, hostname=SINK_NAME, ssl_context=ca.context(SINK_NAME)
    )
    return World(dns, ca, port, names, directory), server


# --- The two runs ---------------------------------------------------------------------------


async def run_baseline(world: World, submissions: list[Submission], connections: int) -> float:
    """Seconds to send everything straight to the sink with aiosmtplib."""
    context = tls.client_context(world.ca.path)
    work: asyncio.Queue[Submission] = asyncio.Queue()
    for s in submissions:
        work.put_nowait(s)

    async def sender() -> None:
        smtp = aiosmtplib.SMTP(
            hostname=SINK_ADDRESS, port=world.port, start_tls=False, local_hostname="bench"
        )
        await smtp.connect()
        await smtp.starttls(server_hostname=SINK_NAME, tls_context=context)
        while not work.empty():
            s = work.get_nowait()
            await smtp.sendmail(s.mail_from, s.recipients, s.message)
        await smtp.quit()

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(connections)))
    return time.perf_counter() - start


async def run_mta(
    world: World,
    submissions: list[Submission],
    *,
    concurrency: int,
    submitters: int,
    inject: Injector = enqueue_directly,
) -> tuple[float, float]:
    """(seconds until every submission was durably queued, seconds until all delivered)."""
    settings = Settings(data_dir=world.directory, hostname="out.sender.test")
    settings.mta.port = world.port
    settings.mta.concurrency_per_domain = concurrency
    settings.tls.ca_bundle = str(world.ca.path)
    queue = await Queue.open(world.directory / "queue.sqlite", bytes(32))
    resolver = world.dns.resolver(timeout=2.0, cache_size=4096)
    done = asyncio.Event()
    delivered_count = 0

    def count(report: AttemptReport) -> None:
        nonlocal delivered_count
        delivered_count += sum(d is Disposition.DELIVERED for d in report.outcomes.values())
        if delivered_count >= len(submissions):
            done.set()

    mta = OutboundMTA(settings, queue, resolver, on_report=count, allow_loopback_mx=True)
    await mta.start()
    pending = iter(submissions)

    async def submitter() -> None:
        for s in pending:
            await inject(queue, s)

    start = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    queued = time.perf_counter() - start
    await done.wait()
    delivered = time.perf_counter() - start
    await mta.stop()
    await queue.close()
    return queued, delivered


# --- Child process: one run, one JSON line --------------------------------------------------


def load(path: str) -> object:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


async def child(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="postvern-bench-") as tmp:
        world, server = await build_world(Path(tmp), args.domains)
        source: MessageSource = load(args.source) if args.source else text_messages  # type: ignore[assignment]
        if source is text_messages:
            submissions = list(text_messages(args.messages, world.domains, args.size))
        else:
            submissions = list(source(args.messages, world.domains))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result: dict[str, float] = {}
        if args.mode == "baseline":
            result["seconds"] = await run_baseline(
                world, submissions, args.domains * args.concurrency
            )
        else:
            inject: Injector = load(args.inject) if args.inject else enqueue_directly  # type: ignore[assignment]
            queued, delivered = await run_mta(
                world,
                submissions,
                concurrency=args.concurrency,
                submitters=args.submitters,
                inject=inject,
            )
            result["queued_seconds"] = queued
            result["seconds"] = delivered
        result["accepted"] = DiscardHandler.accepted
        result["rss_before_kib"] = rss_before
        result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await server.shutdown(grace=1.0)  # type: ignore[attr-defined]
        world.dns.stop()
        return result


@dataclass
class Figures:
    mode: str
    messages: int
    seconds: float
    per_second: float
    peak_rss_mib: float
    rss_growth_mib: float
    queued_per_second: float | None = None


def run_child(args: argparse.Namespace, mode: str) -> Figures:
    argv = [sys.executable, __file__, "--child", mode] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "mode") and v is not None
    ]
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    data = json.loads(output.strip().splitlines()[-1])
    if data["accepted"] != args.messages:
        raise SystemExit(f"{mode}: the sink accepted {data['accepted']} of {args.messages}")
    queued = data.get("queued_seconds")
    return Figures(
        mode=mode,
        messages=args.messages,
        seconds=data["seconds"],
        per_second=args.messages / data["seconds"],
        peak_rss_mib=data["peak_rss_kib"] / 1024,
        rss_growth_mib=(data["peak_rss_kib"] - data["rss_before_kib"]) / 1024,
        queued_per_second=args.messages / queued if queued else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4, help="connections per domain")
    parser.add_argument("--submitters", type=int, default=16, help="concurrent enqueuers")
    parser.add_argument("--source", help="module:function yielding Submission objects")
    parser.add_argument("--inject", help="module:function (queue, submission) -> None")
    parser.add_argument("--child", dest="mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(asyncio.run(child(args))))
        return

    print(
        f"Outbound: {args.messages} messages of ~{args.size} bytes to {args.domains} domains, "
        f"{args.concurrency} connections per domain, STARTTLS (validated), loopback sink\n"
    )
    baseline = run_child(args, "baseline")
    mta = run_child(args, "mta")
    print(f"{'':28}{'msg/s':>10}{'seconds':>10}{'peak RSS':>12}{'RSS growth':>12}")
    for f in (baseline, mta):
        label = "aiosmtplib direct" if f.mode == "baseline" else "queue + OutboundMTA"
        print(
            f"{label:28}{f.per_second:>10.0f}{f.seconds:>10.2f}"
            f"{f.peak_rss_mib:>9.1f} MiB{f.rss_growth_mib:>9.1f} MiB"
        )
    if mta.queued_per_second:
        print(f"{'  of which durable enqueue':28}{mta.queued_per_second:>10.0f}")
    print(f"\nratio queue+MTA / direct: {mta.per_second / baseline.per_second:.2f}×")
    print(json.dumps({"baseline": asdict(baseline), "mta": asdict(mta)}))


if __name__ == "__main__":
    main()
