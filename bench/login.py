"""Login benchmark: a cold login (Argon2id at the shipped cost) and warm logins per second.

Postvern's IMAP listener is started on a data directory with the **default** key-slot cost
(Argon2id, 64 MiB, t=3, p=4 — not the cheap one the other benchmarks use), beside a private
Dovecot with a passwd-file user, in the same run. Raw-socket load processes run connect,
LOGIN, LOGOUT in a loop:

  * cold: the first login of each of several users (every one pays Argon2id);
    goal ≤ 200 ms median on this machine;
  * warm: repeated logins of one user, answered from the login cache (login_cache.py);
    goal ≥ 1,000 logins/s; Dovecot's rate on the same loop is the reference.

Both listen with implicit TLS (imaps, RFC 8314) on one certificate (ECDSA P-256, issued by
a throw-away CA), so the handshake weighs on both alike, and the same load runs against both:
first every connection with a full handshake, then with TLS session resumption (the client
offers the ticket of its previous connection, as Thunderbird, Apple Mail and K-9 do). Dovecot
runs its default process model with its auth cache on (``auth_cache_size``), the reference
the issue names. ``--transport plain`` measures both on plaintext instead.

``--workers N`` (default 2) runs Postvern's IMAP listener in N processes sharing one
listening socket, as ``[server] workers`` does (workers.py): this process binds it once and
each worker inherits it through ``POSTVERN_LISTEN_FDS`` (handoff.py), so the kernel spreads
the connections. Each worker keeps its own warm-login cache: a user's first login on each
worker pays Argon2id, which the warm-up does.

Each side's CPU per warm login is printed beside the rates (the servers' processes, and
the load processes' own): on a shared machine the rate follows whatever else runs, the CPU
a login costs does not. The load is ``--clients`` processes (not threads: they would queue
for one GIL at every answer), each a plain socket loop.

Usage: python bench/login.py [--logins 3000] [--reference-logins 1000] [--clients 4]
                             [--users 8] [--workers 2]
                             [--event-loop asyncio|uvloop] [--transport tls|plain]
                             [--profile]   (py-spy on one worker during the warm run)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import ssl
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

import common  # noqa: E402  (CPU of processes; puts tests/ on sys.path)
import imap  # noqa: E402  (the IMAP benchmark's client and Dovecot start)
import imap_stress  # noqa: E402  (its Dovecot over TLS)
from mta_kit import TestCA  # noqa: E402

PASSWORD = imap_stress.PASSWORD  # its Dovecot's passwd file has it
HOSTNAME = "mx.example.test"
USER = imap.USER
# Added to imap_stress's Dovecot (TLS at connect, its default process model): the auth
# cache Dovecot's documentation recommends (a passwd-file lookup is cheap already, but this
# is the reference the issue names).
DOVECOT_AUTH_CACHE = """
auth_cache_size = 10M
auth_cache_ttl = 1 hour
auth_cache_negative_ttl = 0
"""


def seed(root: Path, users: int, ca: TestCA, transport: str) -> tuple[Path, int, list[str]]:
    """A data directory at the shipped Argon2id cost, with ``users`` accounts, serving the
    certificate Dovecot gets too."""
    from postvern import config
    from postvern.app import App
    from postvern.cli import init_data_dir

    data = root / "postvern"
    port = imap.free_port()
    kind = "imaps" if transport == "tls" else "imap"
    init_data_dir(data, HOSTNAME, "example.test", {kind: f"127.0.0.1:{port}"})
    cert, key = ca.issue(HOSTNAME)
    settings = config.load(data, environ={})
    settings.limits.auth_failure_delay = 0.0
    settings.tls.cert, settings.tls.key = str(cert), str(key)
    (data / config.CONFIG_NAME).write_text(config.render(settings))
    names = [USER] + [f"user{i}@example.test" for i in range(1, users)]
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


def seed_dovecot(root: Path, ca: TestCA, users: list[str], transport: str) -> tuple[Path, int]:
    """Dovecot over TLS at connect (imap_stress's), or plaintext (imap's), auth cache on."""
    if transport == "tls":
        base, port = imap_stress.dovecot_dir(root, ca, users)
    else:
        base, port = imap.seed_dovecot(root, [], 4)
        (base / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in users))
    with (base / "dovecot.conf").open("a") as conf:
        conf.write(DOVECOT_AUTH_CACHE)
    return base, port


def serve_worker(data: Path, port: int, event_loop: str, transport: str) -> None:
    """``--serve-worker``: the IMAP listener alone, on the inherited socket."""
    from postvern import config, handoff, workers

    if event_loop == "uvloop":  # as [server] event_loop = "uvloop" (net.event_loop_factory)
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    handoff.inherit(config.load(data).listen)  # POSTVERN_LISTEN_FDS: imap=<fd>
    workers.balance_accepts()  # one connection per loop turn, as a server's worker takes
    imap.serve_postvern(data, port, implicit_tls=transport == "tls")  # the inherited socket


def start_workers(
    data: Path, port: int, count: int, event_loop: str, transport: str
) -> tuple[list[subprocess.Popen[bytes]], socket.socket]:
    """``count`` listener processes on one socket bound here (as the supervisor does)."""
    from postvern import handoff

    sock = handoff.bind("127.0.0.1", port)
    kind = "imaps" if transport == "tls" else "imap"
    procs = []
    for _ in range(count):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
        env[handoff.HANDOFF_FDS] = f"{kind}={sock.fileno()}"
        argv = [sys.executable, __file__, "--serve-worker", str(data), str(port)]
        proc = subprocess.Popen(
            [*argv, event_loop, transport],
            stdout=subprocess.PIPE,
            env=env,
            pass_fds=(sock.fileno(),),
            start_new_session=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        procs.append(proc)
    return procs, sock


def connect(port: int, context: ssl.SSLContext | None, session: Any = None) -> socket.socket:
    """A connection to the listener, with TLS at connect when ``context`` is given (offering
    ``session``'s ticket for resumption)."""
    raw = socket.create_connection(("127.0.0.1", port))
    if context is None:
        return raw
    return context.wrap_socket(raw, session=session)


def one_round(sock: socket.socket, login: bytes) -> None:
    """Greeting, LOGIN, LOGOUT on a connected socket (one recv per answer on loopback)."""
    _until(sock, b"")  # the greeting
    sock.sendall(login)
    if b"\r\na OK" not in b"\r\n" + _until(sock, b"a "):
        raise RuntimeError("LOGIN refused")
    sock.sendall(b"b LOGOUT\r\n")
    _until(sock, b"b OK")


def login_command(user: str) -> bytes:
    return f'a LOGIN {user} "{PASSWORD}"\r\n'.encode()


def login_once(port: int, user: str, transport: str) -> float:
    start = time.perf_counter()
    context = common.trust_anything() if transport == "tls" else None
    with connect(port, context) as sock:
        one_round(sock, login_command(user))
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


def _login_loop(
    port: int, user: str, count: int, transport: str, resume: bool, start: Any, out: Any
) -> None:
    """One load process: ``count`` rounds of connect, LOGIN, LOGOUT with as few Python steps
    as a round allows, so that the generator's share of the two shared cores stays small
    next to the servers'. A process, not a thread: four threads of one interpreter queue for
    its GIL at every answer. With ``resume`` each connection offers the TLS session of the
    one before (a ticket, TLS 1.3); ``out`` gets how many the server resumed."""
    login = login_command(user)
    context = common.trust_anything() if transport == "tls" else None
    session = None
    resumed = 0
    start.wait()
    try:
        for _ in range(count):
            with connect(port, context, session) as sock:
                one_round(sock, login)
                if isinstance(sock, ssl.SSLSocket):
                    resumed += sock.session_reused
                    if resume:
                        session = sock.session  # the ticket came with the answers
        out.put(("resumed", resumed))
    except BaseException as e:
        out.put(("failed", repr(e)))
        raise


@dataclass
class Rate:
    logins_per_second: float
    server_ms: float  # CPU of the server's processes per login
    client_ms: float  # CPU of the load processes per login
    resumed: float  # share of the TLS handshakes that were resumptions

    @property
    def client_share(self) -> float:
        """The load's part of the CPU the run cost (the load and the server together)."""
        return self.client_ms / (self.client_ms + self.server_ms)


def login_rate(
    port: int,
    user: str,
    logins: int,
    clients: int,
    server: Callable[[], float],
    *,
    transport: str,
    resume: bool,
) -> Rate:
    """``clients`` load processes sharing ``logins`` connect-LOGIN-LOGOUT rounds; the CPU
    both sides spent (``server()`` reads the servers' CPU seconds so far)."""
    per_client = logins // clients
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_login_loop, args=(port, user, per_client, transport, resume, start, out)
        )
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
    results = [out.get(timeout=5) for _ in procs]
    failures = [detail for kind, detail in results if kind == "failed"]
    if failures or any(proc.exitcode for proc in procs):
        raise RuntimeError(f"a load process failed: {failures}")
    done = per_client * clients
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    resumed = sum(int(n) for _, n in results) / done
    return Rate(done / elapsed, server_cpu / done * 1000, client_cpu / done * 1000, resumed)


def profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on one worker: the thread holding the GIL, so idle waits (epoll, the store's
    threads) are left out. OpenSSL's handshake runs with the GIL released and is left out
    too: tls_handshake_cpu() measures it apart."""
    exe = common.find_py_spy()
    if exe is None:
        raise SystemExit("--profile: py-spy is not installed")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--gil",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def tls_handshake_cpu(cert: Path, key: Path, *, resume: bool, rounds: int = 300) -> float:
    """CPU ms of the server's side of one TLS handshake and a first record, OpenSSL alone
    (memory BIOs, no sockets, no event loop), with Postvern's server context."""
    from postvern.crypto import tls

    server = tls.server_context(cert, key)
    client = common.trust_anything()
    session = None
    spent = 0.0
    for _ in range(rounds):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        ours = server.wrap_bio(s_in, s_out, server_side=True)
        theirs = client.wrap_bio(c_in, c_out, server_hostname=HOSTNAME, session=session)
        done = False
        while not done:
            with contextlib.suppress(ssl.SSLWantReadError):
                theirs.do_handshake()
            s_in.write(c_out.read())
            began = time.process_time()
            with contextlib.suppress(ssl.SSLWantReadError):
                ours.do_handshake()
                ours.write(b"* OK\r\n")
                done = True
            spent += time.process_time() - began
            c_in.write(s_out.read())
        theirs.read()
        if resume:
            session = theirs.session
    return spent / rounds * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=3000)
    parser.add_argument(
        "--reference-logins", type=int, default=1000, help="Dovecot's (it forks per login)"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=8, help="cold logins measured")
    parser.add_argument("--workers", type=int, default=2, help="Postvern listener processes")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--transport", choices=("tls", "plain"), default="tls")
    parser.add_argument("--profile", action="store_true", help="py-spy one worker (warm run)")
    parser.add_argument("--serve-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker:
        data, port, loop, transport = args.serve_worker
        serve_worker(Path(data), int(port), loop, transport)
        return
    imap.raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="login-bench-"))
    os.chmod(root, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ca = TestCA(root)
        data, our_port, users = seed(root, args.users, ca, args.transport)
        base, dove_port = seed_dovecot(root, ca, users, args.transport)
        workers, listening = start_workers(
            data, our_port, args.workers, args.event_loop, args.transport
        )
        listening.close()  # the workers hold it now
        procs += workers
        dovecot = imap.start_dovecot(base)
        procs.append(dovecot)
        imap.wait_port(dove_port)
        run(args, users, our_port, [w.pid for w in workers], dove_port, dovecot.pid, root)
        if args.transport == "tls":
            from postvern import config

            settings = config.load(data, environ={})
            cert, key = settings.path(settings.tls.cert), settings.path(settings.tls.key)
            full = tls_handshake_cpu(cert, key, resume=False)
            resumed = tls_handshake_cpu(cert, key, resume=True)
            print(
                f"\nOpenSSL alone (memory BIOs, this process): the server's side of a TLS"
                f" handshake {full:.3f} ms CPU, {resumed:.3f} ms resumed; {common.machine_load()}"
            )
    finally:
        imap.stop_groups(procs)
        if not os.environ.get("KEEP"):
            shutil.rmtree(root, ignore_errors=True)


def run(
    args: argparse.Namespace,
    users: list[str],
    our_port: int,
    ours: list[int],
    dove_port: int,
    dovecot: int,
    root: Path,
) -> None:
    transport = args.transport
    cold = [login_once(our_port, user, transport) for user in users]
    # Enough warm-up logins that each worker has run Argon2id once for the user, and that
    # Dovecot's auth process has the user cached.
    for _ in range(8 * args.workers):
        login_once(our_port, USER, transport)
        login_once(dove_port, USER, transport)
    print(
        f"\nIMAP LOGIN, {args.clients} load processes, connect + LOGIN + LOGOUT per login"
        f" ({'implicit TLS, one ECDSA P-256 certificate' if transport == 'tls' else 'plaintext'}),"
        f" Postvern in {args.workers} worker process(es), {args.event_loop} event loop,"
        f" Dovecot {imap_version()} with its auth cache; {common.machine_load()}"
    )
    print(
        f"cold login (Argon2id), {len(cold)} users: median {statistics.median(cold) * 1000:.0f}"
        f" ms, worst {max(cold) * 1000:.0f} ms   goal: median ≤ 200 ms"
    )
    for resume in (False, True) if transport == "tls" else (False,):
        spy = None
        if args.profile and not resume:
            spy = profile(ours[0], root / "login.spy")
            time.sleep(1.0)  # attached
        warm = login_rate(
            our_port,
            USER,
            args.logins,
            args.clients,
            lambda: sum(common.cpu_seconds(pid) for pid in ours),
            transport=transport,
            resume=resume,
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        reference = login_rate(
            dove_port,
            USER,
            args.reference_logins,
            args.clients,
            lambda: common.tree_cpu_seconds(dovecot),
            transport=transport,
            resume=resume,
        )
        report(warm, reference, transport, resume)
        if spy is not None:
            print(common.summarise_py_spy(root / "login.spy", top=40))


def imap_version() -> str:
    return subprocess.run(
        [imap.DOVECOT, "--version"], capture_output=True, text=True, check=False
    ).stdout.split(" ")[0]


def report(warm: Rate, reference: Rate, transport: str, resume: bool) -> None:
    if transport == "tls":
        print(
            f"\n{'TLS session resumption offered' if resume else 'full TLS handshake'} on"
            f" every connection: resumed {warm.resumed:.0%} by Postvern,"
            f" {reference.resumed:.0%} by Dovecot"
        )
    print(
        f"warm logins/s: Postvern {warm.logins_per_second:,.0f},"
        f" Dovecot {reference.logins_per_second:,.0f},"
        f" ratio {warm.logins_per_second / reference.logins_per_second:.2f}×"
        "   goal: ≥ 1,000/s"
    )
    # On a shared machine the rate follows whatever else runs; CPU per login does not.
    print(
        f"server CPU per warm login: Postvern {warm.server_ms:.3f} ms (its workers),"
        f" Dovecot {reference.server_ms:.3f} ms (all its processes),"
        f" ratio {warm.server_ms / reference.server_ms:.2f}×"
    )
    print(
        f"the load's CPU per login: {warm.client_ms:.3f} ms against Postvern"
        f" ({warm.client_share:.0%} of that run's CPU), {reference.client_ms:.3f} ms against"
        f" Dovecot ({reference.client_share:.0%})"
    )
    cores = 1000 / warm.server_ms
    print(f"  → Postvern's workers would answer {cores:,.0f} warm logins/s per free core")


if __name__ == "__main__":
    main()
