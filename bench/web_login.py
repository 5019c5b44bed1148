"""Web login and dashboard benchmark for the account portal (issue #16).

The server runs on a data directory with the **default** key-slot cost (Argon2id, 64 MiB,
t=3, p=4) and the warm-login cache turned off, so every login pays Argon2id. Over real
HTTPS with a cookie-keeping client it measures, in the same run:

  * web login (GET the form, POST address and password, follow to the dashboard):
    median and p99; goal ≤ 250 ms median on this machine. The reference is one Argon2id
    derivation with the same parameters in this process: the ratio is what the portal
    adds on top of the KDF it cannot avoid;
  * a login for an address that does not exist, against a wrong password for one that
    does: the ratio should be 1 (no account enumeration by timing);
  * dashboard pages per second with CONCURRENCY clients on one session each, against
    ``/healthz`` on the same listener (the listener's own floor) as the reference.

Usage: python bench/web_login.py [--logins 40] [--seconds 5]

Each series is measured in interleaved rounds, so a change of machine load during the run
weighs on all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from harness import DataDir, ServerProcess, make_data_dir, set_config  # noqa: E402
from portal_kit import Browser  # noqa: E402
from postvern.crypto import keyslots  # noqa: E402
from postvern.crypto.keyslots import KDFParams  # noqa: E402

ADDRESS = "alice@example.test"
PASSWORD = "alice-correct-horse-battery"
CONCURRENCY = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed_logins(data: DataDir, address: str, password: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        browser = Browser(data)
        try:
            await browser.get("/account/login")
            started = time.perf_counter()
            await browser.login_post(address, password)
            times.append(time.perf_counter() - started)
        finally:
            await browser.close()
    return times


async def pages_per_second(data: DataDir, path: str, seconds: float) -> float:
    browsers = [Browser(data) for _ in range(CONCURRENCY)]
    try:
        for b in browsers:
            await b.login(ADDRESS, PASSWORD)
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop(b: Browser) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                r = await b.http.get(b.base + path)
                await r.read()
                assert r.status == 200
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(b) for b in browsers))
        return done / (time.perf_counter() - started)
    finally:
        for b in browsers:
            await b.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_dir(Path(tmp) / "data", passwords={}, listeners=("https",))
        defaults = KDFParams()
        set_config(
            data.path,
            "kdf",
            {
                "time_cost": defaults.time_cost,
                "memory_kib": defaults.memory_kib,
                "parallelism": defaults.parallelism,
            },
        )
        set_config(data.path, "limits", {"login_cache_seconds": 0.0, "auth_failure_delay": 0.0})
        app = data.app()
        try:
            app.accounts.create_user(ADDRESS, PASSWORD)
        finally:
            app.close()
        with ServerProcess(data):
            # Interleaved rounds: a machine whose load changes during the run weighs on
            # every series alike.
            kdf: list[float] = []
            logins: list[float] = []
            wrong: list[float] = []
            unknown: list[float] = []
            for _ in range(args.logins):
                started = time.perf_counter()
                keyslots.derive_kek(PASSWORD.encode(), b"0123456789abcdef", defaults)
                kdf.append(time.perf_counter() - started)
                logins += await timed_logins(data, ADDRESS, PASSWORD, 1)
                wrong += await timed_logins(data, ADDRESS, "wrong-password-123", 1)
                unknown += await timed_logins(data, "nobody@example.test", "wrong-password-1", 1)
            dashboard = await pages_per_second(data, "/account/", args.seconds)
            health = await pages_per_second(data, "/healthz", args.seconds)
    med, p99, kdf_med = statistics.median(logins), percentile(logins, 0.99), statistics.median(kdf)
    w, u = statistics.median(wrong), statistics.median(unknown)
    d = defaults
    print(f"Argon2id t={d.time_cost} m={d.memory_kib // 1024} MiB p={d.parallelism}")
    print(f"web login:       median {ms(med)}  p99 {ms(p99)}  (goal <= 250 ms median)")
    print(f"Argon2id alone:  median {ms(kdf_med)}  web login / Argon2id = {med / kdf_med:.2f}x")
    print(f"wrong password:  median {ms(w)}  unknown address {ms(u)}  ratio {u / w:.2f}x")
    print(
        f"dashboard:       {dashboard:7.0f} pages/s  /healthz {health:7.0f}/s"
        f"  ratio {dashboard / health:.2f}x  ({CONCURRENCY} clients)"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.1f} ms"


if __name__ == "__main__":
    asyncio.run(main())
