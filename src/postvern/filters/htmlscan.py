"""A linear-time HTML reader for filtering: visible text, links with their text, and forms.

Spam and phishing need what a reader *sees* (text, the words of a link) next to what a
click *does* (the href, a form's action), not a DOM. A single regular-expression pass finds
tags; it never backtracks across a tag boundary, so hostile markup costs linear time.

Text an element hides by its own attributes (``hidden``, or an inline style of
``display:none``, ``visibility:hidden``, a zero font size or opacity) is not visible text:
spam hides words there to poison statistical filters, and phishing hides letters inside
the words it shows ("Micro<span style="font-size:0">x</span>soft", the ZeroFont trick) so
that filters do not read the brand a person reads. Such text is kept apart, and the places
where it splits a visible word are counted. Style sheets are not applied: hiding by a class
is left to the reader of the model's features, as the text is.
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
# An inline style or attribute that hides the element (CSS 2.1 §9.2.4 display, §11.2
# visibility; a font size or opacity of zero renders nothing). A cheap test of the raw
# attribute text comes first; the attributes are parsed only when it matches.
_MAY_HIDE = re.compile(r"(?i)hidden|none|size|opacity")
_HIDING_STYLE = re.compile(
    r"(?i)(?:^|;)\s*(?:display\s*:\s*none|visibility\s*:\s*hidden|"
    r"font-size\s*:\s*0*(?:\.0*)?(?:px|pt|em|rem|%)?|opacity\s*:\s*0*(?:\.0*)?)\s*(?:!important\s*)?(?:;|$)"
)
# Elements with no content (HTML §13.1.2): they open nothing that a close tag would end.
_VOID_TAGS = frozenset("area base br col embed hr img input link meta source track wbr".split())
# Elements tracked inside one hidden element; deeper ones are not told apart.
MAX_OPEN_HIDDEN = 256
# Hidden text kept per message: enough to judge it, bounded like everything else.
MAX_HIDDEN_TEXT = 64 * 1024
_META_REFRESH_URL = re.compile(r"url\s*=\s*['\"]?([^'\";\s]+)", re.I)
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt fieldset figcaption figure footer "
    "form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tbody td tfoot th "
    "thead tr ul option button".split()
)
# Elements read for their attributes (URLs, forms, inputs).
_URL_TAGS = frozenset(
    "a area form input meta img iframe frame base link embed object button body td table "
    "video source".split()
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
    hidden_text: str = ""  # text of hidden elements, bounded (MAX_HIDDEN_TEXT)
    hidden_in_words: int = 0  # hidden elements with a letter of visible text on each side

    @property
    def all_text(self) -> str:
        """The text shown, then the text hidden."""
        return f"{self.text}\n{self.hidden_text}" if self.hidden_text else self.text


def scan_html(source: str) -> HtmlDoc:
    """Read *source* (already bounded by the caller) into an :class:`HtmlDoc`."""
    doc = HtmlDoc()
    out: list[str] = []
    anchor: tuple[str, int] | None = None  # (href, index into out where its text starts)
    in_form = False
    hiding = _Hiding()
    pos = 0
    n = len(source)
    while pos < n:
        lt = source.find("<", pos)
        if lt < 0:
            hiding.text(source[pos:], out)
            break
        if lt > pos:
            hiding.text(source[pos:lt], out)
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
        if name in _SCRIPT_END and not closing:
            pos = _skip_raw_text(source, pos, name, rest, doc)
            continue
        if hiding.tag(name, closing, rest, out):
            if not closing and name in _URL_TAGS:
                _record_urls(doc, name, _attributes(rest))  # hidden, but still fetched
            continue
        if closing:
            if name == "a" and anchor is not None:
                _close_anchor(doc, anchor, out)
                anchor = None
            elif name == "form":
                in_form = False
            if name in _BLOCK_TAGS:
                out.append("\n")
            continue
        if name in _BLOCK_TAGS:
            out.append("\n")
        if name in _URL_TAGS:
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
    doc.hidden_text = html.unescape("".join(hiding.hidden))[:MAX_HIDDEN_TEXT]
    doc.hidden_in_words = hiding.in_words
    return doc


class _Hiding:
    """Which text is hidden: from the start tag of an element that hides itself to the end
    tag that ends it, text goes aside. The elements opened inside are tracked the way an
    HTML parser closes them (an end tag closes the innermost open element of its name and
    everything opened after it; an end tag for none of them belongs to an ancestor, which
    ends the hidden element too), so mis-nested markup cannot hide from us text that a
    browser shows. Tags inside a hidden element are not read for links or forms: a person
    cannot click them."""

    def __init__(self) -> None:
        self.hidden: list[str] = []
        self.size = 0
        self.in_words = 0
        self._open: list[str] = []  # the hiding element, then the elements opened inside
        self._letter_before = False  # visible text before the element ended in a letter
        self._pending = False  # a hidden element closed after a letter: is one next?

    def text(self, chunk: str, out: list[str]) -> None:
        if self._open:
            if self.size < MAX_HIDDEN_TEXT:
                self.hidden.append(chunk)
                self.size += len(chunk)
            return
        if self._pending and chunk:
            self._pending = False
            if chunk[0].isalpha():
                self.in_words += 1
        out.append(chunk)

    def tag(self, name: str, closing: bool, rest: str, out: list[str]) -> bool:
        """Account for a tag; True when it lies inside a hidden element (and is done)."""
        if self._open:
            return self._inside(name, closing)
        if closing or name in _VOID_TAGS or not _MAY_HIDE.search(rest) or not _hides(rest):
            self._pending = False
            return False
        self._open = [name]
        last = next((chunk for chunk in reversed(out) if chunk), "")
        self._letter_before = bool(last) and last[-1].isalpha()
        return True

    def _inside(self, name: str, closing: bool) -> bool:
        if not closing:
            if name not in _VOID_TAGS and len(self._open) < MAX_OPEN_HIDDEN:
                self._open.append(name)
            return True
        if name not in self._open:
            self._open = []  # an ancestor's end tag: the hidden element ends with it
            return False
        del self._open[len(self._open) - 1 - self._open[::-1].index(name) :]
        if not self._open:
            self._pending = self._letter_before
        return True


def _hides(rest: str) -> bool:
    attrs = _attributes(rest)
    return "hidden" in attrs or _HIDING_STYLE.search(attrs.get("style", "")) is not None


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
