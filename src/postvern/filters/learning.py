"""Per-user learning: the user's own Junk/Not-Junk actions train their model, and mail that
arrived while they were away is re-filed with it at the next unlock.

The model (:class:`~postvern.filters.spam.UserModel`) lives inside the user's encrypted
mailbox, so the server can use it only while the mailbox is open. The learner listens to
the mailbox's change feed and learns from what the user did, never from deliveries:

* a message moved or copied into the Junk folder, or appended there, is spam;
* a message moved out of Junk into any folder but Trash is ham;
* the keywords ``$Junk`` and ``$NotJunk`` (RFC 5788 registry; set by Thunderbird, Apple
  Mail and others) mark spam and ham.

A message is learned once per label; flipping the label unlearns the old one first.

Messages the user puts in the Sent folder (their mail client's copy of what it sent) teach
the wanted-mail evidence (:class:`~postvern.filters.wanted.Correspondence`): whom the user
writes to and which Message-IDs are theirs, so that replies and correspondents are not
junked on content alone. It is kept in the mailbox too, and applied with the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from postvern.filters.content import read_content
from postvern.filters.families import caps
from postvern.filters.sender import identity_from_message
from postvern.filters.spam import UserModel, UserModelError, user_points
from postvern.filters.verdict import HEADER_NAME, Hit
from postvern.filters.wanted import (
    Authenticated,
    Correspondence,
    CorrespondenceError,
    check_wanted,
)
from postvern.store.mailbox import INBOX, Change, Mailbox

log = logging.getLogger(__name__)

MODEL_BLOB = "filter-model"
LEARNED_BLOB = "filter-learned"
CORRESPONDENCE_BLOB = "filter-correspondence"
JUNK, TRASH, SENT = "\\Junk", "\\Trash", "\\Sent"
SPAM_KEYWORD, HAM_KEYWORD = "$junk", "$notjunk"
# Remember which messages were learned, to learn each once; the oldest are forgotten first.
MAX_LEARNED_RECORDS = 20_000
_SCORE = re.compile(rb"score=(-?\d+(?:\.\d+)?)")


def personal_points(
    raw: bytes, model: UserModel, authserv_id: str, correspondence: Correspondence | None = None
) -> float:
    """What the user's own marks and correspondence add to a message's score: each family
    (their word marks, sender reputation, wanted-mail evidence) within its bounds."""
    content = read_content(raw)
    sender = identity_from_message(raw, authserv_id)
    evidence = model.evidence(content, sender)
    hits: list[Hit] = []
    if evidence.token_logit:
        hits.append(Hit("USER_LEARNED", user_points(evidence.token_logit)))
    if evidence.reputation_points:
        hits.append(Hit("SENDER_REPUTATION", evidence.reputation_points))
    if correspondence:
        # Replies and correspondents only: a list's own credit was given at delivery.
        auth = Authenticated(from_verified=sender.from_verified)
        hits += check_wanted(content, auth, correspondence)
    hits += caps(hits)
    return sum(h.points for h in hits)


def recorded_score(raw: bytes) -> float | None:
    """The score our MX wrote into the message's verdict field, if any."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    marker = HEADER_NAME.encode() + b":"
    start = head.find(marker)
    if start < 0:
        return None
    match = _SCORE.search(head, start)
    return float(match.group(1)) if match else None


