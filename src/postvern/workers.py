"""Several worker processes on one data directory: a supervisor and N workers (§6.1).

One Python process runs one event loop on one core. With ``[server] workers`` above 1 (0,
the default, is one per core) ``postvern serve`` becomes a **supervisor** that

* opens every listening socket once — or adopts those systemd or a predecessor passed
  (handoff.py) — and starts N workers that inherit them; the kernel hands each new
  connection to whichever worker accepts it first;
* is told by each worker that it is ready (the self-handoff's ready pipe), then prints the
  ready line and writes ``postvern.pid`` with its own pid;
* restarts a worker that dies, forwards SIGTERM/SIGINT (stop) and SIGHUP (reload) to every
  worker, and answers SIGUSR2 with the self-handoff: a successor supervisor gets the
  listening sockets, and once it is ready this one's workers finish their sessions and stop.

A **worker** is the single-process server (server.py) told its place by ``POSTVERN_WORKER``
(``index/count``); it takes the inherited sockets as a successor does. What must exist once
runs in worker 0 only: the outbound MTA (so each message is delivered once; the others
wake it through ``mta.wake`` after an enqueue), the HTTPS portal (its sessions hold a user's
unlocked mailbox key in that process's memory, so every request of a session must reach the
same process), backups, the watchdog and the nftables mirror. What all workers share goes
through the data directory: the mailboxes (SQLite WAL, one writer at a time), the sealed
spool, the queue, and bans and rate-limit counters (Redis, or ``abuse.sqlite``).

A worker that loses its supervisor (killed with SIGKILL) sees end-of-file on an inherited
pipe and stops by itself, so no worker outlives it and keeps sockets open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from postvern import config, handoff

log = logging.getLogger(__name__)

# "index/count" of a worker process; absent in a single process and in the supervisor.
WORKER_ENV = "POSTVERN_WORKER"
# The read end of a pipe whose write end only the supervisor holds: end-of-file on it means
# the supervisor is gone.
SUPERVISOR_FD_ENV = "POSTVERN_SUPERVISOR_FD"
# Listeners only worker 0 serves. The portal's sessions live in one process's memory (they
# hold the unlocked mailbox key, which never touches disk), so they cannot be spread.
FIRST_WORKER_ONLY = frozenset({"https"})
# A worker that ran less than this before it died is failing, not unlucky: the next restart
# waits longer (doubling from RESTART_FIRST up to RESTART_MAX), so a broken start does not
# spin a core.
HEALTHY_SECONDS = 30.0
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
# On stop, workers get the server's own shutdown grace plus closing the databases; past this
# they are killed.
WORKER_STOP_SECONDS = 60.0
# The MTA's lock file (worker 0): held while its MTA runs, so during a SIGUSR2 handoff the
# successor's MTA starts only once the old one has stopped — never two on one queue.
MTA_LOCK_FILE = "mta.lock"
MTA_LOCK_POLL = 0.5


@dataclass(frozen=True, slots=True)
class Role:
    """This process's place: worker ``index`` of ``count`` (0 of 1: a single process)."""

    index: int = 0
    count: int = 1

    @property
    def first(self) -> bool:
        """Worker 0 runs what must exist once: the MTA, the portal, backups, the watchdog."""
        return self.index == 0

    @property
    def alone(self) -> bool:
        return self.count == 1

    def serves(self, listener: str) -> bool:
        return self.first or listener not in FIRST_WORKER_ONLY


def worker_count(settings: config.Settings) -> int:
    """``[server] workers``, with 0 meaning one per core this process may run on — except
    on a cluster node, which runs as one process (cluster/node.py refuses more)."""
    wanted = settings.server.workers
    if wanted < 0:
        raise config.ConfigError("[server] workers must be 0 (one per core) or more")
    if wanted == 0 and settings.cluster.role:
        return 1
    return wanted or len(os.sched_getaffinity(0))


# This process's role, once :func:`role_from_environment` has read it.
current = Role()


def role_from_environment(environ: MutableMapping[str, str] | None = None) -> Role:
    """The role the supervisor gave this process (removed, so no child inherits it)."""
    global current
    env = os.environ if environ is None else environ
    value = env.pop(WORKER_ENV, None)
    if value is None:
        return Role()
    index, _, count = value.partition("/")
    current = Role(int(index), int(count))
    return current


def supervisor_pipe(environ: MutableMapping[str, str] | None = None) -> int | None:
    """In a worker: the descriptor that reaches end-of-file when the supervisor is gone."""
    env = os.environ if environ is None else environ
    value = env.pop(SUPERVISOR_FD_ENV, None)
    if value is None:
        return None
    fd = int(value)
    os.set_inheritable(fd, False)
    return fd


