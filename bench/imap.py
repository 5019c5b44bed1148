"""IMAP benchmark: Postvern against Dovecot, the same messages, the same client, the same run.

Both servers hold one folder of N realistic 4–10 KB messages (Postvern's store is seeded
directly, Dovecot gets a Maildir of the same files) and are measured over the wire on loopback
by one raw-socket client that only counts bytes, so client-side parsing weighs on neither:

  * SELECT INBOX (goal ≤ 50 ms), FETCH 1:* (FLAGS ENVELOPE) (goal within 2× of Dovecot),
    UID SEARCH TEXT <rare word> (goal ≤ 100 ms), APPEND rate;
  * the server process's RSS growth per IDLE connection with K sessions open (goal ≤ 50 KB;
    for Dovecot, which forks a process per session, the summed PSS of its processes).

Timings are the best of several warm runs (Dovecot builds its index and cache on first
use; Postvern's are built at insert). Both run plaintext on loopback, so TLS costs neither.
Dovecot searches TEXT without a full-text index: the Debian package's only built-in one,
fts_squat, crashes the imap process here (2.3.19), and Solr/Xapian are separate services.

Usage: python bench/imap.py [--messages 50000] [--idle 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RARE_WORD = "zebrafish"  # in 1% of the messages: what a user searches for
WORDS = (
    "meeting report budget quarterly team project deadline review invoice schedule "
    "update proposal contract client delivery travel lunch office holiday notes draft "
    "agenda summary request approval feedback release version server account customer "
    "analysis forecast revenue hiring onboarding roadmap milestone sprint retrospective"
).split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent".split()
PASSWORD = "bench-password-123"
USER = "alice@example.test"
DOVECOT = "/usr/sbin/dovecot"
TIMED_RUNS = 5


# -- messages ------------------------------------------------------------------------------


def make_message(rng: random.Random, i: int) -> bytes:
    size = rng.randint(4000, 10000)
    words: list[str] = []
    length = 0
    while length < size:
        w = rng.choice(WORDS)
        words.append(w)
        length += len(w) + 1
    if i % 100 == 7:
        words.insert(rng.randrange(len(words)), RARE_WORD)
    body = "\r\n".join(" ".join(words[j : j + 12]) for j in range(0, len(words), 12))
    sender = rng.choice(NAMES)
    day = 1 + i % 28
    head = (
        f"Return-Path: <{sender}@example.org>\r\n"
        f"Received: from mx.example.org (mx.example.org [192.0.2.{i % 250}])\r\n"
        f"\tby mx.example.test with ESMTPS id {i:08x}; Mon, {day} Jan 2024 10:00:00 +0000\r\n"
        f"From: {sender.title()} Example <{sender}@example.org>\r\n"
        f"To: Alice <alice@example.test>\r\n"
        f"Cc: {rng.choice(NAMES)}@example.org\r\n"
        f"Subject: {rng.choice(WORDS)} {rng.choice(WORDS)} #{i}\r\n"
        f"Date: Mon, {day} Jan 2024 10:{i % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{i}.{rng.getrandbits(48):x}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    )
    return head.encode() + body.encode() + b"\r\n"


# -- Postvern ------------------------------------------------------------------------------


def seed_postvern(root: Path, messages: list[bytes], idle: int) -> tuple[Path, int]:
    from postvern import config
    from postvern.app import App
    from postvern.cli import init_data_dir
    from postvern.store.mailbox import INBOX, Mailbox

    data = root / "postvern"
    port = free_port()
    init_data_dir(data, "mx.example.test", "example.test", {"imap": f"127.0.0.1:{port}"})
    settings = config.load(data, environ={})
    # Cheap key slots: the benchmark logs in thousands of times; production cost is
    # measured by bench/store.py.
    settings.kdf.time_cost, settings.kdf.memory_kib, settings.kdf.parallelism = 1, 8192, 1
    settings.limits.imap_sessions_per_user = idle + 100
    settings.limits.connections = settings.limits.connections_per_ip = idle + 100
    (data / config.CONFIG_NAME).write_text(config.render(settings))
    app = App.open(data)
    try:
        app.accounts.create_user(USER, PASSWORD)
        unlocked = app.accounts.authenticate(USER, PASSWORD)
        path = app.accounts.mailbox_path(unlocked.user)
        with Mailbox.open(path, unlocked.mailbox_key) as box:
            inbox = box.folder(INBOX).id
            for start in range(0, len(messages), 500):
                batch = messages[start : start + 500]
                flags = [("\\Seen",) if (start + k) % 5 else () for k in range(len(batch))]
                box.append_many(
                    inbox, [(raw, f, None) for raw, f in zip(batch, flags, strict=True)]
                )
    finally:
        app.close()
    return data, port


def serve_postvern(data: Path, port: int, *, implicit_tls: bool = False) -> None:
    """``--serve``: the Postvern IMAP listener alone, in this process (plaintext LOGIN
    allowed, loopback only; or TLS at connect with ``implicit_tls``, as bench/login.py)."""
    from postvern.app import App
    from postvern.crypto import tls
    from postvern.imap.server import start_imap_server
    from postvern.login import LoginService
    from postvern.store.service import MailboxRegistry

    raise_nofile()

    async def main() -> None:
        app = App.open(data)
        s = app.settings
        registry = MailboxRegistry(app.accounts, linger_seconds=s.limits.mailbox_linger_seconds)
        login = LoginService(
            app.accounts,
            registry,
            failure_delay=s.limits.auth_failure_delay,
            cache_seconds=s.limits.login_cache_seconds,
        )
        ctx = tls.server_context(s.path(s.tls.cert), s.path(s.tls.key))
        await start_imap_server(
            "127.0.0.1",
            port,
            login=login,
            registry=registry,
            ssl_context=ctx,
            implicit_tls=implicit_tls,
            limits=s.limits,
            hostname=s.hostname,
            plaintext_auth=not implicit_tls,  # loopback benchmark only
        )
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- Dovecot -------------------------------------------------------------------------------

DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{root}/home/%n/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  process_limit = {processes}
}}
service imap {{
  process_limit = {processes}
}}
service anvil {{
  client_limit = {clients}
}}
default_client_limit = {clients}
protocol imap {{
  mail_max_userip_connections = {processes}
}}
default_vsz_limit = 0
"""


