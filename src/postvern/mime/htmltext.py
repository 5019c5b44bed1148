"""Reducing HTML to plain text for search and filters (not for display).

Regular expressions, not a DOM: the goal is the words a reader would see, fast and in
linear time. Script, style and comments are dropped, block elements become line breaks,
entities are decoded (WHATWG rules, via :func:`html.unescape`).
"""

from __future__ import annotations

import html
import re

_INVISIBLE = re.compile(
    r"<!--.*?(?:-->|\Z)|<(script|style|head|title|template)\b[^>]*>.*?(?:</\1\s*>|\Z)",
    re.I | re.S,
)
_BLOCK = re.compile(r"<\s*/?\s*(?:br|p|div|tr|li|h[1-6]|table|blockquote|pre|hr)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def html_to_text(markup: str) -> str:
    """The visible text of an HTML document, whitespace collapsed."""
    text = _INVISIBLE.sub(" ", markup)
    text = _BLOCK.sub("\n", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    text = _SPACES.sub(" ", text)
    return _BLANK_LINES.sub("\n", text).strip()
