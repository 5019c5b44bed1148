"""A linear-time HTML reader for filtering: visible text, links with their text, and forms.

Spam and phishing need what a reader *sees* (text, the words of a link) next to what a
click *does* (the href, a form's action), not a DOM. A single regular-expression pass finds
tags; it never backtracks across a tag boundary, so hostile markup costs linear time.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

# More links or forms than these add nothing to a verdict; a message with thousands of
# them is already suspicious and must not cost unbounded memory.
MAX_LINKS = 1000
MAX_FORMS = 50
# The text shown for one link; longer anchors are cut (only the first words are compared).
MAX_ANCHOR_TEXT = 500

# A tag may not contain '<', so a scan from one '<' stops at the next: each character is
# examined a bounded number of times whatever the input.
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9:-]{0,40})([^<>]*)>")
_ATTR = re.compile(
    r"""([a-zA-Z_:][-a-zA-Z0-9_:.]{0,40})\s*(?:=\s*("[^"]*"|'[^']*'|[^\s"'=<>`]+))?"""
)
_SCRIPT_END = {
    "script": re.compile(r"</script\s*>", re.I),
    "style": re.compile(r"</style\s*>", re.I),
    "title": re.compile(r"</title\s*>", re.I),
}
_META_REFRESH_URL = re.compile(r"url\s*=\s*['\"]?([^'\";\s]+)", re.I)
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt fieldset figcaption figure footer "
    "form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tbody td tfoot th "
    "thead tr ul option button".split()
)
# Attributes whose value a browser loads or navigates to.
_URL_ATTRS = frozenset(("href", "src", "action", "formaction", "background", "data", "poster"))


@dataclass(slots=True)
class Link:
    href: str
    text: str


@dataclass(slots=True)
class Form:
    action: str
    password_inputs: int = 0
    inputs: int = 0


@dataclass(slots=True)
class HtmlDoc:
    text: str = ""
    title: str = ""
    links: list[Link] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # every URL-valued attribute
    forms: list[Form] = field(default_factory=list)
    password_inputs: int = 0  # anywhere, in a form or not (scripts submit orphans)
    scripts: int = 0
    script_text: str = ""  # inline script bodies, bounded, for redirect heuristics


def scan_html(source: str) -> HtmlDoc:
    """Read *source* (already bounded by the caller) into an :class:`HtmlDoc`."""
    doc = HtmlDoc()
    out: list[str] = []
    anchor: tuple[str, int] | None = None  # (href, index into out where its text starts)
    in_form = False
    pos = 0
    n = len(source)
    while pos < n:
        lt = source.find("<", pos)
        if lt < 0:
            out.append(source[pos:])
            break
        if lt > pos:
            out.append(source[pos:lt])
        if source.startswith("<!--", lt):
            end = source.find("-->", lt + 4)
            # An unterminated comment hides the rest of the document from a browser too.
            pos = n if end < 0 else end + 3
            continue
        if source.startswith(("<!", "<?"), lt):
            # A declaration (<!DOCTYPE ...>, <![CDATA[) or processing instruction: not text.
            end = source.find(">", lt + 2)
            pos = n if end < 0 else end + 1
            continue
        m = _TAG.match(source, lt)
        if m is None:
            out.append("<")
            pos = lt + 1
            continue
        pos = m.end()
        closing, name, rest = m.group(1) == "/", m.group(2).lower(), m.group(3)
        if closing:
            if name == "a" and anchor is not None:
                _close_anchor(doc, anchor, out)
                anchor = None
            elif name == "form":
                in_form = False
            if name in _BLOCK_TAGS:
                out.append("\n")
            continue
        if name in _SCRIPT_END:
            pos = _skip_raw_text(source, pos, name, rest, doc)
            continue
        if name in _BLOCK_TAGS:
            out.append("\n")
        if name in ("a", "area", "form", "input", "meta", "img", "iframe", "frame", "base",
                    "link", "embed", "object", "button", "body", "td", "table", "video",
                    "source"):  # fmt: skip
            attrs = _attributes(rest)
            _record_urls(doc, name, attrs)
            if name == "a" and "href" in attrs:
                if anchor is not None:
                    _close_anchor(doc, anchor, out)
                anchor = (attrs["href"], len(out))
            elif name == "form" and len(doc.forms) < MAX_FORMS:
                doc.forms.append(Form(action=attrs.get("action", "")))
                in_form = True
            elif name == "input":
                _record_input(doc, attrs, in_form)
    if anchor is not None:
        _close_anchor(doc, anchor, out)
    doc.text = html.unescape("".join(out))
    return doc


def _skip_raw_text(source: str, pos: int, name: str, rest: str, doc: HtmlDoc) -> int:
    """Skip the body of script/style/title, which is not visible text."""
    end = _SCRIPT_END[name].search(source, pos)
    stop = len(source) if end is None else end.start()
    if name == "title":
        doc.title = html.unescape(source[pos:stop]).strip()[:MAX_ANCHOR_TEXT]
    elif name == "script":
        doc.scripts += 1
        src = _attributes(rest).get("src")
        if src and len(doc.urls) < MAX_LINKS:
            doc.urls.append(src)
        room = 64 * 1024 - len(doc.script_text)
        if room > 0:
            doc.script_text += source[pos:stop][:room] + "\n"
    return len(source) if end is None else end.end()


def _attributes(rest: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for m in _ATTR.finditer(rest):
        key = m.group(1).lower()
        value = m.group(2) or ""
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        attrs.setdefault(key, html.unescape(value).strip())
    return attrs


def _record_urls(doc: HtmlDoc, name: str, attrs: dict[str, str]) -> None:
    for key in _URL_ATTRS:
        value = attrs.get(key)
        if value and len(doc.urls) < MAX_LINKS:
            doc.urls.append(value)
    if name == "meta" and attrs.get("http-equiv", "").lower() == "refresh":
        m = _META_REFRESH_URL.search(attrs.get("content", ""))
        if m and len(doc.urls) < MAX_LINKS:
            doc.urls.append(m.group(1))


def _record_input(doc: HtmlDoc, attrs: dict[str, str], in_form: bool) -> None:
    is_password = attrs.get("type", "").lower() == "password"
    doc.password_inputs += is_password
    if in_form and doc.forms:
        doc.forms[-1].inputs += 1
        doc.forms[-1].password_inputs += is_password


def _close_anchor(doc: HtmlDoc, anchor: tuple[str, int], out: list[str]) -> None:
    href, start = anchor
    if len(doc.links) >= MAX_LINKS:
        return
    text = html.unescape("".join(out[start:])[:MAX_ANCHOR_TEXT])
    doc.links.append(Link(href=href, text=" ".join(text.split())))
