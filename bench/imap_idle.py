"""IDLE memory over TLS: what one idle IMAP session costs the server, measured on thousands.

Issue #15's goal is 50,000 concurrent IDLE sessions over TLS in at most 2 GiB of RSS. This
benchmark runs ``postvern serve`` with an imaps listener (implicit TLS, RFC 8314) and opens
``--sessions`` real TLS sessions from ``--clients`` separate load processes (so the load's own
memory is never in the server's figure; each process uses its own loopback source address,
so ephemeral ports never run out). Every session does what a mail client does before it
sits idle: TLS handshake, LOGIN, SELECT INBOX, IDLE, and waits for ``+ idling``.

The server's figure is the growth of its RSS (``/proc/PID/smaps_rollup``) from a baseline
taken after a first wave of sessions was opened and closed (one-off costs: worker threads,
their malloc arenas, caches) to the moment every session idles, divided by the sessions.
The extrapolation to 50,000 is the baseline plus 50,000 times that. With ``--dovecot N`` the
same load runs against Dovecot 2.3 over TLS (its default: one imap-login process proxying TLS
and one imap process per session), measured as the summed PSS of its processes.

The file-descriptor limit is raised to the hard limit, as the systemd unit does; the
sessions one process can hold are bounded by it (each session is one descriptor, each open
mailbox three). ``--users`` matters: sessions of one user share its open mailbox, so the
figure per session is the session's own cost plus that mailbox's share; ``--users`` equal
to ``--sessions`` measures the worst case. A mailbox whose sessions all sit in IDLE closes
its encrypted SQLite connection (about 160 KiB) after HIBERNATE_SECONDS
(store/service.py), within the settling time below, and keeps a few KiB.

``--waves N`` opens the sessions in N equal steps (new users for each step when there are as
many users as sessions) and reads RSS after each: each step's KiB per session should stay flat
if a session costs the same however many are open; a rising figure is something that grows.

Usage: python bench/imap_idle.py [--sessions 10000] [--clients 4] [--users 100] [--dovecot 0]
                                 [--waves 1]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # first: it puts tests/ on sys.path for the imports below
import imap_stress
from harness import DataDir, ServerProcess, free_port, set_config
from imap import DOVECOT, raise_nofile, start_dovecot, wait_port
from mta_kit import TestCA

DOMAIN = "example.test"
HOSTNAME = "mx.example.test"
PASSWORD = imap_stress.PASSWORD  # its Dovecot set-up is reused below
GOAL_SESSIONS = 50_000
GOAL_KIB = 2 * 1024 * 1024  # 2 GiB
# Sessions opened and closed before the baseline: enough to bring up every lazily made
# worker thread and cache, few enough to be quick. They log in as users of their own, so
# every mailbox the measured sessions open is counted in their figure.
WARM_UP = 200
WARM_USERS = 10
# Let the server settle (mailbox linger timers, freed buffers, the last mailboxes'
# hibernation after their sessions entered IDLE, HIBERNATE_SECONDS, and the malloc_trim
# TRIM_DELAY after it: store/service.py) before a reading.
SETTLE_SECONDS = 5.0
# One command's answer on loopback; far above what a healthy server needs.
CLIENT_TIMEOUT = 300.0
# The server's start on a shared machine: the harness's default minute was not always enough
# with a thousand users' directory at a load average of 15 on two cores.
SERVER_START_TIMEOUT = 600.0
# Descriptors a load process keeps for itself beyond its sessions.
SPARE_FDS = 64
# With this set in the environment, the server (not the load) gets SIGUSR1 at the baseline
# and with every session open: a profiling hook (a sitecustomize.py that dumps tracemalloc
# and malloc statistics on SIGUSR1) can then say where the memory went.
PROFILE_ENV = "PVTRACE"
PROFILE_WAIT = 30.0  # a traced snapshot of a big heap takes a while to write


# -- the load (runs in its own processes) --------------------------------------------------


def _until(sock: ssl.SSLSocket, buf: bytearray, marker: bytes) -> None:
    """Read until a line starting with ``marker`` has arrived; raise on NO/BAD."""
    while True:
        at = buf.find(b"\r\n" + marker) if not buf.startswith(marker) else -2
        if at != -1:
            start = 0 if at == -2 else at + 2
            end = buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(buf[start:end])
                del buf[: end + 2]
                if b" NO " in line or b" BAD " in line:
                    raise RuntimeError(line.decode(errors="replace"))
                return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def open_session(port: int, context: ssl.SSLContext, user: str, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(
        ("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0)
    )
    sock = context.wrap_socket(raw)
    buf = bytearray()
    _until(sock, buf, b"* OK")
    sock.sendall(b'a LOGIN %s "%s"\r\n' % (user.encode(), PASSWORD.encode()))
    _until(sock, buf, b"a OK")
    sock.sendall(b"b SELECT INBOX\r\n")
    _until(sock, buf, b"b OK")
    sock.sendall(b"c IDLE\r\n")
    _until(sock, buf, b"+ ")
    return sock


def load_main(port: int, count: int, users: list[str], source: str, first: int) -> None:
    """``--load``: open ``count`` idle sessions, say ``ready``, hold them until stdin closes."""
    context = common.trust_anything()
    sockets = []
    for i in range(count):
        sockets.append(open_session(port, context, users[(first + i) % len(users)], source))
    print(f"ready {len(sockets)}", flush=True)
    sys.stdin.read()  # the benchmark closes our stdin when it has measured
    for sock in sockets:
        sock.close()


class Load:
    """``sessions`` idle sessions spread over ``processes`` load processes."""

    def __init__(
        self, port: int, sessions: int, processes: int, users: list[str], first_source: int = 0
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        share = -(-sessions // processes)
        for p in range(processes):
            count = min(share, sessions - p * share)
            if count <= 0:
                break
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--load",
                        str(port),
                        str(count),
                        ",".join(users),
                        f"127.0.{(first_source + p) // 250}.{(first_source + p) % 250 + 2}",
                        str(p * share),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={k: v for k, v in os.environ.items() if k != PROFILE_ENV},
                )
            )

    def wait_ready(self) -> int:
        opened = 0
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if not line.startswith("ready"):
                raise RuntimeError(f"a load process failed (exit {proc.wait()})")
            opened += int(line.split()[1])
        return opened

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=300)


def open_idle(
    port: int, sessions: int, processes: int, users: list[str], first_source: int = 0
) -> tuple[Load, float]:
    start = time.perf_counter()
    load = Load(port, sessions, processes, users, first_source)
    try:
        opened = load.wait_ready()
    except BaseException:
        load.close()
        raise
    if opened != sessions:
        load.close()
        raise RuntimeError(f"{opened} sessions opened, {sessions} asked for")
    return load, time.perf_counter() - start


# -- memory --------------------------------------------------------------------------------


def rollup(pid: int) -> dict[str, int]:
    """KiB figures of one process's /proc/PID/smaps_rollup (Rss, Pss, Anonymous...)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def tree_pss(root: int) -> int:
    return sum(rollup(pid).get("Pss", 0) for pid in common.process_tree(root))


