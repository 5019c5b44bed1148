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
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from postvern.filters.content import read_content
from postvern.filters.features import spam_features
from postvern.filters.sender import identity_from_message
from postvern.filters.spam import UserModel, UserModelError, shipped_model
from postvern.filters.verdict import HEADER_NAME
from postvern.store.mailbox import INBOX, Change, Mailbox

log = logging.getLogger(__name__)

MODEL_BLOB = "filter-model"
LEARNED_BLOB = "filter-learned"
JUNK, TRASH = "\\Junk", "\\Trash"
SPAM_KEYWORD, HAM_KEYWORD = "$junk", "$notjunk"
# Remember which messages were learned, to learn each once; the oldest are forgotten first.
MAX_LEARNED_RECORDS = 20_000
_SCORE = re.compile(rb"score=(-?\d+(?:\.\d+)?)")


def personal_points(raw: bytes, model: UserModel, authserv_id: str) -> float:
    """What the user's own marks add to a message's score (tokens and sender reputation)."""
    content = read_content(raw)
    sender = identity_from_message(raw, authserv_id)
    evidence = model.evidence(content, sender)
    points = evidence.reputation_points
    if evidence.token_logit:
        shipped = shipped_model()
        features = spam_features(content)
        points += (
            shipped.score(features, extra_logit=evidence.token_logit).points
            - shipped.score(features).points
        )
    return points


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
            if use == JUNK and source != JUNK:
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
        if model.ham_messages + model.spam_messages == 0 and not model.senders:
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
            is_junk = base + personal_points(raw, model, self.authserv_id) >= self.junk_score
            if is_junk and folder_id == inbox.id:
                to_junk.append(uid)
            elif not is_junk and folder_id == junk.id:
                to_inbox.append(uid)
        if to_junk:
            self.box.move(inbox.id, to_junk, junk.id)
        if to_inbox:
            self.box.move(junk.id, to_inbox, inbox.id)
        return len(to_junk) + len(to_inbox)
