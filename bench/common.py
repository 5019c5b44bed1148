"""Shared parts of the SMTP benchmarks: the load generator, a discarding sink, process figures.

The load generator is aiosmtplib on N reused connections pulling from one work list, so every
system under test sees exactly the same client. The sink is a minimal asyncio SMTP server
(``serve_smtp`` with a handler that answers 250 and keeps nothing) run as its own process,
so its memory and CPU are measured like any other server's. Process figures come from
/proc: peak RSS (VmHWM), CPU seconds, and the summed PSS of a process tree sampled over time
for servers made of many processes (Postfix).

Run as a program it is the sink: ``python bench/common.py sink --port P --cert C --key K``;
it prints ``ready`` and then answers each ``stats`` line on stdin with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# How often a tree of server processes is sampled for memory: often enough to catch the
# peak of a run lasting tens of seconds, rare enough to cost nothing measurable.
SAMPLE_INTERVAL = 0.2
# A server that has not said it is ready by then has failed to start.
START_TIMEOUT = 60.0
# One SMTP command or message transfer; far above anything a healthy loopback server needs.
CLIENT_TIMEOUT = 120.0
# Reconnections a load connection makes after the server dropped it, before it gives up.
MAX_RECONNECTS = 3
# py-spy samples per second: prime, so it does not beat with periodic work.
PY_SPY_RATE = 97

WORDS = (
    "meeting report budget quarterly team project deadline review invoice schedule "
    "update proposal contract client delivery travel lunch office holiday notes draft "
    "agenda summary request approval feedback release version server account customer "
    "analysis forecast revenue hiring onboarding roadmap milestone sprint retrospective"
).split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy oscar peggy trent".split()


# --- Messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One message to send: its envelope and its bytes (CRLF line endings)."""

    mail_from: str
    recipients: list[str]
    data: bytes


def text_body(rng: random.Random, size: int) -> str:
    """Plain business prose of about ``size`` bytes, in lines of twelve words."""
    words: list[str] = []
    length = 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    return "\r\n".join(" ".join(words[j : j + 12]) for j in range(0, len(words), 12)) + "\r\n"


