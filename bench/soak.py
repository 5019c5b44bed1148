"""Soak benchmark: ``postvern serve`` under a steady SMTP load for minutes, RSS sampled.

The same server set-up as ``smtp_ingest.py`` (SPF, DKIM and DMARC against loopback DNS, the
content filter, rate-limit accounting, every message sealed and fsynced into the spool of a
locked mailbox), fed a steady rate of dual-signed ~10 KB messages over a few reused STARTTLS
connections. Every ``--interval`` seconds it prints the server's RSS (summed over its
process tree: filter children count too), and at the end the growth from the first minute
to the last and the least-squares slope over the second half of the run — memory that is
flat by design shows no slope there. It stops by itself after ``--minutes``.

Usage: python bench/soak.py [--minutes 10] [--rate 40] [--interval 10] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib

import common  # first: it puts tests/ on sys.path for the imports below
from common import Job, Target
from dnsserver import DNSTestServer
from harness import ServerProcess, set_config
from smtp_ingest import DNS_TTL, make_jobs, postvern_data, sender_domains

# Distinct signed messages cycled through: enough that no cache sees only a handful.
POOL = 400
# Seconds the server gets to start (allocation tracing makes it several times slower).
START_TIMEOUT = 300.0
# Messages sent before the first sample: the model, DNS answers and code paths load lazily.
WARMUP = 40


# The server side of --tracemalloc: a sitecustomize module that traces allocations (10
# frames), takes a baseline snapshot when the load generator says the warm-up is over (the
# file OUT.go appears) and then, at every interval, writes the allocation sites that grew
# most since the baseline.
TRACEMALLOC_SITE = """\
import os, threading, time, tracemalloc
tracemalloc.start(10)
def _watch(out=os.environ["SOAK_TRACEMALLOC_OUT"], every=float(os.environ["SOAK_INTERVAL"])):
    while not os.path.exists(out + ".go"):
        time.sleep(0.5)
    base = tracemalloc.take_snapshot()
    while True:
        time.sleep(every)
        diff = tracemalloc.take_snapshot().compare_to(base, "traceback")
        with open(out + ".tmp", "w") as f:
            for stat in diff[:12]:
                f.write(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks\\n")
                for line in stat.traceback.format()[-8:]:
                    f.write("      " + line + "\\n")
        os.replace(out + ".tmp", out)
threading.Thread(target=_watch, daemon=True).start()
"""


def tracemalloc_env(root: Path, interval: float) -> dict[str, str]:
    site = root / "tracemalloc-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TRACEMALLOC_SITE)
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "SOAK_TRACEMALLOC_OUT": str(root / "tracemalloc.txt"),
        "SOAK_INTERVAL": str(interval),
    }


@contextlib.contextmanager
def started(server: ServerProcess, timeout: float) -> Iterator[ServerProcess]:
    server.start(timeout=timeout)
    try:
        yield server
    finally:
        server.stop()


def rss_mib(root: int) -> float:
    """The summed VmRSS of the server and its children (filter processes), MiB."""
    return sum(common._status_kib(pid, "VmRSS") for pid in common.process_tree(root)) / 1024


def slope_mib_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if not var:
        return 0.0
    return sum((t - mean_t) * (m - mean_m) for t, m in samples) / var * 60


class Pacer:
    """Steady load: connections take send slots from one schedule at ``rate`` per second."""

    def __init__(self, rate: float, until: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()
        self.until = until
        self.sent = 0
        self.refused = 0

    async def slot(self) -> bool:
        now = time.monotonic()
        if now >= self.until:
            return False
        at = max(self.next, now - 1.0)  # a stall is not made up in a burst of more than 1 s
        self.next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)
        return time.monotonic() < self.until


async def steady_load(target: Target, jobs: list[Job], connections: int, pacer: Pacer) -> None:
    """Each connection is kept and reused (a steady rate needs no handshake per message);
    one that drops is opened again."""
    cycle = itertools.cycle(jobs)
    context = common.trust_anything()

    async def connection() -> None:
        smtp = await common._connect(target, context)
        while await pacer.slot():
            job = next(cycle)
            try:
                await smtp.sendmail(job.mail_from, job.recipients, job.data)
                pacer.sent += 1
            except aiosmtplib.SMTPServerDisconnected:
                pacer.refused += 1
                smtp = await common._connect(target, context)
            except aiosmtplib.SMTPException:
                pacer.refused += 1
        with contextlib.suppress(aiosmtplib.SMTPException):
            await smtp.quit()

    await asyncio.gather(*(connection() for _ in range(connections)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=40.0, help="messages per second")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--filter-processes", type=int, default=0, help="[filters] processes")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the server's allocations; print the sites that grew most after warm-up",
    )
    args = parser.parse_args()
    print(
        f"Soak: {args.rate:g} msg/s of ~{args.size} bytes for {args.minutes:g} min over "
        f"{args.connections} connections, RSS every {args.interval:g} s\n"
        f"{common.machine_load()} at the start",
        flush=True,
    )
    domains = sender_domains(4)
    jobs = make_jobs(POOL, args.size, domains)
    with tempfile.TemporaryDirectory(prefix="postvern-soak-") as tmp, DNSTestServer() as dns:
        for d in domains:
            for name, txt in d.zone().items():
                dns.add(name, "TXT", txt, ttl=DNS_TTL)
        total = int(args.rate * args.minutes * 60) + WARMUP
        data = postvern_data(Path(tmp), dns, args.connections, total)
        if args.filter_processes:
            set_config(data.path, "filters", {"processes": args.filter_processes})
        env = tracemalloc_env(Path(tmp), 60.0) if args.tracemalloc else {}
        # Tracing allocations slows the start (the spam model is many small objects).
        with started(ServerProcess(data, env=env), START_TIMEOUT) as server:
            assert server.proc is not None
            pid = server.proc.pid
            target = Target("127.0.0.1", data.addr("smtp")[1])
            asyncio.run(common.send_all(target, jobs[:WARMUP], 1))
            (Path(tmp) / "tracemalloc.txt.go").touch()  # the baseline, after the warm-up
            start = time.monotonic()
            pacer = Pacer(args.rate, start + args.minutes * 60)
            samples: list[tuple[float, float]] = []
            stop = threading.Event()

            def sample() -> None:
                while True:
                    t = time.monotonic() - start
                    mib = rss_mib(pid)
                    samples.append((t, mib))
                    print(
                        f"  {t:6.0f} s  {pacer.sent:7d} sent  {pacer.refused:4d} refused  "
                        f"RSS {mib:7.1f} MiB",
                        flush=True,
                    )
                    if stop.wait(args.interval):
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(steady_load(target, jobs, args.connections, pacer))
            stop.set()
            sampler.join()
            elapsed = time.monotonic() - start
            traced = Path(tmp) / "tracemalloc.txt"
            if traced.exists():
                print("\nallocation sites grown most since the warm-up (tracemalloc):")
                print(traced.read_text())
    print(f"\n{common.machine_load()} at the end")
    if not samples:
        return
    first = [m for t, m in samples if t <= 60] or [samples[0][1]]
    last = [m for t, m in samples if t >= elapsed - 60] or [samples[-1][1]]
    half = [(t, m) for t, m in samples if t >= elapsed / 2]
    print(
        f"sent {pacer.sent} ({pacer.sent / elapsed:.1f} msg/s), refused {pacer.refused}\n"
        f"RSS first minute {sum(first) / len(first):.1f} MiB, last minute "
        f"{sum(last) / len(last):.1f} MiB, peak {max(m for _, m in samples):.1f} MiB; "
        f"slope over the second half {slope_mib_per_minute(half):+.2f} MiB/min"
    )


if __name__ == "__main__":
    main()