def profile(pid: int) -> None:
    if os.environ.get(PROFILE_ENV):
        os.kill(pid, signal.SIGUSR1)
        time.sleep(PROFILE_WAIT)


# -- the servers ---------------------------------------------------------------------------


def postvern_dir(root: Path, accounts: list[str], sessions: int) -> tuple[Path, int]:
    from postvern.app import App
    from postvern.cli import init_data_dir

    data = root / "postvern"
    port = free_port()
    init_data_dir(data, HOSTNAME, DOMAIN, {"imaps": f"127.0.0.1:{port}"})
    # Loopback is every client here: the per-address limits would otherwise count the load.
    set_config(data, "abuse", {"allowlist": ["127.0.0.0/8"]})
    room = sessions + WARM_UP + 100
    set_config(
        data,
        "limits",
        {"connections": room, "connections_per_ip": room, "imap_sessions_per_user": room},
    )
    # Key slots at the shipped memory cost (64 MiB) but one pass and one lane, so seeding
    # stays quick. Not less memory: glibc serves a freed block under 32 MiB from then on
    # from the heap, and an 8 MiB Argon2id left each store thread's heap ~10 MiB larger for
    # good (the top of a thread's heap is kept, and malloc_trim does not touch it), a one-off
    # per thread the first measured cold logins paid and the figure per session showed.
    set_config(data, "kdf", {"time_cost": 1, "memory_kib": 65536, "parallelism": 1})
    app = App.open(data)
    try:
        for user in accounts:
            app.accounts.create_user(user, PASSWORD)
    finally:
        app.close()
    return data, port


