"""Outbound benchmark: submission through DKIM signing, the durable queue and the MTA of a real
``postvern serve``, against sending the same messages straight to the receiver.

The main figure. A loopback DNS server gives each recipient domain an MX record naming
``mx.bench.test``, which resolves to 127.0.0.1, where a discarding sink plays the remote MX
(a ``serve_smtp`` process with a certificate from a test CA; ``[mta] port`` is the sink's
port, ``allow_loopback_mx = true``, and ``[tls] ca_bundle`` is the test CA, so every hop is
validated STARTTLS). The same messages then go:

  * direct (baseline) — aiosmtplib sends them to the sink over C reused STARTTLS connections;
  * submission — aiosmtplib submits them on port 465 (implicit TLS, AUTH PLAIN as a user of
    the instance) over C reused connections; Postvern checks the sender, adds Date, signs
    with the domain's Ed25519 and RSA keys, queues each durably before 250, and its MTA
    (``concurrency_per_domain`` connections per domain) delivers them to the sink. The
    clock runs until the sink has accepted the last one;
  * postfix (reference) — a private Postfix 3.7 instance relays them: its smtpd takes them on
    implicit TLS from mynetworks (no AUTH, no signing), its smtp client sends them to the
    sink as relayhost with validated TLS, connections reused through tlsproxy. CPU and peak
    RSS are summed over its processes (RSS counts shared pages once per process).

Prints messages per second end to end, the submission (250) rate, latency, the server's CPU
per message and its peak RSS (VmHWM), and checks that the sink accepted every message with
two DKIM signatures.

The secondary figure is the MTA alone (no SMTP submission, no signing): the messages are
injected into the encrypted queue by concurrent submitters (durable enqueue, as submission
does) while ``OutboundMTA`` delivers them in-process to an in-process sink on 127.0.0.2,
against aiosmtplib sending them directly; each run is its own process so peak RSS is
measured separately. Its message source and injection are pluggable: ``--source
module:function`` names a function ``(count, domains) -> Iterable[Submission]``;
``--inject module:function`` an async function ``(queue, submission) -> None`` (default:
``queue.enqueue``). Python callers can use :func:`run_mta` / :func:`run_baseline` directly.

Usage: python bench/outbound.py [--messages 2000] [--size 5000] [--domains 4]
                                [--concurrency 4] [--connections 16] [--submitters 16]
                                [--skip-mta-only] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiosmtplib

import common  # first: it puts tests/ on sys.path for the imports below
from common import Job, LoadResult, MemorySampler, SinkProcess, Target, send_all
from dnsserver import DNSTestServer
from mta_kit import TestCA, free_port
from postvern.config import Settings
from postvern.crypto import tls
from postvern.mta import AttemptReport, OutboundMTA, Queue
from postvern.mta.client import Disposition
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import BaseHandler, SessionState, serve_smtp

if TYPE_CHECKING:
    # Imported where used: harness loads all of postvern, which would weigh on the peak
    # RSS of the MTA-only child processes.
    from harness import DataDir

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


def text_messages(
    count: int, domains: list[str], size: int = 5000, sender: str = SENDER
) -> Iterable[Submission]:
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
            f"From: <{sender}>\r\nTo: <user{i}@{domain}>\r\nSubject: bench #{i}\r\n"
            f"Message-ID: <{i}.{rng.random()}@{sender.rpartition('@')[2]}>\r\n\r\n"
        )
        yield Submission(sender, [f"user{i}@{domain}"], (head + body + "\r\n").encode())


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


# --- The main figure: submission → DKIM → queue → MTA → loopback MX -------------------------

USER = "alice@example.test"
PASSWORD = "bench-correct-horse"
MX_ADDRESS = "127.0.0.1"
# Records of real domains live for minutes to hours; 300 s is at the short end.
DNS_TTL = 300
# Warm-up messages (counted at the sink) before the clock starts: they load what the server
# loads lazily (keys, DNS answers, code paths) and open the MTA's first connections.
WARMUP = 16
# How long the MTA gets to deliver everything after the last submission was accepted.
DELIVERY_WAIT = 300.0
SINK_POLL = 0.05


@dataclass
class EndToEnd:
    path: str
    messages: int
    seconds: float  # from the first submission until the sink accepted the last message
    per_second: float
    accepted_per_second: float  # 250s at the client
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float  # per message: Postvern's process (submission), the sink's (direct)
    server_peak_rss_mib: float  # VmHWM
    sink_cpu_ms: float
    sink_peak_rss_mib: float
    arrived: int
    signed: int  # arrived with two DKIM-Signature fields
    refused: dict[str, int] = field(default_factory=dict)


@dataclass
class Loopback:
    """The parent's side of the main figure: DNS, the test CA, recipient domains."""

    root: Path
    dns: DNSTestServer
    ca: TestCA
    domains: list[str]

    def sink(self, connections: int) -> SinkProcess:
        cert, key = self.ca.issue(SINK_NAME)
        return SinkProcess(MX_ADDRESS, free_port(), cert, key, SINK_NAME, connections + 8)


