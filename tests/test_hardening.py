"""Every Postvern process keeps its memory to itself: no core file, not dumpable.

The server does it at start; the admin commands, which see passwords and mailbox keys
(``user add``, ``passwd``, ``recover``), do it before anything else.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from harness import make_data_dir

PR_GET_DUMPABLE = 3


def test_no_core_dumps_makes_the_process_non_dumpable() -> None:
    code = (
        "import ctypes, resource\n"
        "from postvern.hardening import no_core_dumps\n"
        "libc = ctypes.CDLL(None)\n"
        "before = libc.prctl(3, 0, 0, 0, 0)\n"
        "ok = no_core_dumps()\n"
        "print(before, libc.prctl(3, 0, 0, 0, 0), ok, resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split(maxsplit=3)
    assert out[:3] == ["1", "0", "True"]
    assert out[3].strip() == "(0, 0)"


def test_an_admin_command_holding_a_password_has_no_core_limit(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", passwords={})
    proc = subprocess.Popen(
        [sys.executable, "-m", "postvern.cli", "--data", str(data.path), "user", "add",
         "carol@example.test", "--password-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        limits = ""
        for _ in range(200):  # it waits for the password on stdin
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            core = next(line for line in limits.splitlines() if line.startswith("Max core"))
            if core.split()[4:6] == ["0", "0"]:
                break
            time.sleep(0.05)
        assert core.split()[4:6] == ["0", "0"], core
    finally:
        proc.communicate(b"carol-long-password\ncarol-long-password\n", timeout=60)
    assert proc.returncode == 0