class OneAcceptPerTick(socket.socket):
    """A listening socket shared with other workers that takes one connection per turn of
    this worker's event loop.

    asyncio's accept handler takes up to 100 waiting connections each time the socket is
    readable, so a burst (16 clients connecting at once) all went to whichever worker woke
    first, and the other stayed idle while those connections lived. Reporting "nothing
    more" after the first accept of a turn leaves the rest to whichever worker's loop comes
    round first — the least busy one. The socket is still readable, so this worker takes the
    next on its next turn; nothing waits longer than a turn of some worker's loop.
    """

    _taken = False

    def accept(self) -> tuple[socket.socket, typing.Any]:
        if self._taken:
            raise BlockingIOError  # asyncio's accept loop stops here until the next turn
        conn = super().accept()
        self._taken = True
        asyncio.get_running_loop().call_soon(self._next_turn)
        return conn

    def _next_turn(self) -> None:
        self._taken = False


def balance_accepts() -> None:
    """In a worker: the listening sockets it inherited take one connection per loop turn."""
    inherited = handoff._inherited  # the sockets waiting for their listener (handoff.take)
    for key, sock in list(inherited.items()):
        inherited[key] = OneAcceptPerTick(fileno=sock.detach())


def label_log_records(role: Role) -> None:
    """With several workers, each log line names its worker after the logger's name
    (``postvern.smtp.mx[w1]: …``): the lines of N processes interleave in one log."""
    if role.alone:
        return
    make = logging.getLogRecordFactory()
    label = f"[w{role.index}]"

    def labelled(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.name += label
        return record

    logging.setLogRecordFactory(labelled)


def watch_supervisor(fd: int, stop: Callable[[], None]) -> None:
    """Call ``stop`` (on the running loop) once the supervisor has gone away."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        loop.remove_reader(fd)
        log.warning("the supervisor is gone; this worker stops")
        stop()

    loop.add_reader(fd, readable)


def server_id(role: Role) -> tuple[tuple[str, str], ...]:
    """What IMAP ID (RFC 2971) adds with several workers: which one answers (its index, not
    its pid), so an operator or a test can tell connections apart."""
    return () if role.alone else (("worker", str(role.index)),)


# -- the MTA's lock (worker 0 of several) -----------------------------------------------------


class MTALock:
    """flock(2) on ``mta.lock``: at most one MTA per data directory at a time."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / MTA_LOCK_FILE
        self._fd: int | None = None

    async def acquire(self) -> None:
        """Wait (without blocking the loop) until no other process's MTA holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    log.info("mta: waiting for the previous server's MTA to stop")
                    waited = True
                await asyncio.sleep(MTA_LOCK_POLL)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


# -- the supervisor ---------------------------------------------------------------------------


class SupervisorError(Exception):
    """A listener could not be opened, or the workers did not start."""


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    pidfd: int = -1


class Supervisor:
    """Opens the listeners, runs ``count`` workers on them, keeps them running."""

    def __init__(self, settings: config.Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.sockets: dict[str, socket.socket] = {}
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self._failures: dict[int, int] = {}
        self._life_read, self._life_write = os.pipe()  # both non-inheritable
        self._restarts: set[asyncio.Task[None]] = set()
        self._handoff: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._exits = asyncio.Event()  # set whenever a worker's process ends

    # -- start ---------------------------------------------------------------------------

    def open_listeners(self) -> None:
        """Every configured listener's socket: inherited (systemd, a predecessor) or bound."""
        listen = self.settings.listen
        for f in dataclasses.fields(config.Listen):
            address = getattr(listen, f.name)
            if address is None:
                continue
            host, port = config.parse_hostport(address)
            try:
                self.sockets[f.name] = handoff.take(host, port) or handoff.bind(host, port)
            except OSError as e:
                self.close_listeners()
                raise SupervisorError(
                    f"cannot listen for {f.name} on {address}: {e.strerror}"
                ) from None
        handoff.close_unclaimed()

    def close_listeners(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    async def start(self) -> None:
        """Start every worker and wait until each has said it is ready."""
        ready = await asyncio.gather(*(self._start_worker(i) for i in range(self.count)))
        if not all(ready):
            await self.stop_workers()
            raise SupervisorError("a worker did not start (its log says why)")

    async def _start_worker(self, index: int) -> bool:
        role = Role(index, self.count)
        descriptors = {n: s.fileno() for n, s in self.sockets.items() if role.serves(n)}
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env[handoff.HANDOFF_FDS] = ",".join(f"{n}={fd}" for n, fd in descriptors.items())
        env[handoff.READY_FD] = str(write_end)
        env[WORKER_ENV] = f"{index}/{self.count}"
        env[SUPERVISOR_FD_ENV] = str(self._life_read)
        try:
            # Popen, not asyncio's subprocess (as handoff.py): a worker must outlive any
            # transport object; its exit is watched through a pidfd instead.
            proc = await asyncio.to_thread(
                subprocess.Popen,
                handoff.successor_command(),
                env=env,
                pass_fds=(*descriptors.values(), write_end, self._life_read),
            )
        except OSError as e:
            log.error("cannot start worker %d: %s", index, e)
            os.close(read_end)
            return False
        finally:
            os.close(write_end)
        worker = self.workers[index] = _Worker(index, proc, time.monotonic())
        self._watch(worker)
        try:
            async with asyncio.timeout(handoff.SUCCESSOR_START_SECONDS):
                said = await asyncio.to_thread(handoff._read_all, read_end)
        except TimeoutError:
            said = b""
        finally:
            os.close(read_end)
        if said != handoff.READY_WORD:
            log.error("worker %d (pid %d) did not become ready", index, proc.pid)
            if proc.poll() is None:
                proc.terminate()
            return False
        log.info("worker %d (pid %d) ready", index, proc.pid)
        return True

    def _watch(self, worker: _Worker) -> None:
        """Be told when the worker's process ends (a pidfd is readable then)."""
        worker.pidfd = os.pidfd_open(worker.proc.pid)
        asyncio.get_running_loop().add_reader(worker.pidfd, self._exited, worker)

    def _exited(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        code = worker.proc.wait()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self._exits.set()
        if self.stopping:
            return
        ran = time.monotonic() - worker.started
        failures = self._failures.get(worker.index, 0) + 1 if ran < HEALTHY_SECONDS else 0
        self._failures[worker.index] = failures
        delay = min(RESTART_MAX, RESTART_FIRST * 2 ** max(0, failures - 1)) if failures else 0.0
        log.warning(
            "worker %d (pid %d) exited with %s after %.0f s; restarting it in %.1f s",
            worker.index,
            worker.proc.pid,
            code,
            ran,
            delay,
        )
        task = loop.create_task(self._restart(worker.index, delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self.stopping and index not in self.workers:
            await self._start_worker(index)

    # -- signals -------------------------------------------------------------------------

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signum)

    def reload(self) -> None:
        log.info("reload: telling every worker")
        self.signal_workers(signal.SIGHUP)

    def request_stop(self) -> None:
        self._stop.set()

    def request_handoff(self) -> None:
        """SIGUSR2: a successor supervisor takes the listening sockets (handoff.py)."""
        if self._handoff is not None and not self._handoff.done():
            log.info("restart: already in progress")
            return
        self._handoff = asyncio.get_running_loop().create_task(self._hand_off())

    async def _hand_off(self) -> None:
        descriptors = {name: sock.fileno() for name, sock in self.sockets.items()}
        log.info("restart: starting the successor with %s", ", ".join(descriptors) or "nothing")
        try:
            ready = await handoff.start_successor(descriptors) is not None
        except Exception:
            log.exception("restart failed; still serving")
            ready = False
        if ready:
            # The old MTA holds mta.lock until its worker stops; the successor's waits for it.
            log.info("restart: the successor is ready; these workers stop accepting")
            self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    # -- stop ----------------------------------------------------------------------------

    async def _all_exited(self) -> None:
        while self.workers:
            self._exits.clear()
            await self._exits.wait()

    async def stop_workers(self) -> None:
        """SIGTERM to every worker; those still running after WORKER_STOP_SECONDS are
        killed."""
        self.stopping = True
        for task in self._restarts:
            task.cancel()
        self.signal_workers(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WORKER_STOP_SECONDS):
                await self._all_exited()
        for worker in list(self.workers.values()):
            log.warning("worker %d did not stop in time: killed", worker.index)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        await self._all_exited()
        os.close(self._life_write)
        os.close(self._life_read)


async def supervise(
    settings: config.Settings,
    count: int,
    banner: Callable[[config.Settings], str] | None,
    ready_line: str,
) -> int:
    """The supervisor's life: listeners, workers, signals, until told to stop."""
    supervisor = Supervisor(settings, count)
    try:
        supervisor.open_listeners()
        await supervisor.start()
    except SupervisorError as e:
        supervisor.close_listeners()
        print(f"postvern: {e}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.request_stop)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    loop.add_signal_handler(signal.SIGUSR2, supervisor.request_handoff)
    if banner is not None:
        print(banner(settings), flush=True)
    handoff.write_pid_file(settings.data_dir)
    log.info("serving with %d worker processes", count)
    print(ready_line, flush=True)
    handoff.tell_predecessor()  # after a SIGUSR2 restart: the old server stops accepting now
    await supervisor.wait()
    log.info("shutting down")
    # The listening sockets stay open until the workers are gone: after a handoff the
    # successor holds them too, and before one nothing accepts once the workers stop.
    await supervisor.stop_workers()
    supervisor.close_listeners()
    handoff.remove_pid_file(settings.data_dir)
    return 0
