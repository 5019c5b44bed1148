"""IMAP stress benchmark: Dovecot's imaptest default load against Postvern and Dovecot, same run.

imaptest (https://imapwiki.org/ImapTest) with no profile runs ``clients`` connections over
``users`` accounts; each connection logs in as a random user and walks one session with
these probabilities (imaptest's defaults, its "states" table), then logs out and starts
again:

    LOGIN 100%  LIST 50%  STATUS 50%  SELECT 100%  FETCH 100%  FETCH2 100%  STORE 50%
    DELETE 100%  EXPUNGE 100%  APPEND 100%  LOGOUT 100%

FETCH is the listing a client makes on opening a folder (UID FLAGS ENVELOPE RFC822.SIZE
INTERNALDATE of every message), FETCH2 a message body (BODY.PEEK[] of one), STORE a flag
change, DELETE a \\Deleted flag on one message when the folder is over its target size
(imaptest keeps mailboxes near ``msgs``, 30 by default), EXPUNGE, and APPEND one new 4–10 KB
message. COPY (33% in older imaptest versions) is left out, as in the issue's mix. Every
completed command counts as one operation; the figure is operations per second with 10
clients and 20 users over TLS (implicit TLS, port 993 style), the same generator against
both servers.

Postvern runs as ``postvern serve`` with its production Argon2id parameters (the first login
of each user pays it; repeated logins hit the warm-login cache), Dovecot 2.3 with a
passwd-file (PLAIN) and Maildir, both with TLS certificates from the same test CA. Peak RSS
is the summed RSS of each server's process tree, sampled every 0.2 s.

Usage: python bench/imap_stress.py [--seconds 30] [--clients 10] [--users 20] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # first: it puts tests/ on sys.path for the imports below
from harness import ServerProcess, free_port, set_config
from imap import DOVECOT, make_message, raise_nofile, start_dovecot, wait_port
from mta_kit import TestCA

DOMAIN = "example.test"
HOSTNAME = "mx.example.test"
PASSWORD = "stress-correct-horse-1"
# imaptest's default target mailbox size (its "msgs" setting).
TARGET_MESSAGES = 30
# imaptest's default state probabilities, percent (see the module docstring).
P_LIST, P_STATUS, P_STORE = 50, 50, 50
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "$Label1")
CLIENT_TIMEOUT = 120.0


def users(count: int) -> list[str]:
    return [f"user{i}@{DOMAIN}" for i in range(1, count + 1)]


# -- the load ------------------------------------------------------------------------------


@dataclass
class Tally:
    ops: int = 0
    sessions: int = 0
    errors: int = 0
    login_seconds: list[float] = field(default_factory=list)
    by_command: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.ops += 1
        self.by_command[name] = self.by_command.get(name, 0) + 1


class Session:
    """One IMAP connection: commands in, responses read up to their tagged completion."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.n = 0

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> Session:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, limit=1 << 22
        )
        session = cls(reader, writer)
        await reader.readline()  # greeting
        return session

    async def command(self, text: bytes, literal: bytes | None = None) -> list[bytes]:
        """The untagged lines (literals inlined) and the completion; raises on NO/BAD."""
        self.n += 1
        tag = b"a%d" % self.n
        if literal is None:
            self.writer.write(tag + b" " + text + b"\r\n")
        else:
            self.writer.write(tag + b" " + text + b" {%d}\r\n" % len(literal))
            await self.writer.drain()
            go = await self.reader.readline()
            if not go.startswith(b"+"):
                raise RuntimeError(go.decode(errors="replace"))
            self.writer.write(literal + b"\r\n")
        await self.writer.drain()
        lines: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            while line.endswith(b"}\r\n") and b"{" in line:
                size = int(line[line.rindex(b"{") + 1 : -3].rstrip(b"+"))
                line += await self.reader.readexactly(size) + await self.reader.readline()
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1 :].startswith(b"OK"):
                    raise RuntimeError(line.decode(errors="replace").strip())
                return lines
            lines.append(line)

    def close(self) -> None:
        self.writer.close()


def _exists(lines: list[bytes]) -> int:
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == b"EXISTS":
            return int(parts[1])
    return 0


