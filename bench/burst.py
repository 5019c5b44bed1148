"""Peak memory of first deliveries: one message against N at once, each on a fresh server.

A freshly started ``postvern serve`` (the smtp_ingest.py set-up: SPF, DKIM, DMARC on loopback
DNS, the content filter, the sealed spool) gets either one message or N concurrent ones,
each on its own connection, before anything has warmed up; the server's peak RSS (VmHWM,
summed over its process tree's peaks) is printed for both, and their ratio. The goal: N =
100 within 2× of one.

Usage: python bench/burst.py [--concurrent 100] [--size 10000] [--filter-processes 0]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import common  # first: it puts tests/ on sys.path for the imports below
from common import Target
from dnsserver import DNSTestServer
from harness import ServerProcess, set_config
from smtp_ingest import DNS_TTL, make_jobs, postvern_data, sender_domains

# After the last reply, how long the server gets to finish what it does after 250.
SETTLE = 1.0


def peak_tree_mib(root: int) -> float:
    return sum(common.peak_rss_kib(pid) for pid in common.process_tree(root)) / 1024


def one_burst(
    root: Path,
    dns: DNSTestServer,
    jobs: list[common.Job],
    processes: int,
    env: dict[str, str],
    warm: common.Job | None = None,
) -> float:
    data = postvern_data(root, dns, len(jobs) + 4, len(jobs) * 4, processes)
    set_config(data.path, "limits", {"connections_per_ip": len(jobs) + 4, "connections": 1000})
    with ServerProcess(data, env=env) as server:
        assert server.proc is not None
        target = Target("127.0.0.1", data.addr("smtp")[1])
        if warm is not None:  # one message first: what loads lazily is loaded once
            asyncio.run(common.send_all(target, [warm], 1))
        result = asyncio.run(common.send_all(target, jobs, len(jobs)))
        time.sleep(SETTLE)
        if result.accepted != len(jobs):
            print(f"  refused: {result.refused}")
        return peak_tree_mib(server.proc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--filter-processes", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--warm", action="store_true", help="one delivery before the burst (not a first one)"
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    args = parser.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    print(f"First deliveries: 1 against {args.concurrent} at once\n{common.machine_load()}")
    domains = sender_domains(4)
    jobs = make_jobs(args.concurrent, args.size, domains)
    with tempfile.TemporaryDirectory(prefix="postvern-burst-") as tmp, DNSTestServer() as dns:
        for d in domains:
            for name, txt in d.zone().items():
                dns.add(name, "TXT", txt, ttl=DNS_TTL)
        for n in range(args.rounds):
            warm = jobs[-1] if args.warm else None
            one = one_burst(Path(tmp) / f"one-{n}", dns, jobs[:1], args.filter_processes, env, warm)
            many = one_burst(Path(tmp) / f"many-{n}", dns, jobs, args.filter_processes, env, warm)
            print(
                f"  peak RSS: 1 delivery {one:.1f} MiB, {args.concurrent} concurrent "
                f"{many:.1f} MiB: {many / one:.2f}× ({common.machine_load()})",
                flush=True,
            )


if __name__ == "__main__":
    main()