def loopback_world(root: Path, dns: DNSTestServer, domains: int) -> Loopback:
    names = [f"d{i}.bench.test" for i in range(domains)]
    for name in names:
        dns.add(name, "MX", (10, SINK_NAME), ttl=DNS_TTL)
    dns.add(SINK_NAME, "A", MX_ADDRESS, ttl=DNS_TTL)
    return Loopback(root, dns, TestCA(root), names)


def wait_for_sink(sink: SinkProcess, count: int) -> dict[str, float]:
    """Poll the sink until it has accepted ``count`` messages; its last counters."""
    deadline = time.monotonic() + DELIVERY_WAIT
    while True:
        stats = sink.stats()
        if stats["accepted"] >= count:
            return stats
        if time.monotonic() > deadline:
            raise SystemExit(f"the sink has {stats['accepted']:.0f} of {count} messages")
        time.sleep(SINK_POLL)


def end_to_end(
    path: str,
    jobs: list[Job],
    sink: SinkProcess,
    target: Target,
    connections: int,
    server_pid: int,
    spy_on: Path | None = None,
    *,
    tree: bool = False,
) -> tuple[EndToEnd, str]:
    """Warm up, then the timed load; the clock stops at the sink's last acceptance. With
    ``tree``, the server's CPU and peak RSS are its whole process tree's (Postfix)."""
    warm, timed = jobs[:WARMUP], jobs[WARMUP:]
    asyncio.run(send_all(target, warm, 1))
    wait_for_sink(sink, len(warm))
    spy = common.PySpy(server_pid, spy_on) if spy_on else contextlib.nullcontext()
    cpu_of = common.tree_cpu_seconds if tree else common.cpu_seconds
    with MemorySampler(server_pid) as sampler, spy:
        cpu0 = cpu_of(server_pid)
        sink_cpu0 = common.cpu_seconds(sink.pid)
        result: LoadResult = asyncio.run(send_all(target, timed, connections))
        stats = wait_for_sink(sink, len(jobs))
        cpu = cpu_of(server_pid) - cpu0
        sink_cpu = common.cpu_seconds(sink.pid) - sink_cpu0
    seconds = stats["last"] - result.started  # both time.monotonic(): one clock per machine
    n = max(1, result.accepted)
    figures = EndToEnd(
        path=path,
        messages=result.accepted,
        seconds=seconds,
        per_second=result.accepted / seconds,
        accepted_per_second=result.accepted / result.seconds,
        p50_ms=result.percentile(50) * 1000,
        p99_ms=result.percentile(99) * 1000,
        server_cpu_ms=cpu / n * 1000,
        server_peak_rss_mib=(sampler.peak_rss_kib if tree else common.peak_rss_kib(server_pid))
        / 1024,
        sink_cpu_ms=sink_cpu / n * 1000,
        sink_peak_rss_mib=common.peak_rss_kib(sink.pid) / 1024,
        arrived=int(stats["accepted"]),
        signed=int(stats["signed"]),
        refused=result.refused,
    )
    return figures, spy.summary() if isinstance(spy, common.PySpy) else ""


