"""Files that survive a crash: written whole under a temporary name, fsynced, renamed.

A reader sees the old file or the new one, never half of one (rename(2) is atomic within a
file system), and once the folder is fsynced too the new name survives a power cut. The
spool's sealed deposits and the local backup target both write this way.
"""

from __future__ import annotations

import os
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # readers skip these names: a crash can leave one behind


def fsync_dir(path: Path) -> None:
    """Make the names in ``path`` (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(directory: Path, name: str, data: bytes, *, replace_temp: bool = False) -> None:
    """Write ``data`` as ``directory/name``: temp file (0600), write, fsync, rename.

    The folder's own fsync is the caller's, so a batch of files pays for it once. A temp
    file left by a crash is an error unless ``replace_temp`` (where names are reused).
    """
    tmp = directory / f"{TEMP_PREFIX}{name}"
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace_temp else os.O_EXCL)
    fd = os.open(tmp, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