def measure_postvern(root: Path, accounts: list[str], args: argparse.Namespace) -> dict[str, float]:
    data, port = postvern_dir(root, accounts, args.sessions)
    env = {"MALLOC_ARENA_MAX": args.malloc_arena_max} if args.malloc_arena_max else {}
    server = ServerProcess(DataDir(data, DOMAIN, {"imaps": f"127.0.0.1:{port}"}), env)
    server.start(timeout=SERVER_START_TIMEOUT)  # not `with`: its __enter__ starts again
    try:
        assert server.proc is not None
        pid = server.proc.pid
        started = rollup(pid)
        warm, _ = open_idle(port, min(WARM_UP, args.sessions), 1, args.warm_accounts)
        warm.close()
        time.sleep(SETTLE_SECONDS)
        profile(pid)
        before = rollup(pid)
        loads, seconds, steps = [], 0.0, []
        try:
            for wave in range(args.waves):
                sessions, users = _wave(args.sessions, wave, args.waves), _wave_users(args, wave)
                load, took = open_idle(port, sessions, args.clients, users, wave * args.clients)
                loads.append(load)
                seconds += took
                time.sleep(SETTLE_SECONDS)
                steps.append(
                    (sum(_wave(args.sessions, w, args.waves) for w in range(wave + 1)), rollup(pid))
                )
            profile(pid)
            after = rollup(pid)
        finally:
            for load in loads:
                load.close()
        return {
            "started_kib": started["Rss"],
            "baseline_kib": before["Rss"],
            "rss_kib": after["Rss"],
            "anon_kib": after["Anonymous"] - before["Anonymous"],
            "per_session_kib": (after["Rss"] - before["Rss"]) / args.sessions,
            "open_seconds": seconds,
            "steps": [(n, r["Rss"]) for n, r in [(0, before), *steps]],
        }
    finally:
        server.stop()


def _wave(sessions: int, wave: int, waves: int) -> int:
    """Sessions opened in ``wave`` (0-based) of ``waves``: an even split."""
    return sessions * (wave + 1) // waves - sessions * wave // waves


def _wave_users(args: argparse.Namespace, wave: int) -> list[str]:
    """The users a wave logs in as: with as many users as sessions, users of its own (each
    wave adds mailboxes); with fewer, every user (the waves add sessions to the same ones)."""
    if len(args.accounts) < args.sessions:
        return args.accounts
    first = args.sessions * wave // args.waves
    return args.accounts[first : first + _wave(args.sessions, wave, args.waves)]


# Added to bench/imap_stress.py's Dovecot (TLS at connect, its default process model): room
# for every session in the process and client limits.
DOVECOT_ROOM = """
default_process_limit = {processes}
default_client_limit = {clients}
default_vsz_limit = 0
service anvil {{
  client_limit = {clients}
}}
protocol imap {{
  mail_max_userip_connections = {processes}
}}
"""


