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
    # The HTML of the message a report returns (None for other mail), read once here.
    returned_html: HtmlDoc | None = None
    _scan_text: str | None = None
    # The spam model's features (postvern.filters.features.spam_features), made once: the
    # shipped model and the user's own model both read them.
    features: set[str] | None = None

    @property
    def scan_text(self) -> str:
        """The sender's name, the judged subject and text in lower case, for the rules
        that look for words and phrases (postvern.filters.body): made once per message,
        on first use. (Spam names its goods in the display name too: "Best Pills Shop".)"""
        if self._scan_text is None:
            name = self.message.from_name
            text = f"{name}\n{self.judged_subject}\n{self.judged_text}"
            self._scan_text = text.lower()
        return self._scan_text

    @property
    def visible_text(self) -> str:
        """What a reader sees: the text parts, then the text of the HTML parts."""
        return _joined(self.message.text, self.html.text)


def read_content(raw: bytes) -> Content:
    """Parse *raw* once for all filters; never raises (see :func:`extract`)."""
    message = extract(raw)
    doc = scan_html(message.html) if message.html else HtmlDoc()
    urls = collect_urls(message.text, doc.urls, doc.all_text)
    content = Content(message=message, html=doc, urls=urls)
    if message.report_type:
        returned = message.returned or Extracted()
        returned_doc = scan_html(returned.html) if returned.html else HtmlDoc()
        content.returned_html = returned_doc
        content.judged_subject = returned.subject
        content.judged_text = _joined(returned.text, returned_doc.all_text)
    else:
        content.judged_subject = message.subject
        content.judged_text = _joined(message.text, doc.all_text)
    return content


def _joined(text: str, html_text: str) -> str:
    """The text parts, then the text of the HTML parts."""
    return f"{text}\n{html_text}" if html_text else text
