"""The Ansible role in deploy/ansible: ansible-lint clean, and a --check --diff run against
this machine (connection local) completes without error. It is never applied for real here:
check mode changes nothing, and the test confirms a file the role would write is still absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROLE_DIR = Path(__file__).resolve().parent.parent / "deploy" / "ansible"
# Installed by the test command (tools/install-system-deps): missing, the tests fail.
for _tool in ("ansible-playbook", "ansible-lint"):
    assert shutil.which(_tool), f"{_tool} missing: tools/install-system-deps installs it"


def test_ansible_lint_is_clean() -> None:
    out = subprocess.run(
        ["ansible-lint", "--nocolor"], cwd=ROLE_DIR, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def test_check_mode_run_against_localhost(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n"
    )
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "0"}
    out = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "--check", "--diff", "site.yml"],
        cwd=ROLE_DIR, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    recap = out.stdout.split("PLAY RECAP", 1)[1]
    assert "failed=0" in recap and "unreachable=0" in recap
    # The diff shows what would be written; nothing was.
    assert "PermitRootLogin no" in out.stdout
    assert not Path("/etc/sysctl.d/90-postvern-hardening.conf").exists()