class JunkLearner:
    """One per open mailbox; runs in the store's worker threads."""

    def __init__(self, box: Mailbox, authserv_id: str, junk_score: float) -> None:
        self.box = box
        self.authserv_id = authserv_id
        self.junk_score = junk_score

    # -- the model inside the mailbox --------------------------------------------------

    def load(self) -> UserModel:
        data = self.box.get_blob(MODEL_BLOB)
        if data is None:
            return UserModel()
        try:
            return UserModel.from_bytes(data)
        except UserModelError:
            log.warning("user filter model unreadable; starting afresh")
            return UserModel()

    def load_correspondence(self) -> Correspondence:
        data = self.box.get_blob(CORRESPONDENCE_BLOB)
        if data is None:
            return Correspondence()
        try:
            return Correspondence.from_bytes(data)
        except CorrespondenceError:
            log.warning("correspondence record unreadable; starting afresh")
            return Correspondence()

    def learn_sent(self, folder_id: int, uids: tuple[int, ...] | list[int]) -> None:
        """Record whom the user wrote to and which Message-IDs they sent."""
        correspondence = self.load_correspondence()
        for uid in uids:
            correspondence.learn_sent(self.box.raw(folder_id, uid))
        self.box.set_blob(CORRESPONDENCE_BLOB, correspondence.to_bytes())

    def _learned(self) -> dict[str, str]:
        data = self.box.get_blob(LEARNED_BLOB)
        return json.loads(data) if data else {}

    # -- learning from the user's actions ----------------------------------------------

    def on_change(self, change: Change) -> None:
        if change.origin is None:
            return  # a delivery or our own re-filing, not the user's judgement
        try:
            self._learn_from(change)
        except Exception:
            log.exception("learning from a junk action failed")

    def _learn_from(self, change: Change) -> None:
        if change.kind == "append":
            use = self._use(change.folder_id)
            source = self._use(change.source) if change.source is not None else None
            if use == SENT:
                self.learn_sent(change.folder_id, change.uids)
            elif use == JUNK and source != JUNK:
                self.learn(change.folder_id, change.uids, is_spam=True)
            elif source == JUNK and use not in (JUNK, TRASH):
                self.learn(change.folder_id, change.uids, is_spam=False)
        elif change.kind == "flags":
            spam, ham = [], []
            for info in self.box.messages(change.folder_id, change.uids):
                lowered = {f.lower() for f in info.flags}
                if SPAM_KEYWORD in lowered:
                    spam.append(info.uid)
                elif HAM_KEYWORD in lowered:
                    ham.append(info.uid)
            if spam:
                self.learn(change.folder_id, spam, is_spam=True)
            if ham:
                self.learn(change.folder_id, ham, is_spam=False)

    def _use(self, folder_id: int | None) -> str | None:
        if folder_id is None:
            return None
        return self.box.folder_by_id(folder_id).special_use

    def learn(self, folder_id: int, uids: tuple[int, ...] | list[int], *, is_spam: bool) -> int:
        """Train on the given messages; returns how many changed the model."""
        model = self.load()
        learned = self._learned()
        label = "spam" if is_spam else "ham"
        changed = 0
        for uid in uids:
            raw = self.box.raw(folder_id, uid)
            key = hashlib.sha256(raw).hexdigest()[:24]
            previous = learned.get(key)
            if previous == label:
                continue
            sender = identity_from_message(raw, self.authserv_id)
            if previous is not None:
                model.unlearn(raw, previous == "spam", sender)
            model.learn(raw, is_spam, sender)
            learned.pop(key, None)
            learned[key] = label
            changed += 1
        if changed:
            while len(learned) > MAX_LEARNED_RECORDS:
                learned.pop(next(iter(learned)))
            self.box.set_blob(MODEL_BLOB, model.to_bytes())
            self.box.set_blob(LEARNED_BLOB, json.dumps(learned).encode())
        return changed

    # -- re-filing what arrived while the mailbox was locked ----------------------------

    def refile(self, items: list[tuple[int, int]]) -> int:
        """Move imported messages between INBOX and Junk by the user's model; returns moves."""
        model = self.load()
        correspondence = self.load_correspondence()
        learned = model.ham_messages + model.spam_messages or model.senders
        if not learned and not correspondence:
            return 0  # nothing learned yet: the MX verdict stands
        junk = self.box.folder_by_use(JUNK)
        inbox = self.box.folder(INBOX)
        if junk is None:
            return 0
        to_junk: list[int] = []
        to_inbox: list[int] = []
        for folder_id, uid in items:
            if folder_id not in (inbox.id, junk.id):
                continue
            raw = self.box.raw(folder_id, uid)
            base = recorded_score(raw)
            if base is None:
                continue
            personal = personal_points(raw, model, self.authserv_id, correspondence)
            is_junk = base + personal >= self.junk_score
            if is_junk and folder_id == inbox.id:
                to_junk.append(uid)
            elif not is_junk and folder_id == junk.id:
                to_inbox.append(uid)
        if to_junk:
            self.box.move(inbox.id, to_junk, junk.id)
        if to_inbox:
            self.box.move(junk.id, to_inbox, inbox.id)
        return len(to_junk) + len(to_inbox)