def run_direct(world: Loopback, jobs: list[Job], connections: int) -> EndToEnd:
    """Baseline: the same messages straight to the sink, STARTTLS validated as the MTA does."""
    with world.sink(connections) as sink:
        target = Target(
            MX_ADDRESS,
            sink.port,
            server_name=SINK_NAME,
            context=tls.client_context(world.ca.path),
            helo="out.example.test",
        )
        figures, _ = end_to_end("aiosmtplib → sink", jobs, sink, target, connections, sink.pid)
    return figures


def submission_instance(world: Loopback, args: argparse.Namespace, mta_port: int) -> DataDir:
    from harness import make_data_dir, set_config

    data = make_data_dir(
        world.root / "postvern", passwords={USER: PASSWORD}, listeners=("submissions",)
    )
    set_config(data.path, "dns", {"nameservers": [world.dns.nameserver], "timeout": 2.0})
    set_config(data.path, "tls", {"ca_bundle": str(world.ca.path)})
    set_config(
        data.path,
        "mta",
        {
            "port": mta_port,
            "allow_loopback_mx": True,
            "concurrency_per_domain": args.concurrency,
        },
    )
    set_config(
        data.path,
        "limits",
        {"connections_per_ip": max(20, args.connections + 4), "auth_failure_delay": 0.05},
    )
    # The daily allowance per user is 1000 by default; this user sends the whole load.
    set_config(data.path, "abuse", {"submissions_per_user_per_day": (args.messages + WARMUP) * 2})
    return data


def run_submission(
    world: Loopback, jobs: list[Job], args: argparse.Namespace
) -> tuple[EndToEnd, str]:
    from harness import ServerProcess

    with world.sink(args.domains * args.concurrency) as sink:
        data = submission_instance(world, args, sink.port)
        with ServerProcess(data) as server:
            assert server.proc is not None
            target = Target(
                "127.0.0.1",
                data.addr("submissions")[1],
                tls="implicit",
                username=USER,
                password=PASSWORD,
            )
            spy_on = world.root / "submission.spy" if args.profile else None
            return end_to_end(
                "submission → queue → MTA → sink",
                jobs,
                sink,
                target,
                args.connections,
                server.proc.pid,
                spy_on,
            )


