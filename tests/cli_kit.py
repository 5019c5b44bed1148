"""``postvern`` as a user types it: a subprocess with a clean environment.

:func:`postvern` runs one command to its end; :func:`running` starts a long-lived one
(``serve``, ``demo``) as a :class:`harness.ServerProcess`, which waits for its ready line and
stops it with SIGTERM. Both can run the command under a given umask, as a caller's shell
would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import DataDir, ServerProcess

POSTVERN = [sys.executable, "-m", "postvern.cli"]


def postvern(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, umask: int | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
    return subprocess.run(
        [*POSTVERN, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        preexec_fn=None if umask is None else lambda: os.umask(umask),
        timeout=120,
    )


def running(
    data: Path, *command: str, env: dict[str, str] | None = None, umask: int | None = None
) -> ServerProcess:
    """``postvern --data DATA COMMAND…`` until stopped (use it as a context manager)."""
    return ServerProcess(DataDir(data, "", {}), env, command=command, umask=umask)


def listen_env(listen: dict[str, str]) -> dict[str, str]:
    """``POSTVERN_LISTEN__*`` overrides: a data directory's listeners moved to these ports."""
    return {f"POSTVERN_LISTEN__{name.upper()}": address for name, address in listen.items()}
