"""Listening sockets that outlive a process: systemd socket activation and the self-handoff.

A restart must not refuse a client. Two ways keep a listening socket open across one:

* **systemd socket activation** (``deploy/postvern.socket``): systemd holds the sockets and
  passes them as descriptors 3, 4, … with ``LISTEN_FDS``, ``LISTEN_PID`` and
  ``LISTEN_FDNAMES`` (sd_listen_fds(3)); each name is a ``[listen]`` entry (``smtp``,
  ``imaps``, …). While the service restarts, connections wait in the socket's accept queue.
* **the self-handoff** (SIGUSR2, for hosts without it): the running server starts its
  successor — the same command line — with the listening sockets inherited (their names and
  descriptor numbers in ``POSTVERN_LISTEN_FDS``) and a pipe on which the successor says it is
  ready. Only then does the old server stop accepting and let its sessions finish. Both
  processes accept from the same socket meanwhile, so the kernel's accept queue never closes.

A listener takes its inherited socket with :func:`take` by the address it is configured for;
one not inherited is bound as usual. Inherited sockets whose name no ``[listen]`` entry has
are closed and logged. ``postvern.pid`` in the data directory names the process that serves
(written once it is ready), so a supervisor or a test can follow a handoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

from postvern import config

if TYPE_CHECKING:
    from postvern.server import Server

log = logging.getLogger(__name__)

# sd_listen_fds(3): the first passed descriptor is 3 (after stdin, stdout, stderr).
SD_LISTEN_FDS_START = 3
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# The self-handoff's own variables: "name=fd,name=fd" and the descriptor of the ready pipe.
# POSTVERN_* names that are not settings are ignored by config.load.
HANDOFF_FDS = "POSTVERN_LISTEN_FDS"
READY_FD = "POSTVERN_READY_FD"
READY_WORD = b"ready\n"
# A successor opens the databases, loads the filter's model lazily and opens every listener;
# a start that takes longer than this has failed, and the old server keeps serving.
SUCCESSOR_START_SECONDS = 120.0
# What the asyncio listeners use (asyncio's create_server default backlog is 100); systemd's
# Backlog= defaults to SOMAXCONN.
BACKLOG = 128
PID_FILE = "postvern.pid"
# Listening on every address: a systemd socket "ListenStream=25" is [::]:25 (IPv4 too).
WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104  # nosec B104 - compared, never bound

_inherited: dict[tuple[str, int], socket.socket] = {}


def inherit(listen: config.Listen, environ: MutableMapping[str, str] | None = None) -> int:
    """Take the listening sockets passed by systemd or a predecessor, by ``[listen]`` name.

    The variables are removed, so no child process sees them. Returns how many sockets were
    adopted; each waits for :func:`take` with the address its name is configured for.
    """
    env = os.environ if environ is None else environ
    named = _from_systemd(env) or _from_predecessor(env)
    for name, sock in named:
        if name in _listener_names():
            address = getattr(listen, name)
        else:
            # One .socket unit with several ListenStream= gives them all one name (its own):
            # such a socket is matched by the address it is bound to.
            address = _by_address(listen, sock)
        if address is None:
            log.warning("inherited socket %r matches no [listen] entry: closed", name)
            sock.close()
            continue
        key = config.parse_hostport(address)
        if key in _inherited:
            log.warning("a second inherited socket for %s (%s): closed", name, address)
            sock.close()
            continue
        _inherited[key] = sock
    return len(_inherited)


def _listener_names() -> set[str]:
    return {f.name for f in dataclasses.fields(config.Listen)}


def _by_address(listen: config.Listen, sock: socket.socket) -> str | None:
    """The ``[listen]`` address of this port whose host is the socket's or a wildcard."""
    host, port = sock.getsockname()[:2]
    for f in dataclasses.fields(config.Listen):
        address = getattr(listen, f.name)
        if address is None:
            continue
        want_host, want_port = config.parse_hostport(address)
        if want_port == port and (want_host == host or {want_host, host} & WILDCARDS):
            return str(address)
    return None


def _from_systemd(env: MutableMapping[str, str]) -> list[tuple[str, socket.socket]]:
    values = {k: env.pop(k) for k in SYSTEMD_VARIABLES if k in env}
    if "LISTEN_FDS" not in values:
        return []
    if values.get("LISTEN_PID") != str(os.getpid()):
        return []  # meant for another process (sd_listen_fds(3) checks the same)
    count = int(values["LISTEN_FDS"])
    names = values.get("LISTEN_FDNAMES", "").split(":") if values.get("LISTEN_FDNAMES") else []
    if len(names) != count:
        # Without FileDescriptorName= systemd names every socket "unknown".
        log.warning("systemd passed %d sockets but %d names; name each one", count, len(names))
    out: list[tuple[str, socket.socket]] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((names[i] if i < len(names) else "unknown", socket.socket(fileno=fd)))
    return out


def _from_predecessor(env: MutableMapping[str, str]) -> list[tuple[str, socket.socket]]:
    value = env.pop(HANDOFF_FDS, "")
    out: list[tuple[str, socket.socket]] = []
    for item in filter(None, value.split(",")):
        name, _, fd = item.partition("=")
        os.set_inheritable(int(fd), False)
        out.append((name, socket.socket(fileno=int(fd))))
    return out