def measure_dovecot(root: Path, accounts: list[str], args: argparse.Namespace) -> dict[str, float]:
    base, port = imap_stress.dovecot_dir(root, TestCA(root), accounts)
    room = args.dovecot + WARM_UP + 100
    with (base / "dovecot.conf").open("a") as conf:
        conf.write(DOVECOT_ROOM.format(processes=room, clients=room * 4 + 1000))
    proc = start_dovecot(base)
    try:
        wait_port(port)
        warm, _ = open_idle(port, min(WARM_UP, args.dovecot), 1, args.warm_accounts)
        warm.close()
        time.sleep(SETTLE_SECONDS)
        before = tree_pss(proc.pid)
        load, seconds = open_idle(port, args.dovecot, args.clients, args.accounts)
        try:
            time.sleep(SETTLE_SECONDS)
            after = tree_pss(proc.pid)
            processes = len(common.process_tree(proc.pid))
        finally:
            load.close()
        return {
            "baseline_kib": before,
            "rss_kib": after,
            "per_session_kib": (after - before) / args.dovecot,
            "open_seconds": seconds,
            "processes": processes,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def report(
    ours: dict[str, float], theirs: dict[str, float] | None, args: argparse.Namespace
) -> None:
    per = ours["per_session_kib"]
    projected = ours["baseline_kib"] + GOAL_SESSIONS * per
    users = len(args.accounts)
    print(
        f"\nIDLE over TLS (imaps), {args.sessions} sessions, {users} users "
        f"({args.sessions / users:g} sessions per user: each user's open mailbox is shared)"
    )
    print(
        f"  Postvern: RSS at start {ours['started_kib'] / 1024:.1f} MiB, baseline "
        f"{ours['baseline_kib'] / 1024:.1f} MiB, with the sessions {ours['rss_kib'] / 1024:.1f} "
        f"MiB ({ours['anon_kib'] / args.sessions:.1f} KiB anonymous per session)"
    )
    print(
        f"  Postvern: {per:.1f} KiB per idle TLS session; {GOAL_SESSIONS} sessions ≈ "
        f"{projected / 1024 / 1024:.2f} GiB (goal ≤ {GOAL_KIB / 1024 / 1024:.0f} GiB: "
        f"{'met' if projected <= GOAL_KIB else 'NOT met'}); opened in "
        f"{ours['open_seconds']:.0f} s"
    )
    steps = ours["steps"]
    if len(steps) > 2:
        # Each wave's own cost per session: flat if a session costs the same however many
        # are already open; rising if something grows with their number.
        marginal = ", ".join(
            f"{n1} sessions {(r1 - r0) / (n1 - n0):.1f}"
            for (n0, r0), (n1, r1) in itertools.pairwise(steps)
        )
        print(f"  Postvern: KiB per session of each wave (RSS growth / its sessions): {marginal}")
    if theirs is not None:
        print(
            f"  Dovecot:  {theirs['per_session_kib']:.1f} KiB PSS per idle TLS session "
            f"({args.dovecot} sessions, {theirs['processes']:.0f} processes); Postvern / "
            f"Dovecot {per / theirs['per_session_kib']:.2f}×"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4, help="load processes")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--dovecot", type=int, default=0, help="sessions against Dovecot")
    parser.add_argument(
        "--waves", type=int, default=1, help="open the sessions in this many steps, each measured"
    )
    parser.add_argument("--malloc-arena-max", default="", help="MALLOC_ARENA_MAX for the server")
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()
    if args.load:
        port, count, users, source, first = args.load
        load_main(int(port), int(count), users.split(","), source, int(first))
        return
    limit = os_fd_limit()
    per_process = -(-args.sessions // args.clients)
    if args.sessions + SPARE_FDS > limit or per_process + SPARE_FDS > limit:
        raise SystemExit(
            f"{args.sessions} sessions need more descriptors than the limit of {limit} "
            "(the server holds one per session; raise --clients for the load side)"
        )
    args.accounts = [f"user{i}@{DOMAIN}" for i in range(1, args.users + 1)]
    args.warm_accounts = [f"warm{i}@{DOMAIN}" for i in range(1, WARM_USERS + 1)]
    print(f"IMAP IDLE memory over TLS; {common.machine_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="postvern-idle-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Dovecot's processes read their files below
        ours = measure_postvern(root, args.warm_accounts + args.accounts, args)
        theirs = None
        if args.dovecot:
            if Path(DOVECOT).exists():
                theirs = measure_dovecot(root, args.warm_accounts + args.accounts, args)
            else:
                print("dovecot: not installed; left out")
    report(ours, theirs, args)


def os_fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
