"""Login benchmark: a cold login (Argon2id at the shipped cost) and warm logins per second.

Postvern's IMAP listener is started on a data directory with the **default** key-slot cost
(Argon2id, 64 MiB, t=3, p=4 — not the cheap one the other benchmarks use), beside a private
Dovecot with a passwd-file user, in the same run. Raw-socket load processes run connect,
LOGIN, LOGOUT in a loop:

  * cold: the first login of each of several users (every one pays Argon2id);
    goal ≤ 200 ms median on this machine;
  * warm: repeated logins of one user, answered from the login cache (login_cache.py);
    goal ≥ 1,000 logins/s; Dovecot's rate on the same loop is the reference.

Plaintext on loopback for both, so TLS handshakes weigh on neither.

``--workers N`` (default 2) runs Postvern's IMAP listener in N processes sharing one
listening socket, as ``[server] workers`` does (workers.py): this process binds it once and
each worker inherits it through ``POSTVERN_LISTEN_FDS`` (handoff.py), so the kernel spreads
the connections. Each worker keeps its own warm-login cache: a user's first login on each
worker pays Argon2id, which the warm-up does.

Each side's CPU per warm login is printed beside the rates (the servers' processes, and
the load processes' own): on a shared machine the rate follows whatever else runs, the CPU
a login costs does not. The load is ``--clients`` processes (not threads: they would queue
for one GIL at every answer), each a plain socket loop.

Usage: python bench/login.py [--logins 3000] [--clients 4] [--users 8] [--workers 2]
                             [--event-loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (CPU of processes)
import imap  # noqa: E402  (the IMAP benchmark's client, Dovecot set-up and --serve mode)

PASSWORD = imap.PASSWORD


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def seed(root: Path, users: int) -> tuple[Path, int, list[str]]:
    """A data directory at the shipped Argon2id cost, with ``users`` accounts."""
    from postvern import config
    from postvern.app import App
    from postvern.cli import init_data_dir

    data = root / "postvern"
    port = imap.free_port()
    init_data_dir(data, "mx.example.test", "example.test", {"imap": f"127.0.0.1:{port}"})
    settings = config.load(data, environ={})
    settings.limits.auth_failure_delay = 0.0
    (data / config.CONFIG_NAME).write_text(config.render(settings))
    names = [imap.USER] + [f"user{i}@example.test" for i in range(1, users)]
    app = App.open(data)
    try:
        for name in names:
            app.accounts.create_user(name, PASSWORD)
        kdf = app.accounts.kdf
    finally:
        app.close()
    print(
        f"Argon2id: {kdf.memory_kib // 1024} MiB, t={kdf.time_cost}, p={kdf.parallelism}",
        flush=True,
    )
    return data, port, names


def serve_worker(data: Path, port: int, event_loop: str) -> None:
    """``--serve-worker``: the IMAP listener alone (imap.py's), on the inherited socket."""
    from postvern import config, handoff, workers

    if event_loop == "uvloop":  # as [server] event_loop = "uvloop" (net.event_loop_factory)
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    handoff.inherit(config.load(data).listen)  # POSTVERN_LISTEN_FDS: imap=<fd>
    workers.balance_accepts()  # one connection per loop turn, as a server's worker takes
    imap.serve_postvern(data, port)  # its listener takes the inherited socket


def start_workers(
    data: Path, port: int, count: int, event_loop: str
) -> tuple[list[subprocess.Popen[bytes]], socket.socket]:
    """``count`` listener processes on one socket bound here (as the supervisor does)."""
    from postvern import handoff

    sock = handoff.bind("127.0.0.1", port)
    procs = []
    for _ in range(count):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
        env[handoff.HANDOFF_FDS] = f"imap={sock.fileno()}"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-worker", str(data), str(port), event_loop],
            stdout=subprocess.PIPE,
            env=env,
            pass_fds=(sock.fileno(),),
            start_new_session=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        procs.append(proc)
    return procs, sock


def login_once(port: int, user: str) -> float:
    start = time.perf_counter()
    client = imap.Client(port)
    client.command(f'LOGIN {user} "{PASSWORD}"'.encode())
    client.command(b"LOGOUT")
    client.close()
    return time.perf_counter() - start


def _until(sock: socket.socket, marker: bytes) -> bytes:
    """Read until the data ends with a line starting with ``marker`` (b"" for any line)."""
    data = sock.recv(4096)
    while not data.endswith(b"\r\n") or (marker and marker not in data):
        more = sock.recv(4096)
        if not more:
            raise ConnectionError(f"closed before {marker!r}: {data!r}")
        data += more
    return data


def _login_loop(port: int, user: str, count: int, start: Any, failed: Any) -> None:
    """One load process: ``count`` rounds of connect, LOGIN, LOGOUT with as few Python steps
    as a round allows (one recv per answer on loopback), so that the generator's share of
    the two shared cores stays small next to the servers'. A process, not a thread: four
    threads of one interpreter queue for its GIL at every answer."""
    login = f'a LOGIN {user} "{PASSWORD}"\r\n'.encode()
    address = ("127.0.0.1", port)
    start.wait()
    try:
        for _ in range(count):
            with socket.create_connection(address) as sock:
                _until(sock, b"")  # the greeting
                sock.sendall(login)
                if b"\r\na OK" not in b"\r\n" + _until(sock, b"a "):
                    raise RuntimeError("LOGIN refused")
                sock.sendall(b"b LOGOUT\r\n")
                _until(sock, b"b OK")
    except BaseException as e:
        failed.put(repr(e))
        raise


@dataclass
class Rate:
    logins_per_second: float
    server_ms: float  # CPU of the server's processes per login
    client_ms: float  # CPU of the load processes per login


def login_rate(
    port: int, user: str, logins: int, clients: int, server: Callable[[], float], warm: int = 1
) -> Rate:
    """``clients`` load processes sharing ``logins`` connect-LOGIN-LOGOUT rounds; the CPU
    both sides spent (``server()`` reads the servers' CPU seconds so far)."""
    per_client = logins // clients
    for _ in range(warm):  # warm: the caches (ours, one per worker), Dovecot's auth process
        login_once(port, user)
    ctx = multiprocessing.get_context("fork")
    start, failed = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_login_loop, args=(port, user, per_client, start, failed))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    time.sleep(0.5)  # every process up and waiting
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server()
    began = time.perf_counter()
    start.set()
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - began
    server_cpu = server() - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"a load process failed: {failed.get(timeout=5)}")
    done = per_client * clients
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Rate(done / elapsed, server_cpu / done * 1000, client_cpu / done * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=8, help="cold logins measured")
    parser.add_argument("--workers", type=int, default=2, help="Postvern listener processes")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--serve-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        serve_worker(Path(args.serve_worker[0]), int(args.serve_worker[1]), args.serve_worker[2])
        return
    imap.raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="login-bench-"))
    os.chmod(root, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        data, our_port, users = seed(root, args.users)
        base, dove_port = imap.seed_dovecot(root, [], args.clients)
        workers, listening = start_workers(data, our_port, args.workers, args.event_loop)
        listening.close()  # the workers hold it now
        procs += workers
        dovecot = imap.start_dovecot(base)
        procs.append(dovecot)
        imap.wait_port(dove_port)

        cold = [login_once(our_port, user) for user in users]
        ours = [w.pid for w in workers]
        # Enough warm-up logins that each worker has run Argon2id once for the user.
        warm = login_rate(
            our_port,
            imap.USER,
            args.logins,
            args.clients,
            lambda: sum(common.cpu_seconds(pid) for pid in ours),
            warm=8 * args.workers,
        )
        reference = login_rate(
            dove_port,
            imap.USER,
            args.logins,
            args.clients,
            lambda: common.tree_cpu_seconds(dovecot.pid),
        )
        print(
            f"\nIMAP LOGIN, {args.clients} load processes, connect + LOGIN + LOGOUT per login,"
            f" Postvern in {args.workers} worker process(es), {args.event_loop} event loop;"
            f" {machine_load()}"
        )
        print(
            f"cold login (Argon2id), {len(cold)} users: median {statistics.median(cold) * 1000:.0f}"
            f" ms, worst {max(cold) * 1000:.0f} ms   goal: median ≤ 200 ms"
        )
        print(
            f"warm logins/s: Postvern {warm.logins_per_second:,.0f},"
            f" Dovecot {reference.logins_per_second:,.0f},"
            f" ratio {warm.logins_per_second / reference.logins_per_second:.2f}×"
            "   goal: ≥ 1,000/s"
        )
        # On a shared machine the rate follows whatever else runs; CPU per login does not.
        print(
            f"CPU per warm login: Postvern {warm.server_ms:.3f} ms (its workers),"
            f" Dovecot {reference.server_ms:.3f} ms (all its processes),"
            f" ratio {warm.server_ms / reference.server_ms:.2f}×;"
            f" the load itself {warm.client_ms:.3f} ms against Postvern,"
            f" {reference.client_ms:.3f} ms against Dovecot"
        )
        cores = 1000 / warm.server_ms
        print(f"  → Postvern's workers would answer {cores:,.0f} warm logins/s per free core")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
