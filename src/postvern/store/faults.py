"""Named fault points, for tests that prove a crash or an I/O error at any step loses and
duplicates nothing.

``point("spool.after-insert")`` does nothing unless the environment variable
``POSTVERN_CRASH_AT`` names that point, in which case the process dies at once with
``os._exit`` — no cleanup, no flush, as a power cut or SIGKILL would leave it.

``fail("spool.deposit")`` raises ``OSError`` (as a full disk would) when
``POSTVERN_FAIL_AT`` is ``spool.deposit:N`` and this is the N-th time the point is reached.
"""

from __future__ import annotations

import errno
import itertools
import os

ENV_VAR = "POSTVERN_CRASH_AT"
CRASH_EXIT_CODE = 86
_target = os.environ.get(ENV_VAR)


def point(name: str) -> None:
    if _target is not None and _target == name:
        os._exit(CRASH_EXIT_CODE)


FAIL_ENV_VAR = "POSTVERN_FAIL_AT"
_fail_name, _, _fail_count = os.environ.get(FAIL_ENV_VAR, "").partition(":")
_fail_calls = itertools.count(1)


def fail(name: str) -> None:
    if _fail_name and _fail_name == name and next(_fail_calls) == int(_fail_count or 1):
        raise OSError(errno.ENOSPC, "injected fault")