def text_message(rng: random.Random, marker: str, sender: str, recipient: str, size: int) -> bytes:
    """An ordinary person-to-person message of about ``size`` bytes, tagged with ``marker``
    (an X-Bench-Id field) so each one can be found again at the receiving end."""
    name = rng.choice(NAMES).title()
    head = (
        f"From: {name} <{sender}>\r\nTo: <{recipient}>\r\n"
        f"Subject: {rng.choice(WORDS)} {rng.choice(WORDS)} notes\r\n"
        f"Date: Mon, 6 Jan 2025 10:{rng.randrange(60):02d}:00 +0000\r\n"
        f"Message-ID: <{marker}.{rng.getrandbits(40):x}@{sender.rpartition('@')[2]}>\r\n"
        f"X-Bench-Id: {marker}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    )
    body = text_body(rng, max(0, size - len(head)))
    return (head + body).encode()


# --- The load generator -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how the load connects."""

    host: str
    port: int
    tls: str = "starttls"  # "starttls" (port 25/587) or "implicit" (port 465)
    username: str | None = None
    password: str | None = None
    helo: str = "client.bench.test"
    server_name: str | None = None  # SNI and the name checked when ``context`` verifies
    context: ssl.SSLContext | None = None  # default: encrypts, trusts any certificate


@dataclass
class LoadResult:
    seconds: float
    accepted: int
    refused: dict[str, int] = field(default_factory=dict)  # "451 4.3.0" -> count
    latencies: list[float] = field(default_factory=list)  # per accepted message, seconds
    started: float = 0.0  # time.monotonic() at the start (same clock in every process)

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def trust_anything() -> ssl.SSLContext:
    """The load is encrypted but does not authenticate the server (self-signed certificates)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _connect(target: Target, context: ssl.SSLContext) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=target.host,
        port=target.port,
        local_hostname=target.helo,
        timeout=CLIENT_TIMEOUT,
        use_tls=target.tls == "implicit",
        start_tls=False,
        tls_context=context,
    )
    await smtp.connect()
    if target.tls == "starttls":
        await smtp.starttls(server_hostname=target.server_name, tls_context=context)
    if target.username is not None:
        await smtp.login(target.username, target.password or "")
    return smtp


async def send_all(target: Target, jobs: Iterable[Job], connections: int) -> LoadResult:
    """Send every job over ``connections`` concurrent, reused connections.

    A refused message (4xx/5xx) is counted and the connection goes on; a dropped connection
    is reopened (at most MAX_RECONNECTS times) and its message counted as refused.
    """
    context = target.context or trust_anything()
    work = list(jobs)
    work.reverse()  # pop() from the end keeps the original order
    result = LoadResult(seconds=0.0, accepted=0)

    def refused(key: str) -> None:
        result.refused[key] = result.refused.get(key, 0) + 1

    async def connection() -> None:
        smtp = await _connect(target, context)
        reconnects = 0
        while work:
            job = work.pop()
            sent = time.perf_counter()
            try:
                await smtp.sendmail(job.mail_from, job.recipients, job.data)
            except aiosmtplib.SMTPServerDisconnected:
                refused("disconnected")
                reconnects += 1
                if reconnects > MAX_RECONNECTS:
                    return
                smtp = await _connect(target, context)
                continue
            except aiosmtplib.SMTPRecipientsRefused as e:
                first = e.recipients[0] if e.recipients else None
                refused(f"RCPT {first.code if first else '?'}")
                continue
            except aiosmtplib.SMTPResponseException as e:
                refused(f"{e.code} {e.message.split()[0] if e.message else ''}".strip())
                continue
            result.latencies.append(time.perf_counter() - sent)
            result.accepted += 1
        with contextlib.suppress(aiosmtplib.SMTPException):
            await smtp.quit()

    result.started = time.monotonic()
    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    result.seconds = time.perf_counter() - start
    return result


# --- Process figures --------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    """One ``kB`` field of /proc/<pid>/status (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def peak_rss_kib(pid: int) -> int:
    """The kernel's record of the process's peak resident set (VmHWM)."""
    return _status_kib(pid, "VmHWM")


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces; skip past it


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU of the process (all its threads); with ``reaped_children`` also of
    the children it has waited for (a master process whose workers come and go)."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    total = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15 of proc(5))
    if reaped_children:
        total += int(f[13]) + int(f[14])  # cutime, cstime
    return total / ticks


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process tree: the live processes, plus every child the root has reaped."""
    return sum(cpu_seconds(p) for p in process_tree(root) if p != root) + cpu_seconds(
        root, reaped_children=True
    )


class MemorySampler:
    """Samples the summed PSS and RSS of a process tree in a thread; keeps the peaks."""

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.root = root
        self.interval = interval
        self.peak_pss_kib = 0
        self.peak_rss_kib = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = process_tree(self.root)
        self.peak_pss_kib = max(self.peak_pss_kib, sum(_pss_kib(p) for p in pids))
        self.peak_rss_kib = max(self.peak_rss_kib, sum(_status_kib(p, "VmRSS") for p in pids))
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def machine_load() -> str:
    """What else the shared machine was doing: load averages and CPUs."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


# --- Profiling a server process --------------------------------------------------------------


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` (every thread, only while it holds the GIL) until sent SIGINT."""
    exe = find_py_spy()
    if exe is None:
        raise SystemExit("--profile: py-spy is not installed (beside this Python, or on PATH)")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE), "--format", "raw",
         "--threads", "--gil", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


class PySpy:
    """py-spy recording a process while the ``with`` block runs; ``summary()`` after it."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self.seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    def __enter__(self) -> PySpy:
        self._proc = start_py_spy(self.pid, self.out)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self.seconds = time.perf_counter() - self._started
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def summary(self) -> str:
        return summarise_py_spy(self.out, self.seconds)


def _frame_name(frame: str) -> str:
    """``function (path/module.py:123)`` without the line number."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rpartition(':')[0] or where.rstrip(')')})"


def py_spy_stacks(path: Path) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: each stack, thread first then outermost frame
    first, with its sample count."""
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def summarise_py_spy(path: Path, seconds: float | None = None, top: int = 25) -> str:
    """Shares of the GIL-holding samples per thread, per function (self) and per function
    including callees, from py-spy's collapsed stacks. With ``seconds`` (how long it ran),
    also how much of the time some thread held the GIL: near 100% means the process is
    bound by its one interpreter, whatever the number of cores."""
    if not path.exists():
        return "(py-spy wrote nothing)"
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for frames, count in py_spy_stacks(path):
        total += count
        threads[frames[0]] += count
        named = [_frame_name(f) for f in frames[1:]]
        if named:
            own[named[-1]] += count
        for name in set(named):
            inclusive[name] += count
    if not total:
        return "(py-spy recorded no samples)"
    held = (
        f", the GIL held {100 * total / (PY_SPY_RATE * seconds):.0f}% of {seconds:.1f} s"
        if seconds
        else ""
    )
    lines = [f"py-spy: {total} samples of the GIL-holding thread at {PY_SPY_RATE}/s{held}"]
    for title, counter, n in (
        ("by thread", threads, 8),
        ("self", own, top),
        ("inclusive", inclusive, top),
    ):
        lines.append(f"  {title}:")
        lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in counter.most_common(n)]
    return "\n".join(lines)


# --- The sink ---------------------------------------------------------------------------------


class SinkProcess:
    """The discarding sink as a child process; ``stats()`` asks it for its counters."""

    def __init__(
        self, host: str, port: int, cert: Path, key: Path, hostname: str, connections: int = 64
    ) -> None:
        self.argv = [
            sys.executable, __file__, "sink", "--host", host, "--port", str(port),
            "--cert", str(cert), "--key", str(key), "--hostname", hostname,
            "--connections", str(connections),
        ]  # fmt: skip
        self.host, self.port = host, port
        self.proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> SinkProcess:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"sink did not start: {line!r}")
        return self

    def stats(self) -> dict[str, float]:
        """{"accepted", "signed" (messages with two or more DKIM-Signature fields),
        "last" (time.monotonic() of the last acceptance)}."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        with self._lock:
            self.proc.stdin.write("stats\n")
            self.proc.stdin.flush()
            return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run_sink(args: argparse.Namespace) -> None:
    from postvern.config import Limits
    from postvern.crypto import tls
    from postvern.smtp import replies
    from postvern.smtp.address import Address
    from postvern.smtp.commands import RcptParams
    from postvern.smtp.replies import Reply
    from postvern.smtp.session import BaseHandler, SessionState, serve_smtp

    counters = {"accepted": 0, "signed": 0, "last": 0.0}

    class Discard(BaseHandler):
        async def on_rcpt(
            self, state: SessionState, recipient: Address, params: RcptParams
        ) -> Reply:
            return replies.recipient_ok()

        async def on_message(self, state: SessionState, message: bytes) -> Reply:
            counters["accepted"] += 1
            counters["signed"] += message.count(b"DKIM-Signature:") >= 2
            counters["last"] = time.monotonic()
            return replies.message_accepted()

    async def main() -> None:
        limits = Limits(connections_per_ip=args.connections, connections=args.connections * 2)
        server = await serve_smtp(
            args.host,
            args.port,
            Discard,
            hostname=args.hostname,
            ssl_context=tls.server_context(Path(args.cert), Path(args.key)),
            limits=limits,
        )
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()

        def commands() -> None:  # stdin in a thread: the loop stays free for SMTP
            for line in sys.stdin:
                if line.strip() == "stats":
                    loop.call_soon_threadsafe(lambda: print(json.dumps(counters), flush=True))
            loop.call_soon_threadsafe(closed.set)

        threading.Thread(target=commands, daemon=True).start()
        print("ready", flush=True)
        await closed.wait()
        await server.shutdown(grace=1.0)

    asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the discarding SMTP sink")
    parser.add_argument("role", choices=["sink"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--hostname", default="sink.bench.test")
    parser.add_argument("--connections", type=int, default=64)
    _run_sink(parser.parse_args())
