"""Named crash points, for tests that prove a crash at any step loses and duplicates nothing.

``point("spool.after-insert")`` does nothing unless the environment variable
``POSTVERN_CRASH_AT`` names that point, in which case the process dies at once with
``os._exit`` — no cleanup, no flush, as a power cut or SIGKILL would leave it.
"""

from __future__ import annotations

import os

ENV_VAR = "POSTVERN_CRASH_AT"
CRASH_EXIT_CODE = 86
_target = os.environ.get(ENV_VAR)


def point(name: str) -> None:
    if _target is not None and _target == name:
        os._exit(CRASH_EXIT_CODE)
