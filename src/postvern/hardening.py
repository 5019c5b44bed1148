"""What every Postvern process does first: keep its memory off the disk and away from others.

Mailbox keys, passwords and messages live in the memory of the server and of the admin
commands that handle secrets (``user add``, ``passwd``, ``recover``, ``app-password add``):
none of it may end in a core file or be read by another process of the same user.
"""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4  # prctl(2) option, <linux/prctl.h>


def no_core_dumps() -> bool:
    """RLIMIT_CORE 0 stops core files; PR_SET_DUMPABLE 0 also stops ptrace and
    /proc/<pid>/mem reads by other processes of the same user (Linux prctl(2)).

    Returns whether the process is now non-dumpable; a refusal is logged.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        refused = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
    except (OSError, AttributeError):
        refused = True
    if refused:
        log.warning("could not mark the process non-dumpable")
    return not refused
