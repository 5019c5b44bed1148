"""Login benchmark: a cold login (Argon2id at the shipped cost) and warm logins per second.

Postvern's IMAP listener is started on a data directory with the **default** key-slot cost
(Argon2id, 64 MiB, t=3, p=4 — not the cheap one the other benchmarks use), beside a private
Dovecot with a passwd-file user, in the same run. One raw-socket client per thread runs
connect, LOGIN, LOGOUT in a loop:

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

Usage: python bench/login.py [--logins 3000] [--clients 4] [--users 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

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


def serve_worker(data: Path, port: int) -> None:
    """``--serve-worker``: the IMAP listener alone (imap.py's), on the inherited socket."""
    from postvern import config, handoff, workers

    handoff.inherit(config.load(data).listen)  # POSTVERN_LISTEN_FDS: imap=<fd>
    workers.balance_accepts()  # one connection per loop turn, as a server's worker takes
    imap.serve_postvern(data, port)  # its listener takes the inherited socket


def start_workers(
    data: Path, port: int, count: int
) -> tuple[list[subprocess.Popen[bytes]], socket.socket]:
    """``count`` listener processes on one socket bound here (as the supervisor does)."""
    from postvern import handoff

    sock = handoff.bind("127.0.0.1", port)
    procs = []
    for _ in range(count):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
        env[handoff.HANDOFF_FDS] = f"imap={sock.fileno()}"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-worker", str(data), str(port)],
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


def login_rate(port: int, user: str, logins: int, clients: int, warm: int = 1) -> float:
    """Logins per second, ``clients`` threads sharing ``logins`` connect-LOGIN-LOGOUT loops."""
    per_client = logins // clients
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(per_client):
                login_once(port, user)
        except BaseException as e:  # reported after the threads end
            errors.append(e)

    for _ in range(warm):  # warm: the caches (ours, one per worker), Dovecot's auth process
        login_once(port, user)
    threads = [threading.Thread(target=run) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return per_client * clients / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=8, help="cold logins measured")
    parser.add_argument("--workers", type=int, default=2, help="Postvern listener processes")
    parser.add_argument("--serve-worker", nargs=2, metavar=("DATA", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        serve_worker(Path(args.serve_worker[0]), int(args.serve_worker[1]))
        return
    imap.raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="login-bench-"))
    os.chmod(root, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        data, our_port, users = seed(root, args.users)
        base, dove_port = imap.seed_dovecot(root, [], args.clients)
        workers, listening = start_workers(data, our_port, args.workers)
        listening.close()  # the workers hold it now
        procs += workers
        dovecot = imap.start_dovecot(base)
        procs.append(dovecot)
        imap.wait_port(dove_port)

        cold = [login_once(our_port, user) for user in users]
        # Enough warm-up logins that each worker has run Argon2id once for the user.
        warm = login_rate(our_port, imap.USER, args.logins, args.clients, warm=8 * args.workers)
        reference = login_rate(dove_port, imap.USER, args.logins, args.clients)
        print(
            f"\nIMAP LOGIN, {args.clients} clients, connect + LOGIN + LOGOUT per login,"
            f" Postvern in {args.workers} worker process(es); {machine_load()}"
        )
        print(
            f"cold login (Argon2id), {len(cold)} users: median {statistics.median(cold) * 1000:.0f}"
            f" ms, worst {max(cold) * 1000:.0f} ms   goal: median ≤ 200 ms"
        )
        print(
            f"warm logins/s: Postvern {warm:,.0f}, Dovecot {reference:,.0f},"
            f" ratio {warm / reference:.2f}×   goal: ≥ 1,000/s"
        )
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