def take(host: str, port: int) -> socket.socket | None:
    """The inherited socket for this configured address, once; None: bind a new one."""
    sock = _inherited.pop((host, port), None)
    if sock is not None:
        sock.setblocking(False)
    return sock


def bind(host: str, port: int) -> socket.socket:
    """A listening socket as asyncio's create_server makes one (SO_REUSEADDR, IPv6 only on
    an IPv6 address), for listeners that need the socket object itself."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def close_unclaimed() -> None:
    """Inherited sockets no listener took (their listener failed to start): closed."""
    for (host, port), sock in _inherited.items():
        log.warning("inherited socket for %s:%d not used: closed", host, port)
        sock.close()
    _inherited.clear()


# -- the self-handoff ----------------------------------------------------------------------


def listening_descriptors(listeners: Iterable[tuple[str, object]]) -> dict[str, int]:
    """``[listen]`` name → descriptor of each listener's one listening socket."""
    out: dict[str, int] = {}
    for name, listener in listeners:
        sockets = tuple(getattr(listener, "sockets", ()))
        if len(sockets) != 1:
            # create_server binds one socket per address a host name resolves to; a
            # successor's listener takes one. Such a listener is bound anew, not handed over.
            log.warning("%s has %d listening sockets: not handed over", name, len(sockets))
            continue
        out[name] = sockets[0].fileno()
    return out


def successor_command() -> list[str]:
    """This process's own command line (``python -m postvern.cli …`` or the entry point)."""
    return [sys.executable, *sys.orig_argv[1:]]


async def start_successor(descriptors: Mapping[str, int]) -> subprocess.Popen[bytes] | None:
    """Start the successor with these listening sockets and wait until it is ready.

    Returns it once it has said so; None (and the successor is stopped) when it exits or
    does not say so within SUCCESSOR_START_SECONDS — the caller keeps serving then.
    """
    read_end, write_end = os.pipe()
    env = dict(os.environ)
    env[HANDOFF_FDS] = ",".join(f"{name}={fd}" for name, fd in descriptors.items())
    env[READY_FD] = str(write_end)
    try:
        # Popen, not asyncio's subprocess: closing that transport would kill the successor.
        child = await asyncio.to_thread(
            subprocess.Popen,
            successor_command(),
            env=env,
            pass_fds=(*descriptors.values(), write_end),
        )
    except OSError as e:
        log.error("restart: cannot start the successor: %s", e)
        os.close(read_end)
        return None
    finally:
        os.close(write_end)
    try:
        async with asyncio.timeout(SUCCESSOR_START_SECONDS):
            said = await asyncio.to_thread(_read_all, read_end)
    except TimeoutError:
        said = b""
    if said == READY_WORD:
        os.close(read_end)
        return child
    log.error("restart: the successor (pid %d) did not become ready; still serving", child.pid)
    if child.poll() is None:
        child.terminate()
    await asyncio.to_thread(child.wait)
    os.close(read_end)
    return None


def _read_all(fd: int) -> bytes:
    """Up to the ready word, or what came before the pipe closed (the successor died)."""
    data = b""
    while len(data) < len(READY_WORD):
        chunk = os.read(fd, len(READY_WORD) - len(data))
        if not chunk:
            break
        data += chunk
    return data


def tell_predecessor(environ: MutableMapping[str, str] | None = None) -> None:
    """In a successor: say ready to the server that started it (nothing otherwise)."""
    env = os.environ if environ is None else environ
    fd = env.pop(READY_FD, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), READY_WORD)
    with contextlib.suppress(OSError):
        os.close(int(fd))


# -- postvern.pid --------------------------------------------------------------------------


def write_pid_file(data_dir: Path) -> None:
    """Name this process as the one serving ``data_dir`` (atomically: a reader never sees
    half a number)."""
    path = data_dir / PID_FILE
    temporary = path.with_name(f".{PID_FILE}.{os.getpid()}")
    temporary.write_text(f"{os.getpid()}\n")
    temporary.replace(path)


def remove_pid_file(data_dir: Path) -> None:
    """Remove ``postvern.pid`` if it still names this process (a successor's stays)."""
    path = data_dir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text()) == os.getpid():
            path.unlink()


# -- SIGUSR2 -------------------------------------------------------------------------------


class Restart:
    """SIGUSR2: hand the listening sockets to a successor, then ``done`` (the caller's
    ordinary shutdown: stop accepting, let sessions finish, exit).

    The outbound MTA stops first, so the queue is never worked by two processes at once
    (each would claim the same due recipients); submissions still queue meanwhile, and the
    successor's MTA takes every pending entry when it starts. If the successor fails, the
    MTA starts again here and this server goes on as before.
    """

    def __init__(self, server: Server, done: Callable[[], None]) -> None:
        self.server = server
        self.done = done
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        if self._task is not None and not self._task.done():
            log.info("restart: already in progress")
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        descriptors = listening_descriptors(self.server.servers)
        log.info("restart: starting the successor with %s", ", ".join(descriptors) or "nothing")
        mta = self.server.mta
        if mta is not None:
            await mta.stop()
        try:
            ready = await start_successor(descriptors) is not None
        except Exception:
            log.exception("restart failed; still serving")
            ready = False
        if ready:
            log.info("restart: the successor is ready; this server stops accepting")
            self.done()
        elif mta is not None:
            await mta.start()
