"""The filter's answer for one message: a score, an action, and the reasons for both.

Every check contributes :class:`Hit` objects (a rule name, points on a SpamAssassin-like
scale, a human sentence); the pipeline sums them into a :class:`Verdict` whose
:meth:`Verdict.header` is the ``X-Postvern-Spam`` field a user reads to see why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["inbox", "junk", "reject", "tempfail"]
ACTIONS: tuple[Action, ...] = ("inbox", "junk", "reject", "tempfail")

HEADER_NAME = "X-Postvern-Spam"
# RFC 5322 §2.1.1: a line SHOULD be at most 78 characters and MUST be at most 998. The
# header is folded at the first; the reasons are cut so that the whole field stays short.
FOLD_AT = 78
MAX_HEADER_REASONS_CHARS = 1500
# A detail quotes attacker-chosen text (a file name, a display name); it is cut to this.
MAX_DETAIL_CHARS = 80

_UNSAFE = re.compile(r"[^\x20-\x7e]|[\"\\;]")


def safe_text(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Printable ASCII without quotes or separators, for headers and logs."""
    cleaned = _UNSAFE.sub("?", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Hit:
    """One rule that matched: its name, its points, and a sentence saying what it saw."""

    code: str
    points: float
    detail: str = ""

    def __str__(self) -> str:
        detail = f" {safe_text(self.detail)}" if self.detail else ""
        return f"{self.code}({self.points:+.1f}){detail}"


@dataclass(slots=True)
class Verdict:
    """What to do with a message, and why.

    ``reject`` and ``tempfail`` are SMTP answers (5xx and 4xx); ``junk`` delivers to the
    Junk folder; ``inbox`` delivers normally. ``virus`` names what the scanner found.
    """

    score: float
    action: Action
    reasons: list[str] = field(default_factory=list)
    virus: str | None = None
    spam_probability: float | None = None  # the model's calibrated probability
    hits: list[Hit] = field(default_factory=list)
    dangerous: list[str] = field(default_factory=list)  # attachment findings, with where
    scanner_error: str | None = None  # why a virus scan could not run
    junk_threshold: float = 5.0

    @property
    def is_spam(self) -> bool:
        return self.action in ("junk", "reject")

    def header(self) -> str:
        """The value of the ``X-Postvern-Spam`` field (unfolded, ASCII)."""
        flag = "yes" if self.is_spam else "no"
        parts = [
            flag,
            f"score={self.score:.1f}",
            f"required={self.junk_threshold:.1f}",
            f"action={self.action}",
        ]
        if self.virus:
            parts.append(f"virus={safe_text(self.virus)}")
        reasons = ", ".join(safe_text(r, 200) for r in self.reasons)
        if len(reasons) > MAX_HEADER_REASONS_CHARS:
            reasons = reasons[: MAX_HEADER_REASONS_CHARS - 3] + "..."
        if reasons:
            parts.append(f'reasons="{reasons}"')
        return "; ".join(parts)

    def header_line(self) -> bytes:
        """The whole field, folded at whitespace (RFC 5322 §2.2.3), ending in CRLF."""
        words = f"{HEADER_NAME}: {self.header()}".split(" ")
        lines: list[str] = []
        line = ""
        for word in words:
            if line and len(line) + 1 + len(word) > FOLD_AT:
                lines.append(line)
                line = " " + word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        return ("\r\n".join(lines) + "\r\n").encode("ascii")

    def smtp_reply(self) -> tuple[int, str]:
        """A suggested SMTP reply for ``reject``/``tempfail`` (RFC 3463 enhanced codes)."""
        if self.action == "tempfail":
            return 451, "4.7.0 Message could not be scanned, try again later"
        if self.virus:
            return 550, "5.7.1 Message contains a virus"
        if self.dangerous:
            return 550, "5.7.1 Message contains a dangerous attachment"
        if self.action == "reject":
            return 550, "5.7.1 Message refused as spam"
        return 250, "2.0.0 OK"