def seed_dovecot(root: Path, messages: list[bytes], idle: int) -> tuple[Path, int]:
    base = root / "dovecot"
    maildir = base / "home" / "alice" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    now = int(time.time())
    for i, raw in enumerate(messages):
        flags = "S" if i % 5 else ""
        # Maildir names sort by delivery time: Dovecot assigns UIDs in this order.
        name = f"{now - len(messages) + i}.M{i}P1.bench,S={len(raw)}:2,{flags}"
        (maildir / "cur" / name).write_bytes(raw)
    port = free_port()
    (base / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
    nobody = 65534
    subprocess.run(["chown", "-R", f"{nobody}:{nobody}", str(base / "home")], check=True)
    (base / "dovecot.conf").write_text(
        DOVECOT_CONF.format(
            root=base,
            uid=nobody,
            gid=nobody,
            port=port,
            processes=idle + 100,
            clients=idle * 4 + 1000,
        )
    )
    return base, port


def start_dovecot(base: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [DOVECOT, "-F", "-c", str(base / "dovecot.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# -- the client ----------------------------------------------------------------------------


class Client:
    """A minimal IMAP client that reads responses as bytes and counts them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.buf = b""
        self.n = 0
        self.read_line()

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def command(self, text: bytes) -> tuple[int, bytes]:
        """Send a command; read up to its tagged answer. Returns (octets read, completion)."""
        self.n += 1
        tag = b"t%d" % self.n
        self.sock.sendall(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> tuple[int, bytes]:
        marker = b"\r\n" + tag + b" "
        data = bytearray(b"\r\n" + self.buf)
        self.buf = b""
        scan = 0
        while True:
            found = data.find(marker, scan)
            if found >= 0:
                end = data.find(b"\r\n", found + 2)
                if end >= 0:
                    done = bytes(data[found + 2 : end])
                    self.buf = bytes(data[end + 2 :])
                    if done.split(b" ")[1] != b"OK":
                        raise RuntimeError(done.decode(errors="replace"))
                    return found, done
            else:
                scan = max(len(data) - len(marker), 0)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk

    def login(self) -> None:
        self.command(f'LOGIN {USER} "{PASSWORD}"'.encode())

    def close(self) -> None:
        self.sock.close()


def best(fn: object, runs: int = TIMED_RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, port: int, append_messages: list[bytes]) -> dict[str, float]:
    client = Client(port)
    client.login()
    client.command(b"SELECT INBOX")
    # The first FETCH after login: Dovecot builds its index cache on disk, Postvern its
    # in-memory envelope cache (once per unlock). Both are reported; the warm runs follow.
    start = time.perf_counter()
    size, _ = client.command(b"FETCH 1:* (FLAGS ENVELOPE)")
    out = {"fetch_first": time.perf_counter() - start}
    client.command(b"UID SEARCH TEXT " + RARE_WORD.encode())
    out["select"] = best(lambda: client.command(b"SELECT INBOX"))
    out["fetch"] = best(lambda: client.command(b"FETCH 1:* (FLAGS ENVELOPE)"), 3)
    out["fetch_octets"] = size
    out["search"] = best(lambda: client.command(b"UID SEARCH TEXT " + RARE_WORD.encode()))
    client.command(b"CREATE Bench")
    start = time.perf_counter()
    for raw in append_messages:
        client.command(b"APPEND Bench {%d+}\r\n" % len(raw) + raw)
    out["append_rate"] = len(append_messages) / (time.perf_counter() - start)
    client.command(b"LOGOUT")
    client.close()
    print(f"  {name}: measured", flush=True)
    return out


def rss_kib(pids: list[int], *, pss: bool = False) -> int:
    total = 0
    for pid in pids:
        try:
            if pss:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                total += int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
            else:
                text = Path(f"/proc/{pid}/status").read_text()
                total += int(re.search(r"^VmRSS:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            continue
    return total


def process_tree(root_pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True, check=True
    ).stdout
    return [
        int(pid)
        for pid, pgid in (line.split() for line in out.splitlines())
        if int(pgid) == root_pid
    ]


def open_idle(port: int, count: int) -> list[Client]:
    clients = []
    for _ in range(count):
        client = Client(port)
        client.login()
        client.command(b"SELECT INBOX")
        client.sock.sendall(b"i IDLE\r\n")
        clients.append(client)
    for client in clients:
        client.read_line()  # "+ idling"
    return clients


def idle_cost(port: int, count: int, pids: Callable[[], list[int]], *, pss: bool) -> float:
    """KiB of server memory per IDLE session, from the growth with ``count`` sessions.

    A first wave of sessions is opened and closed before the baseline is taken, so that
    one-off costs (worker threads, their malloc arenas after Argon2id, Dovecot's login
    processes) are not charged to the sessions measured.
    """
    for client in open_idle(port, min(count, 100)):
        client.close()
    time.sleep(2)
    before = rss_kib(pids(), pss=pss)
    clients = open_idle(port, count)
    time.sleep(2)
    after = rss_kib(pids(), pss=pss)
    for client in clients:
        client.close()
    return (after - before) / count


def stop_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """End each server started in its own session, and everything it started."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the data (for debugging)")
    parser.add_argument("--serve", nargs=2, metavar=("DATA", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_postvern(Path(args.serve[0]), int(args.serve[1]))
        return
    raise_nofile()
    rng = random.Random(1)
    messages = [make_message(rng, i) for i in range(args.messages)]
    extra = [make_message(rng, args.messages + i) for i in range(args.appends)]
    root = Path(tempfile.mkdtemp(prefix="imap-bench-"))
    os.chmod(root, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start = time.perf_counter()
        data, our_port = seed_postvern(root, messages, args.idle)
        print(
            f"seeded Postvern with {len(messages)} messages in {time.perf_counter() - start:.0f} s"
        )
        base, dove_port = seed_dovecot(root, messages, args.idle)
        ours = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(data), str(our_port)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(ours)
        assert ours.stdout is not None
        ours.stdout.readline()
        dovecot = start_dovecot(base)
        procs.append(dovecot)
        wait_port(dove_port)
        results = {
            "Postvern": measure("Postvern", our_port, extra),
            "Dovecot": measure("Dovecot", dove_port, extra),
        }
        results["Postvern"]["idle_kib"] = idle_cost(
            our_port, args.idle, lambda: [ours.pid], pss=False
        )
        results["Dovecot"]["idle_kib"] = idle_cost(
            dove_port, args.idle, lambda: process_tree(dovecot.pid), pss=True
        )
        report(results, args)
    finally:
        stop_groups(procs)
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    ours, theirs = results["Postvern"], results["Dovecot"]
    print(f"\nIMAP, one folder of {args.messages} messages, {args.idle} IDLE sessions")
    print(f"{'':38} {'Postvern':>12} {'Dovecot':>12} {'ratio':>8}  goal")
    rows = [
        ("SELECT INBOX (ms)", "select", 1000, "≤ 50 ms"),
        ("first FETCH 1:* (FLAGS ENVELOPE) (ms)", "fetch_first", 1000, ""),
        ("FETCH 1:* (FLAGS ENVELOPE) (ms)", "fetch", 1000, "≤ 2× Dovecot"),
        (f"UID SEARCH TEXT {RARE_WORD} (ms)", "search", 1000, "≤ 100 ms"),
        ("APPEND (messages/s)", "append_rate", 1, ""),
        ("memory per IDLE session (KiB)", "idle_kib", 1, "≤ 50 KB"),
    ]
    for label, key, scale, goal in rows:
        a, b = ours[key] * scale, theirs[key] * scale
        ratio = a / b if b else float("inf")
        print(f"{label:38} {a:12.1f} {b:12.1f} {ratio:7.2f}×  {goal}")
    print(
        f"FETCH response size: {ours['fetch_octets'] / 1e6:.1f} MB"
        f" vs {theirs['fetch_octets'] / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