# Postfix as the reference relay: its smtpd takes the messages on implicit TLS from
# mynetworks (no AUTH: Debian's Postfix has no SASL without Dovecot or Cyrus) and its smtp
# client relays every one to the sink with mandatory, validated TLS. It neither signs nor
# checks senders. Its DNS client would ask the system resolver, not the loopback DNS server,
# so the sink is its relayhost: the MX lookup is the one step it skips.
POSTFIX_RELAY_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = {owner}
setgid_group = {setgid}
myhostname = out.example.test
mydomain = example.test
myorigin = example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
relayhost = [127.0.0.1]:{sink_port}
default_transport = smtp
relay_transport = smtp
smtp_destination_concurrency_limit = {concurrency}
smtp_tls_security_level = secure
smtp_tls_secure_cert_match = {sink_name}
smtp_tls_CAfile = {ca}
# Postfix at its best: TLS connections to the sink reused (through tlsproxy), as Postvern's
# MTA reuses its own, and no inflow throttle.
smtp_tls_connection_reuse = yes
in_flow_delay = 0
smtpd_peername_lookup = no
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_client_connection_count_limit = 0
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
"""


def postfix_relay_class() -> type:
    from smtp_ingest import POSTFIX_MASTER, PostfixInstance

    class PostfixRelay(PostfixInstance):  # type: ignore[misc, valid-type]
        def __init__(self, root: Path, world: Loopback, sink_port: int, concurrency: int):
            cert, key = world.ca.issue("out.example.test")
            super().__init__(root, cert, key)
            self.extra = {
                "sink_port": sink_port, "sink_name": SINK_NAME, "ca": world.ca.path,
                "concurrency": concurrency,
            }  # fmt: skip

        def configure(self) -> None:
            super().configure()
            values = {
                "root": self.root, "owner": "postfix", "setgid": self.setgid,
                "cert": self.cert, "key": self.key, "port": self.port, **self.extra,
            }  # fmt: skip
            (self.conf / "main.cf").write_text(POSTFIX_RELAY_MAIN.format(**values))
            master = POSTFIX_MASTER.format(**values).replace(
                " smtpd\n",
                " smtpd -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt\n",
                1,
            )
            (self.conf / "master.cf").write_text(
                master
                + "smtp      unix  -       -       n       -       -       smtp\n"
                + "tlsproxy  unix  -       -       n       -       0       tlsproxy\n"
            )

        def _greets(self) -> bool:  # implicit TLS: a TCP accept is enough here
            import socket

            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    return True
            except OSError:
                return False

    return PostfixRelay


def run_postfix(world: Loopback, jobs: list[Job], args: argparse.Namespace) -> EndToEnd | None:
    if os.geteuid() != 0 or not Path("/usr/sbin/postfix").exists():
        print("postfix: needs root and /usr/sbin/postfix; left out")
        return None
    concurrency = args.domains * args.concurrency
    with world.sink(concurrency) as sink:
        relay = postfix_relay_class()(world.root / "postfix", world, sink.port, concurrency)
        relay.start()
        try:
            target = Target(MX_ADDRESS, relay.port, tls="implicit", helo="client.example.test")
            figures, _ = end_to_end(
                "postfix 3.7 relay → sink",
                jobs,
                sink,
                target,
                args.connections,
                relay.master_pid,
                tree=True,
            )
        finally:
            relay.stop()
    return figures


def submission_jobs(count: int, size: int, domains: list[str]) -> list[Job]:
    return [
        Job(s.mail_from, s.recipients, s.message)
        for s in text_messages(count, domains, size, sender=USER)
    ]


def main_figure(args: argparse.Namespace) -> tuple[EndToEnd, EndToEnd, EndToEnd | None, str]:
    with tempfile.TemporaryDirectory(prefix="postvern-outbound-") as tmp, DNSTestServer() as dns:
        root = Path(tmp)
        root.chmod(0o755)  # Postfix's daemons run as the postfix user below it
        world = loopback_world(root, dns, args.domains)
        jobs = submission_jobs(args.messages + WARMUP, args.size, world.domains)
        direct = run_direct(world, jobs, args.connections)
        postfix = run_postfix(world, jobs, args) if not args.no_postfix else None
        submission, profile = run_submission(world, jobs, args)
    return direct, submission, postfix, profile


def print_main(
    direct: EndToEnd, submission: EndToEnd, total: int, postfix: EndToEnd | None = None
) -> list[str]:
    print(
        f"{'':34}{'msg/s':>8}{'250/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'CPU ms/msg':>11}{'peak RSS':>11}{'arrived':>9}{'signed':>8}"
    )
    problems = []
    for f in (direct, *([postfix] if postfix else []), submission):
        print(
            f"{f.path:34}{f.per_second:>8.0f}{f.accepted_per_second:>8.0f}{f.p50_ms:>8.1f}"
            f"{f.p99_ms:>8.1f}{f.server_cpu_ms:>11.2f}{f.server_peak_rss_mib:>7.1f} MiB"
            f"{f.arrived:>9}{f.signed:>8}"
        )
        if f.refused:
            print(f"{'  refused':34}{f.refused}")
        if f.arrived != total:
            problems.append(f"{f.path}: {f.arrived} of {total} arrived")
    print(
        f"{'  the sink, during submission':34}{'':32}{submission.sink_cpu_ms:>11.2f}"
        f"{submission.sink_peak_rss_mib:>7.1f} MiB"
    )
    if submission.signed != total:
        problems.append(f"submission: {submission.signed} of {total} arrived dual-signed")
    print(
        "(CPU and peak RSS: the sink's for direct, Postvern's for submission; msg/s is end to "
        "end,\n until the sink accepted the last message; 250/s is the client's view)"
    )
    print(
        f"\nratio submission→MTA / direct: {submission.per_second / direct.per_second:.3g}× "
        f"messages per second; Postvern {submission.server_cpu_ms:.2f} ms CPU and "
        f"{submission.server_peak_rss_mib:.1f} MiB peak RSS"
    )
    if postfix is not None:
        print(
            f"ratio submission→MTA / Postfix relay: "
            f"{submission.per_second / postfix.per_second:.3g}× messages per second, "
            f"{submission.server_cpu_ms / postfix.server_cpu_ms:.3g}× CPU per message, "
            f"{submission.server_peak_rss_mib / postfix.server_peak_rss_mib:.3g}× peak RSS "
            "(Postfix: no AUTH, no signing, relayhost instead of MX lookups; its CPU and RSS "
            "summed over its processes)"
        )
    return problems


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
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child
        # would report its parent's peak.
        rss_before = common.peak_rss_kib(os.getpid())
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
        result["peak_rss_kib"] = common.peak_rss_kib(os.getpid())
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
    options = {k: getattr(args, k) for k in MTA_ONLY_OPTIONS}
    argv = [sys.executable, __file__, "--child", mode] + [
        f"--{k}={v}" for k, v in options.items() if v is not None
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


MTA_ONLY_OPTIONS = ("messages", "size", "domains", "concurrency", "submitters", "source", "inject")


def mta_only(args: argparse.Namespace) -> tuple[Figures, Figures]:
    print("\nSecondary: the MTA alone (in-process queue and OutboundMTA, no submission, no DKIM)")
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
    print(f"ratio queue+MTA / direct: {mta.per_second / baseline.per_second:.2f}×")
    return baseline, mta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--domains", type=int, default=4, help="recipient domains")
    parser.add_argument("--concurrency", type=int, default=4, help="MTA connections per domain")
    parser.add_argument(
        "--connections", type=int, default=16, help="submission (and direct) connections"
    )
    parser.add_argument("--submitters", type=int, default=16, help="MTA-only: enqueuers")
    parser.add_argument("--source", help="MTA-only: module:function yielding Submissions")
    parser.add_argument("--inject", help="MTA-only: module:function (queue, submission)")
    parser.add_argument("--skip-mta-only", action="store_true", help="main figure only")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the server during the submission load"
    )
    parser.add_argument("--no-postfix", action="store_true", help="leave out the Postfix relay")
    parser.add_argument("--child", dest="mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(asyncio.run(child(args))))
        return

    total = args.messages + WARMUP
    print(
        f"Outbound: {args.messages} messages of ~{args.size} bytes (+{WARMUP} warm-up) to "
        f"{args.domains} domains; {args.connections} submission connections (465, AUTH); "
        f"MTA {args.concurrency} connections per domain; validated STARTTLS to a loopback "
        f"sink\n{common.machine_load()} at the start\n"
    )
    started = time.perf_counter()
    direct, submission, postfix, profile = main_figure(args)
    problems = print_main(direct, submission, total, postfix)
    secondary = None if args.skip_mta_only else mta_only(args)
    print(f"\n{common.machine_load()} at the end; {time.perf_counter() - started:.0f} s in all")
    if profile:
        print("\n" + profile)
    result: dict[str, object] = {"direct": asdict(direct), "submission": asdict(submission)}
    if postfix is not None:
        result["postfix"] = asdict(postfix)
    if secondary:
        result["mta_only"] = {"baseline": asdict(secondary[0]), "mta": asdict(secondary[1])}
    print(json.dumps(result))
    if problems:
        raise SystemExit("NOT EVERY MESSAGE ARRIVED: " + "; ".join(problems))


if __name__ == "__main__":
    main()
