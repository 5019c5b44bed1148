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
    # The words the content model judges: the message's own, except for a report (a bounce,
    # a read receipt), whose words are the form every MTA writes; there it is the returned
    # message's words, so backscatter of spam reads as spam and a bounce of the user's own
    # mail as that mail. Text the HTML hides is judged too, after the visible text: what a
    # sender hides is evidence about the sender (in the corpora, leaving it out lost two
    # held-out phishing messages), and kept apart it cannot glue itself into the words a
    # reader sees.
    judged_subject: str = ""
    judged_text: str = ""

    @property
    def visible_text(self) -> str:
        """What a reader sees: the text parts, then the text of the HTML parts."""
        return _visible(self.message, self.html)


def read_content(raw: bytes) -> Content:
    """Parse *raw* once for all filters; never raises (see :func:`extract`)."""
    message = extract(raw)
    doc = scan_html(message.html) if message.html else HtmlDoc()
    urls = collect_urls(message.text, doc.urls, _html_text(doc))
    content = Content(message=message, html=doc, urls=urls)
    if message.report_type:
        returned = message.returned or Extracted()
        returned_doc = scan_html(returned.html) if returned.html else HtmlDoc()
        content.judged_subject = returned.subject
        content.judged_text = _judged(returned, returned_doc)
    else:
        content.judged_subject = message.subject
        content.judged_text = _judged(message, doc)
    return content


def _judged(message: Extracted, doc: HtmlDoc) -> str:
    visible = _visible(message, doc)
    return visible + "\n" + doc.hidden_text if doc.hidden_text else visible


def _html_text(doc: HtmlDoc) -> str:
    """All text of the HTML, shown or hidden (for URLs written out as text)."""
    return doc.text + "\n" + doc.hidden_text if doc.hidden_text else doc.text


def _visible(message: Extracted, doc: HtmlDoc) -> str:
    if not doc.text:
        return message.text
    return message.text + "\n" + doc.text
