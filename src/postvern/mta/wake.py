"""Waking the running MTA from another process: a FIFO in the data directory.

``postvern queue retry`` changes the queue database from its own process, and the server's
MTA would see the change only at its next scan of the queue (at most a minute away). So the
MTA keeps the FIFO ``mta.wake`` open while it runs, and :func:`wake` writes one byte into it;
the MTA then scans the queue at once. A FIFO needs nothing but the data directory: no pid
file, no signal that could reach a process that reused a dead server's pid, no socket path
length limit (108 bytes for AF_UNIX). Without a running server nobody has the FIFO open,
and opening it for writing fails at once (ENXIO), which is how :func:`wake` knows.

The MTA opens the FIFO for reading *and* writing (Linux, fifo(7)): so there is always a
writer, and the read end never turns to end-of-file when a CLI process closes its side. A
byte carries no message: any number of wake-ups before the MTA reads them are one wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

WAKE_FILE = "mta.wake"
# Bytes read per wake-up; what is left over only means one more (harmless) scan.
READ_CHUNK = 4096


class WakeListener:
    """The server's end: calls ``on_wake()`` on the event loop whenever :func:`wake` runs."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop

    @classmethod
    def open(cls, path: Path, on_wake: Callable[[], None]) -> WakeListener:
        """Create the FIFO if needed (0600) and listen on it; OSError if that cannot be."""
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            os.mkfifo(path, 0o600)
        else:
            if not stat.S_ISFIFO(mode):  # not ours to use: refuse rather than replace
                raise OSError(f"{path} exists and is not a FIFO")
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        loop = asyncio.get_running_loop()
        listener = cls(fd, loop)

        def readable() -> None:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while len(os.read(fd, READ_CHUNK)) == READ_CHUNK:
                    pass
            on_wake()

        try:
            loop.add_reader(fd, readable)
        except BaseException:
            os.close(fd)
            raise
        return listener

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1


def wake(path: Path) -> bool:
    """Tell the MTA of a server running on this data directory to look at the queue now.

    Returns False when no server is listening (none runs, or it keeps no FIFO open); the
    queue change is then found whenever the server starts, as every pending entry is.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # ENXIO: no reader; ENOENT: never started here
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        with contextlib.suppress(BlockingIOError):  # full: wake-ups are pending already
            os.write(fd, b"\n")
        return True
    finally:
        os.close(fd)