async def one_session(
    port: int, context: ssl.SSLContext, user: str, rng: random.Random, tally: Tally
) -> None:
    s = await Session.open(port, context)
    try:
        started = time.perf_counter()
        await s.command(b'LOGIN %s "%s"' % (user.encode(), PASSWORD.encode()))
        tally.login_seconds.append(time.perf_counter() - started)
        tally.count("LOGIN")
        if rng.randrange(100) < P_LIST:
            await s.command(b'LIST "" "*"')
            tally.count("LIST")
        if rng.randrange(100) < P_STATUS:
            await s.command(b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT)")
            tally.count("STATUS")
        exists = _exists(await s.command(b"SELECT INBOX"))
        tally.count("SELECT")
        if exists:
            await s.command(b"FETCH 1:* (UID FLAGS ENVELOPE RFC822.SIZE INTERNALDATE)")
            tally.count("FETCH")
            await s.command(b"FETCH %d (BODY.PEEK[])" % rng.randint(1, exists))
            tally.count("FETCH2")
            if rng.randrange(100) < P_STORE:
                sign = rng.choice((b"+", b"-"))
                flag = rng.choice(FLAGS).encode()
                await s.command(b"STORE %d %sFLAGS (%s)" % (rng.randint(1, exists), sign, flag))
                tally.count("STORE")
            if exists > TARGET_MESSAGES:
                await s.command(b"STORE %d +FLAGS.SILENT (\\Deleted)" % rng.randint(1, exists))
                tally.count("DELETE")
        await s.command(b"EXPUNGE")
        tally.count("EXPUNGE")
        await s.command(b"APPEND INBOX", make_message(rng, rng.randrange(1 << 30)))
        tally.count("APPEND")
        await s.command(b"LOGOUT")
        tally.count("LOGOUT")
        tally.sessions += 1
    finally:
        s.close()


