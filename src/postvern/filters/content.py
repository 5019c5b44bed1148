"""One reading of a message shared by every filter: its parts, its HTML, its URLs.

The spam model, the phishing rules and the attachment checks all start from the same
decoded message; reading it once keeps the cost of a scan to one parse.
"""

from __future__ import annotations

from dataclasses import dataclass

from postvern.filters.extract import Extracted, extract
from postvern.filters.htmlscan import HtmlDoc, scan_html
from postvern.filters.urls import Url, collect_urls


@dataclass(slots=True)
class Content:
    message: Extracted
    html: HtmlDoc
    urls: list[Url]

    @property
    def visible_text(self) -> str:
        """What a reader sees: the text parts, then the text of the HTML parts."""
        if not self.html.text:
            return self.message.text
        return self.message.text + "\n" + self.html.text


def read_content(raw: bytes) -> Content:
    """Parse *raw* once for all filters; never raises (see :func:`extract`)."""
    message = extract(raw)
    doc = scan_html(message.html) if message.html else HtmlDoc()
    urls = collect_urls(message.text, doc.urls, doc.text)
    return Content(message=message, html=doc, urls=urls)
