"""``postvern import`` and ``postvern export`` (filled in by the import/export layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def register(sub: Any, command: Callable[..., Any]) -> None:
    return None