async def stress(
    port: int, context: ssl.SSLContext, accounts: list[str], clients: int, seconds: float
) -> tuple[Tally, float]:
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(
                    one_session(port, context, rng.choice(accounts), rng, tally), CLIENT_TIMEOUT
                )
            except (RuntimeError, ConnectionError, OSError, TimeoutError) as e:
                tally.errors += 1
                if tally.errors <= 3:
                    print(f"    error: {e}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally, time.perf_counter() - start


async def seed(port: int, context: ssl.SSLContext, accounts: list[str]) -> None:
    """Every user's INBOX filled to the target size, over IMAP (the same for both)."""
    rng = random.Random(1)

    async def fill(user: str) -> None:
        s = await Session.open(port, context)
        await s.command(b'LOGIN %s "%s"' % (user.encode(), PASSWORD.encode()))
        for _ in range(TARGET_MESSAGES):
            await s.command(b"APPEND INBOX", make_message(rng, rng.randrange(1 << 30)))
        await s.command(b"LOGOUT")
        s.close()

    for start in range(0, len(accounts), 4):
        await asyncio.gather(*(fill(u) for u in accounts[start : start + 4]))


# -- the servers ---------------------------------------------------------------------------

DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
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
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
"""


def dovecot_dir(root: Path, ca: TestCA, accounts: list[str]) -> tuple[Path, int]:
    base = root / "dovecot"
    (base / "home").mkdir(parents=True)
    cert, key = ca.issue(HOSTNAME)
    port = free_port()
    (base / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in accounts))
    nobody = 65534
    subprocess.run(["chown", "-R", f"{nobody}:{nobody}", str(base / "home")], check=True)
    (base / "dovecot.conf").write_text(
        DOVECOT_CONF.format(root=base, cert=cert, key=key, uid=nobody, gid=nobody, port=port)
    )
    return base, port


def postvern_dir(root: Path, accounts: list[str]) -> tuple[Path, int]:
    from postvern.app import App
    from postvern.cli import init_data_dir

    data = root / "postvern"
    port = free_port()
    init_data_dir(data, HOSTNAME, DOMAIN, {"imaps": f"127.0.0.1:{port}"})
    # Loopback is every client here: the per-IP limits would otherwise count the load.
    set_config(data, "abuse", {"allowlist": ["127.0.0.0/8"]})
    app = App.open(data)  # production [kdf] parameters: Argon2id t=3, 64 MiB, p=4
    try:
        for user in accounts:
            app.accounts.create_user(user, PASSWORD)
    finally:
        app.close()
    return data, port


@dataclass
class Row:
    system: str
    ops_per_second: float
    sessions_per_second: float
    login_ms_mean: float
    login_ms_p99: float
    errors: int
    peak_rss_mib: float
    mix: dict[str, int]


def row(system: str, tally: Tally, seconds: float, sampler: common.MemorySampler) -> Row:
    logins = sorted(tally.login_seconds) or [float("nan")]
    return Row(
        system,
        tally.ops / seconds,
        tally.sessions / seconds,
        sum(logins) / len(logins) * 1000,
        logins[min(len(logins) - 1, int(0.99 * len(logins)))] * 1000,
        tally.errors,
        sampler.peak_rss_kib / 1024,
        dict(tally.by_command),
    )


def run_dovecot(root: Path, ca: TestCA, accounts: list[str], args: argparse.Namespace) -> Row:
    base, port = dovecot_dir(root, ca, accounts)
    proc = start_dovecot(base)
    try:
        wait_port(port)
        context = common.trust_anything()
        asyncio.run(seed(port, context, accounts))
        with common.MemorySampler(proc.pid) as sampler:
            tally, seconds = asyncio.run(
                stress(port, context, accounts, args.clients, args.seconds)
            )
        return row("dovecot 2.3", tally, seconds, sampler)
    finally:
        proc.terminate()
        proc.wait(30)


def run_postvern(root: Path, accounts: list[str], args: argparse.Namespace) -> Row:
    from harness import DataDir

    data, port = postvern_dir(root, accounts)
    with ServerProcess(DataDir(data, DOMAIN, {"imaps": f"127.0.0.1:{port}"})) as server:
        assert server.proc is not None
        context = common.trust_anything()
        asyncio.run(seed(port, context, accounts))
        with common.MemorySampler(server.proc.pid) as sampler:
            tally, seconds = asyncio.run(
                stress(port, context, accounts, args.clients, args.seconds)
            )
        return row("postvern serve", tally, seconds, sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="Dovecot then Postvern, N times")
    parser.add_argument("--only", default="dovecot,postvern")
    args = parser.parse_args()
    raise_nofile()
    systems = [s for s in args.only.split(",") if s]
    if "dovecot" in systems and not Path(DOVECOT).exists():
        print("dovecot: not installed; left out")
        systems.remove("dovecot")
    accounts = users(args.users)
    print(
        f"IMAP stress (imaptest's default mix): {args.clients} clients, {args.users} users, "
        f"{args.seconds:g} s per system and round, implicit TLS\n"
        f"{common.machine_load()} at the start",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="postvern-imapstress-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Dovecot's auth and mail processes read their files below
        ca = TestCA(root)
        for n in range(args.rounds):
            for system in systems:
                where = root / f"{system}-{n}"
                where.mkdir()
                if system == "dovecot":
                    rows.append(run_dovecot(where, ca, accounts, args))
                else:
                    rows.append(run_postvern(where, accounts, args))
                r = rows[-1]
                print(
                    f"  round {n + 1} {r.system:16} {r.ops_per_second:8.1f} ops/s "
                    f"{r.sessions_per_second:6.1f} sessions/s  LOGIN mean {r.login_ms_mean:7.1f} "
                    f"ms p99 {r.login_ms_p99:7.1f} ms  errors {r.errors}  peak RSS "
                    f"{r.peak_rss_mib:6.1f} MiB  ({common.machine_load()})",
                    flush=True,
                )
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.system.split()[0], []).append(r)
    if "postvern" in by and "dovecot" in by:
        for pv, dc in zip(by["postvern"], by["dovecot"], strict=True):
            print(
                f"Postvern / Dovecot: {pv.ops_per_second / dc.ops_per_second:.3g}× operations "
                f"per second, LOGIN {pv.login_ms_mean / dc.login_ms_mean:.3g}× mean time, "
                f"{pv.peak_rss_mib / dc.peak_rss_mib:.3g}× peak RSS"
            )
    for r in rows:
        print(f"  {r.system} operations: {r.mix}")


if __name__ == "__main__":
    main()
