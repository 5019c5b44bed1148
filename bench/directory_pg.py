"""Does one PostgreSQL connection per process limit the directory? (issue #20, docs/cluster.md)

A server process makes its directory calls from worker threads. Through one connection (as
with the SQLite file) each call holds the directory's lock for its round trip, so calls of
one process run one at a time; with the pool (directory/pgpool.py, ``[directory] pool``) up
to that many run at once. This measures one directory shared by C threads with ``pool = 1``
against ``pool = P``, on a real private PostgreSQL over verified TLS (tests/pg_server.py),
with the SQLite directory as the reference of the same run.

Calls measured, from C threads at once for S seconds each:

* ``resolve``: ``resolve(address)`` of a user — an MX's RCPT TO (one round trip);
* ``login``: ``user(address)`` then ``slots(user_id, 'password')`` — the directory's part of a
  cold login, without Argon2id (that runs outside the directory and would hide it);
* ``confirm``: ``confirm_slot(slot)`` — a warm login's recheck of its key slot.

Then the time of the directory's export (what each snapshot reads, directory/pgdump.py) and
of verify's load of it into a scratch schema.

Reported per call kind: calls/s and the median/p99 latency with one connection and with the
pool, the ratio pool/one, and SQLite's calls/s.

Usage: python bench/directory_pg.py [--threads 1,4,8] [--pool 4] [--seconds 3] [--users 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from common import machine_load

from pg_server import PostgresTestServer  # isort: skip

from postvern.crypto.keyslots import KDFParams, WrappedKey
from postvern.directory import Directory, pgdump

DOMAIN = "bench.test"


def populate(directory: Directory, users: int) -> None:
    directory.add_domain(DOMAIN)
    kdf = KDFParams(1, 8 * 1024, 1)
    for i in range(users):
        # The slot's content is not what is measured: random bytes of the real sizes.
        slot = WrappedKey(os.urandom(16), os.urandom(12), os.urandom(48), kdf)
        directory.insert_user(
            directory.new_user_id(),
            f"user{i}@{DOMAIN}",
            0,
            os.urandom(32),
            [("password", None, None, slot)],
        )


def calls(directory: Directory, users: int) -> dict[str, Callable[[int], object]]:
    slots = {}
    for i in range(users):
        user = directory.user(f"user{i}@{DOMAIN}")
        assert user is not None
        slots[i] = directory.slots(user.id, "password")[0]

    def login(i: int) -> object:
        user = directory.user(f"user{i % users}@{DOMAIN}")
        assert user is not None
        return directory.slots(user.id, "password")

    return {
        "resolve": lambda i: directory.resolve(f"user{i % users}@{DOMAIN}"),
        "login": login,
        # touch_interval: far in the future, so it stays a read (as it is between touches).
        "confirm": lambda i: directory.confirm_slot(slots[i % users], touch_interval=10**9),
    }


def drive(
    kinds: list[dict[str, Callable[[int], object]]], kind: str, seconds: float
) -> tuple[float, float, float]:
    """Threads, one per entry of ``kinds``, each calling its own ``kind`` for ``seconds``;
    (calls/s, median ms, p99 ms)."""
    latencies: list[list[float]] = [[] for _ in kinds]
    barrier = threading.Barrier(len(kinds) + 1)
    stop = threading.Event()

    def worker(n: int) -> None:
        fn = kinds[n][kind]
        mine = latencies[n]
        i = n * 7919
        barrier.wait()
        while not stop.is_set():
            t = time.perf_counter()
            fn(i)
            mine.append(time.perf_counter() - t)
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(kinds))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    every = sorted(x for mine in latencies for x in mine)
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))]
    return len(every) / elapsed, statistics.median(every) * 1000, p99 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,4,8")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=500)
    args = parser.parse_args()
    counts = [int(x) for x in args.threads.split(",")]
    key = os.urandom(32)
    print(f"load average before: {machine_load()}")
    with PostgresTestServer() as pg, TemporaryDirectory() as tmp:
        database = pg.new_database()
        one = Directory.open_postgres(database.target(pool=1), key)
        populate(one, args.users)
        pooled = Directory.open_postgres(database.target(pool=args.pool), key)
        lite = Directory.open(Path(tmp), key, create=True)
        populate(lite, args.users)
        one_calls, pool_calls = calls(one, args.users), calls(pooled, args.users)
        lite_calls = calls(lite, args.users)
        print(f"{args.users} users; {args.seconds:g} s per figure; TLS verify-full on 127.0.0.1")
        print(
            f"call     thr  pool=1 calls/s  p50/p99 ms    pool={args.pool} calls/s  p50/p99 ms"
            "    pool/one   SQLite calls/s"
        )
        for kind in ("resolve", "login", "confirm"):
            for n in counts:
                a = drive([one_calls] * n, kind, args.seconds)
                b = drive([pool_calls] * n, kind, args.seconds)
                c = drive([lite_calls] * n, kind, args.seconds)
                print(
                    f"{kind:<8} {n:>3}  {a[0]:>13,.0f}  {a[1]:5.2f}/{a[2]:6.2f}"
                    f"  {b[0]:>13,.0f}  {b[1]:5.2f}/{b[2]:6.2f}"
                    f"    {b[0] / a[0]:5.2f}x   {c[0]:>12,.0f}"
                )
        print(f"connections the pool opened: {pooled._conn.opened}")  # type: ignore[attr-defined]
        # What every snapshot (and replication point) pays for a PostgreSQL directory.
        started = time.perf_counter()
        plain, _ = pgdump.export(database.target())
        exported = time.perf_counter() - started
        started = time.perf_counter()
        counts = pgdump.trial_load(database.target(), pgdump.parse(plain))
        loaded = time.perf_counter() - started
        print(
            f"export of {counts['users']} users ({sum(counts.values())} rows): {exported:.2f} s,"
            f" {len(plain) / 1e6:.2f} MB; verify's scratch load: {loaded:.2f} s"
        )
        for d in (one, pooled, lite):
            d.close()
    print(f"load average after: {machine_load()}")


if __name__ == "__main__":
    main()
