"""The spam model: the shipped classifier, the user's own learning, and sender reputation.

The shipped model (trained by tools/train_spam.py, weights in ``spam_model.json.gz``) is a
linear classifier over the features of :mod:`postvern.filters.features`, scored here in pure
Python. Each user adds a :class:`UserModel`: token counts of the mail they marked as ham or
spam and the reputation of senders they marked (addresses, domains, DKIM/SPF-verified
identities, IP /24 and /48 ranges, as Mox's junk filter keeps them). Its bytes are kept
inside the user's encrypted mailbox by the caller; this module only (de)serialises them.
"""

from __future__ import annotations

import array
import functools
import gzip
import importlib.resources
import json
import math
import operator
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from postvern.filters.content import Content, read_content
from postvern.filters.families import CONTENT_MAX_POINTS
from postvern.filters.features import language_of, spam_features
from postvern.filters.sender import SenderIdentity

T = TypeVar("T")

MODEL_RESOURCE = "spam_model.json.gz"
MODEL_FORMAT = "postvern-spam-4"

# The shipped model's log-odds are mapped to points in proportion: "don't know" (even odds)
# is 0 points, and the model's threshold (chosen at training on sources each model never
# saw) is its full voice, MODEL_POINTS_FULL. The model is one family of evidence
# (postvern.filters.families): its points stop below the junk score, so it never junks a
# message alone; another family (links, headers, sender, attachments) must agree. Its
# negative points are capped too: ham-looking text must not cancel a phishing rule or a
# bad attachment entirely.
JUNK_POINTS = 5.0
MODEL_POINTS_MIN = -3.0
MODEL_POINTS_FULL = 4.0
# ... and it speaks fully only when it is also at least this sure (odds of 4 to 1, a
# calibrated 80%, where SpamAssassin's BAYES_80 starts): the threshold chosen on unseen
# sources lies near even odds, where a two-line note the model half-recognises would
# otherwise earn three points for "55%". (Leave-one-source-out with the other families:
# at 9 to 1 the pooled ham junked is 0.006% and CSDMC spam caught 55%; at 4 to 1, 0.013%
# and 64%; at 7 to 3, 0.013% and 68%.)
FULL_VOICE_LOGIT = math.log(4.0)
# Past its full voice the model keeps saying how sure it is, in a narrow band below the
# junk score: half a point more at odds of 99 to 1 (a calibrated 99%, SpamAssassin's
# BAYES_99), at the same rate per unit of log-odds beyond, up to MODEL_POINTS_MAX. At 99%
# the weakest rule of another family (half a point) agrees enough to junk — a strong model
# and any second family — while at 80% a whole point is needed; and the score keeps
# ordering messages the model is sure of, so that a user's own Junk threshold below the
# default (delivery/userrules) trades ham for spam gradually instead of at one step. The
# model still never junks alone. (Leave-one-source-out: pooled ham junked unchanged at
# 0.06%; spam caught 49.5% -> 50.5%, phishing 83.8% -> 84.5%; spam caught at a 0.1% ham
# false-positive rate 50% -> 61%.)
STRONG_LOGIT = math.log(99.0)
STRONG_POINTS = 4.5
MODEL_POINTS_MAX = CONTENT_MAX_POINTS
_POINTS_PER_LOGIT_PAST_FULL = (STRONG_POINTS - MODEL_POINTS_FULL) / (
    STRONG_LOGIT - FULL_VOICE_LOGIT
)

# Even odds: the calibration is fitted with both classes weighed equally, so a message the
# model has no evidence about sits here, not at the training corpora's spam share.
NO_EVIDENCE_LOGIT = 0.0
# A message with fewer known features than this is out of what the model can judge: it
# abstains (even odds, no points) rather than guess. A two-line note, or a foreign message
# of which it can read a "20%!" and little else, is judged by the other families alone.
# (The SVM's rows are L2-normalised, so a handful of features weigh as much as a whole
# message; in the training corpora short mail is mostly stripped image spam, so the raw
# model is sure of itself there without reason.)
MIN_EVIDENCE_FEATURES = 10

# UserModel bounds. Counts of this many tokens and senders cover years of one user's
# marks; beyond them the least useful entries are dropped (bounded bytes in the mailbox).
MAX_USER_TOKENS = 50_000
MAX_USER_SENDERS = 10_000
# The serialised model is refused past this size (a corrupt or hostile blob).
MAX_USER_MODEL_BYTES = 8 * 1024 * 1024
# Evidence from the user's tokens: the most telling ones only (as Graham and SpamBayes
# do), each shrunk toward neutral until seen a few times, and the total capped so that a
# handful of marks cannot outvote the shipped model forever.
USER_TOKENS_CONSIDERED = 40
# A word whose log-odds lie nearer even than this is not counted: 0.4 to 0.6 in
# probability, SpamBayes' minimum_prob_strength of 0.1.
USER_MIN_TOKEN_LOGIT = math.log(0.6 / 0.4)
USER_MIN_TOKEN_MARKS = 2
# Pseudo-messages of prior per class: a token's rate in a class the user has marked fewer
# messages of than this stays near its rate in mail at large. (bench/filter_eval.py's
# learning curves, unseen spam still misfiled after 20 corrections, CSDMC and Enron6
# users: 18.9% and 18.5% with 10, 5.0% and 22.0% with 30.)
USER_PRIOR_MESSAGES = 30.0
# The background rate of a token the shipped model does not know (a name, a rare word):
# one message in a hundred, so that one mark of it is weak evidence.
UNKNOWN_TOKEN_RATE = 0.01
MAX_BACKGROUND_RATE = 0.9
USER_MAX_LOGIT = 8.0
# The marks of one kind speak with USER_MAX_LOGIT once there are this many of them (and in
# proportion before): a voice that grows with the corrections, one kind at a time.
USER_FULL_VOICE_MARKS = 10
USER_POINTS_PER_LOGIT = 1.0
# Sender reputation, in points for a sender whose every mark was spam (or negative for
# ham), reached after this many marks; kinds are weighed by how hard they are to forge.
REPUTATION_FULL_AFTER = 3
REPUTATION_POINTS = {
    "addr": 6.0,  # a From address, counted only when DMARC verified the From domain
    "dkim": 5.0,  # a DKIM-verified signing domain
    "spf": 4.0,  # an SPF-verified MAIL FROM domain
    "dom": 3.0,  # a verified From domain
    "ip24": 2.5,  # the client's IPv4 /24
    "ip48": 2.5,  # the client's IPv6 /48
}
REPUTATION_MAX_POINTS = 10.0

_USER_MAGIC = b"PVUM1"


class ModelError(Exception):
    """The shipped model file is missing or malformed."""


class UserModelError(ValueError):
    """Serialised user-model bytes are corrupt, too large, or of an unknown version."""


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class ModelScore:
    logit: float  # calibrated log-odds of spam
    probability: float
    points: float  # on the SpamAssassin-like scale (MODEL_POINTS_FULL at the threshold)
    known: int = 0  # features the model knew (fewer than MIN_EVIDENCE_FEATURES: abstains)


class ShippedModel:
    """The trained classifier: a linear SVM over tf-idf plus a naive Bayes term.

    Features are binary, so both parts reduce to sums over the features a message has:
    ``z = bias + Σa / sqrt(Σidf²) + nb_scale · Σnb`` (the SVM's tf-idf row is L2-normalised);
    ``platt_a · z + platt_b`` calibrates z to log-odds at equal class priors (fitted on
    scores of sources each model never saw), and :func:`weigh_evidence` sets even odds for
    messages with too little known text (the model abstains). The threshold, where the
    model's points reach MODEL_POINTS_FULL, is on that final logit.

    The model file lists the languages its training ham *and* spam were written in. A
    message in any other language (German when the ham was all English; Korean; Russian)
    is scored on the features that mean the same in every language only: the words the
    training ham used too (names, numbers, loanwords, symbols) and the link and form
    facts. Its other words were seen in spam alone, so they would only tell the model the
    language, not the spam: every German note would look like the German phishing.
    """

    def __init__(self, document: dict[str, object]) -> None:
        if document.get("format") != MODEL_FORMAT:
            raise ModelError("unknown spam model format")
        names = document.get("features")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelError("malformed spam model: features")
        svm = _column(document, "svm", len(names))
        idf = _column(document, "idf", len(names))
        nb = _column(document, "nb", len(names))
        shared = _column(document, "any_language", len(names))
        # Scoring is bound by memory, not by arithmetic: a message's few hundred features
        # are looked up at random in a table of a quarter of a million, and each look-up
        # that misses the CPU's caches costs more than the rest of its work. So the table
        # is laid out for the caches: features in order of document frequency (the
        # smallest idf first), their keys and index numbers allocated afresh in that
        # order, and the weight columns in the same order, so that the words most
        # messages share sit together in a few megabytes that stay cached between
        # messages, instead of spread over the whole table in the file's order.
        # (bench/filter_eval.py: 0.31 -> 0.2 ms of CPU per message to score; loading
        # takes about 0.4 s longer.)
        order = sorted(range(len(names)), key=idf.__getitem__)
        fresh_names = map(_fresh, _reordered(names, order))
        self._index = dict(zip(fresh_names, range(len(names)), strict=True))
        self._svm = array.array("d", _reordered(svm, order))
        self._idf2 = array.array("d", (v * v for v in _reordered(idf, order)))
        self._nb = array.array("d", _reordered(nb, order))
        self._shared = bytes(map(bool, _reordered(shared, order)))
        self.bias = _number(document, "bias")
        self.nb_scale = _number(document, "nb_scale")
        self.threshold_logit = _number(document, "threshold_logit")
        if self.threshold_logit <= NO_EVIDENCE_LOGIT:
            raise ModelError("spam model threshold must lie above even odds")
        self.platt_a, self.platt_b = _column(document, "platt", 2)
        languages = document.get("languages")
        if not isinstance(languages, list) or not all(isinstance(n, str) for n in languages):
            raise ModelError("malformed spam model: languages")
        self.languages = frozenset(languages)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShippedModel:
        try:
            document = json.loads(gzip.decompress(data))
        except (OSError, EOFError, ValueError) as exc:
            raise ModelError("spam model is not gzip'd JSON") from exc
        if not isinstance(document, dict):
            raise ModelError("malformed spam model")
        return cls(document)

    def background_rate(self, feature: str) -> float:
        """The share of training messages with *feature* (from its idf, which the training
        tool computes as ln((1 + n) / (1 + df)) + 1), or UNKNOWN_TOKEN_RATE."""
        i = self._index.get(feature)
        if i is None:
            return UNKNOWN_TOKEN_RATE
        rate = math.exp(1.0 - math.sqrt(self._idf2[i]))
        return max(UNKNOWN_TOKEN_RATE / 10, min(MAX_BACKGROUND_RATE, rate))

    def readable(self, features: Collection[str]) -> Collection[str]:
        """The features the model reads: all of them in a language it was trained on,
        else only those that mean the same in any language."""
        if language_of(features) in self.languages:
            return features
        index, shared = self._index, self._shared
        return [f for f in features if (i := index.get(f)) is not None and shared[i]]

    def raw_score(self, features: Iterable[str]) -> tuple[float, int]:
        """The uncalibrated decision value *z*, and how many features the model knows."""
        found = [i for i in map(self._index.get, features) if i is not None]
        # Summed in feature order, as tools/train_spam.py sums them: same input, same z.
        # (One itemgetter gathers a column's values in C; it returns a tuple for two or
        # more indices only.)
        if len(found) > 1:
            column = operator.itemgetter(*found)
            num = sum(column(self._svm), 0.0)
            norm = sum(column(self._idf2), 0.0)
            naive = sum(column(self._nb), 0.0)
        else:
            num = sum(map(self._svm.__getitem__, found), 0.0)
            norm = sum(map(self._idf2.__getitem__, found), 0.0)
            naive = sum(map(self._nb.__getitem__, found), 0.0)
        z = self.bias + (num / math.sqrt(norm) if norm else 0.0) + self.nb_scale * naive
        return z, len(found)

    def logit(self, features: Collection[str]) -> float:
        """The model's log-odds of spam (the training tool reproduces this number)."""
        return self.judge(features)[0]

    def judge(self, features: Collection[str]) -> tuple[float, int]:
        """The model's log-odds of spam and how many features it knew."""
        z, known = self.raw_score(self.readable(features))
        return weigh_evidence(self.platt_a * z + self.platt_b, known, self.threshold_logit), known

    def score(self, features: Collection[str], extra_logit: float = 0.0) -> ModelScore:
        logit, known = self.judge(features)
        logit += extra_logit
        return ModelScore(logit, sigmoid(logit), self.points(logit), known)

    def points(self, logit: float) -> float:
        return logit_points(logit, self.threshold_logit)


def logit_points(logit: float, threshold_logit: float) -> float:
    """The points of a model *logit* for a model whose threshold is *threshold_logit*:
    in proportion to the log-odds up to MODEL_POINTS_FULL, reached at the threshold or
    FULL_VOICE_LOGIT, whichever is higher; past it, rising slowly toward MODEL_POINTS_MAX
    (STRONG_POINTS at STRONG_LOGIT when the threshold is FULL_VOICE_LOGIT)."""
    full = max(threshold_logit, FULL_VOICE_LOGIT)
    if logit > full:
        past = MODEL_POINTS_FULL + _POINTS_PER_LOGIT_PAST_FULL * (logit - full)
        return min(MODEL_POINTS_MAX, past)
    share = (logit - NO_EVIDENCE_LOGIT) / (full - NO_EVIDENCE_LOGIT)
    return max(MODEL_POINTS_MIN, MODEL_POINTS_FULL * share)


def weigh_evidence(logit: float, known: int, threshold_logit: float) -> float:
    """*logit*, or even odds (the model abstains) when fewer than MIN_EVIDENCE_FEATURES
    are known. (*threshold_logit* is kept for the training tool's calls.)"""
    del threshold_logit
    return logit if known >= MIN_EVIDENCE_FEATURES else NO_EVIDENCE_LOGIT


def _voice(marks: int) -> float:
    """The most log-odds the user's marks of one kind may add: USER_MAX_LOGIT once the
    user has marked USER_FULL_VOICE_MARKS messages of the kind, in proportion before."""
    return USER_MAX_LOGIT * min(1.0, marks / USER_FULL_VOICE_MARKS)


def user_points(token_logit: float) -> float:
    """The points of the log-odds a user's own marks add (postvern.filters.families bounds
    them): one point per unit, so that USER_MAX_LOGIT, a user who has marked the kind of
    mail many times, outweighs the shipped model's most negative opinion by the junk score."""
    return USER_POINTS_PER_LOGIT * token_logit


def abstains(known: int) -> bool:
    """Whether the model gives no opinion on a message with *known* known features."""
    return known < MIN_EVIDENCE_FEATURES


def _column(document: dict[str, object], key: str, length: int) -> list[float]:
    values = document.get(key)
    if not isinstance(values, list) or len(values) != length:
        raise ModelError(f"malformed spam model: {key}")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"malformed spam model: {key}") from exc


def _reordered(values: Sequence[T], order: Sequence[int]) -> Sequence[T]:
    """``values[i]`` for each ``i`` of *order*, gathered in C (one itemgetter)."""
    if len(order) < 2:  # itemgetter returns a tuple for two or more indices only
        return [values[i] for i in order]
    result: tuple[T, ...] = operator.itemgetter(*order)(values)
    return result


def _fresh(name: str) -> str:
    """A new copy of *name*, allocated now (next to the copies made before it)."""
    return name.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


def _number(document: dict[str, object], key: str) -> float:
    value = document.get(key)
    if not isinstance(value, int | float):
        raise ModelError(f"malformed spam model: {key}")
    return float(value)


@functools.cache
def shipped_model() -> ShippedModel:
    """The model shipped with the package, loaded once per process."""
    try:
        data = importlib.resources.files("postvern.filters").joinpath(MODEL_RESOURCE).read_bytes()
    except OSError as exc:
        raise ModelError("spam model file is missing") from exc
    return ShippedModel.from_bytes(data)


@dataclass(frozen=True, slots=True)
class UserEvidence:
    token_logit: float
    reputation_points: float
    reputation_reason: str  # "" when no mark applied


class UserModel:
    """One user's marks: token counts of their ham and spam, and sender reputation.

    Serialise with :meth:`to_bytes`; the result is bounded (see ``MAX_USER_*``).
    """

    def __init__(self) -> None:
        self.ham_messages = 0
        self.spam_messages = 0
        self.tokens: dict[str, list[int]] = {}  # token -> [ham count, spam count]
        self.senders: dict[str, list[int]] = {}  # "kind:key" -> [ham count, spam count]

    # -- learning -----------------------------------------------------------------------

    def learn(self, raw: bytes, is_spam: bool, sender: SenderIdentity | None = None) -> None:
        """Count *raw* as the user's ham or spam (call again with the other label to move it
        only after :meth:`unlearn`)."""
        self._count(read_content(raw), is_spam, sender, +1)

    def unlearn(self, raw: bytes, is_spam: bool, sender: SenderIdentity | None = None) -> None:
        """Undo an earlier :meth:`learn` with the same arguments."""
        self._count(read_content(raw), is_spam, sender, -1)

    def _count(
        self, content: Content, is_spam: bool, sender: SenderIdentity | None, step: int
    ) -> None:
        column = 1 if is_spam else 0
        if is_spam:
            self.spam_messages = max(0, self.spam_messages + step)
        else:
            self.ham_messages = max(0, self.ham_messages + step)
        for token in user_tokens(content):
            _bump(self.tokens, token, column, step)
        identity = sender or SenderIdentity(from_addr=content.message.from_addr)
        for kind, key in identity.keys():
            _bump(self.senders, f"{kind}:{key}", column, step)
        _prune(self.tokens, MAX_USER_TOKENS)
        _prune(self.senders, MAX_USER_SENDERS)

    # -- scoring ------------------------------------------------------------------------

    def evidence(self, content: Content, sender: SenderIdentity | None) -> UserEvidence:
        token_logit = self.token_logit(user_tokens(content))
        points, reason = self.reputation(sender) if sender else (0.0, "")
        return UserEvidence(token_logit, points, reason)

    def token_logit(self, tokens: Iterable[str]) -> float:
        """Log-odds the user's own marks add: per token, the log ratio of its rate in the
        user's spam to its rate in their ham, each rate estimated with USER_PRIOR_MESSAGES
        pseudo-messages at the token's rate in mail at large (the shipped model's document
        frequency). A class with few marks stays near that background, so neither a
        one-sided history (only spam marked) nor a handful of ham marks makes every shared
        word evidence; the most telling tokens are summed, the total capped."""
        ham_n, spam_n = self.ham_messages, self.spam_messages
        if ham_n + spam_n == 0:
            return 0.0
        model = shipped_model()
        prior = USER_PRIOR_MESSAGES
        scored = []
        for token in tokens:
            counts = self.tokens.get(token)
            if counts is None:
                continue
            ham, spam = counts
            background = prior * model.background_rate(token)
            spam_rate = (spam + background) / (spam_n + prior)
            ham_rate = (ham + background) / (ham_n + prior)
            logit = math.log(spam_rate / ham_rate)
            # A word is evidence for a kind only when the user marked mail of that kind
            # with it more than once: a word the user's spam lacks is not, by that, a
            # word of their ham (against a history of spam marks, every common word
            # would be), and a rare word of one marked message meets others by chance
            # (Graham counts a word from five occurrences). And only a telling word: near
            # even odds a word says nothing, and forty such add up to a verdict
            # (SpamBayes' minimum_prob_strength, 0.1).
            seen = spam if logit > 0 else ham
            if seen >= USER_MIN_TOKEN_MARKS and abs(logit) >= USER_MIN_TOKEN_LOGIT:
                scored.append(logit)
        scored.sort(key=abs, reverse=True)
        total = sum(scored[:USER_TOKENS_CONSIDERED])
        # Each kind's marks bound the evidence for that kind: three ham marks cannot
        # rescue what forty spam marks junk. (Unbounded, the words a growing spam history
        # lacks became ever stronger "ham" evidence for a user who had marked almost no
        # ham, and more corrections misfiled more spam.)
        return max(-_voice(ham_n), min(_voice(spam_n), total))

    def reputation(self, sender: SenderIdentity) -> tuple[float, str]:
        """Points from the user's marks on this sender, and a reason naming the kind."""
        total = 0.0
        reasons = []
        for kind, key in sender.keys():
            counts = self.senders.get(f"{kind}:{key}")
            if not counts or sum(counts) == 0:
                continue
            ham, spam = counts
            seen = ham + spam
            share = (spam - ham) / seen
            confidence = min(1.0, seen / REPUTATION_FULL_AFTER)
            points = REPUTATION_POINTS[kind] * share * confidence
            total += points
            reasons.append(f"{kind} {'spam' if share > 0 else 'ham'} {seen}x")
        total = max(-REPUTATION_MAX_POINTS, min(REPUTATION_MAX_POINTS, total))
        return total, ", ".join(reasons)

    # -- serialisation ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        document = {
            "ham": self.ham_messages,
            "spam": self.spam_messages,
            "tokens": self.tokens,
            "senders": self.senders,
        }
        data = json.dumps(document, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return _USER_MAGIC + zlib.compress(data.encode(), 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> UserModel:
        if len(data) > MAX_USER_MODEL_BYTES or not data.startswith(_USER_MAGIC):
            raise UserModelError("not a postvern user model")
        try:
            inflater = zlib.decompressobj()
            text = inflater.decompress(data[len(_USER_MAGIC) :], 8 * MAX_USER_MODEL_BYTES)
            if inflater.unconsumed_tail:
                raise UserModelError("user model expands past its limit")
            if not inflater.eof or inflater.unused_data:
                raise UserModelError("user model is truncated or has trailing data")
            document = json.loads(text)
            model = cls()
            model.ham_messages = _count_value(document["ham"])
            model.spam_messages = _count_value(document["spam"])
            model.tokens = _count_table(document["tokens"], MAX_USER_TOKENS)
            model.senders = _count_table(document["senders"], MAX_USER_SENDERS)
        except UserModelError:
            raise
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            raise UserModelError("corrupt user model") from exc
        return model


def user_tokens(content: Content) -> set[str]:
    """The features a user model counts: the shipped ones without word pairs (size)."""
    return {f for f in spam_features(content) if " " not in f}


def _bump(table: dict[str, list[int]], key: str, column: int, step: int) -> None:
    counts = table.get(key)
    if counts is None:
        if step < 0:
            return
        counts = table[key] = [0, 0]
    counts[column] = max(0, counts[column] + step)
    if counts[0] == 0 and counts[1] == 0:
        del table[key]


def _prune(table: dict[str, list[int]], limit: int) -> None:
    """Past *limit*, keep the 90% seen most often (ties: the newest; dicts keep order).

    Pruning below the limit leaves room, so the sort runs once per many learns.
    """
    if len(table) <= limit:
        return
    keep = limit * 9 // 10
    ranked = sorted(enumerate(table.items()), key=lambda e: (e[1][1][0] + e[1][1][1], e[0]))
    for _, (key, _counts) in ranked[: len(table) - keep]:
        del table[key]


def _count_value(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserModelError("corrupt user model")
    return value


def _count_table(value: object, limit: int) -> dict[str, list[int]]:
    if not isinstance(value, dict) or len(value) > limit:
        raise UserModelError("corrupt user model")
    table: dict[str, list[int]] = {}
    for key, counts in value.items():
        if not isinstance(counts, list) or len(counts) != 2:
            raise UserModelError("corrupt user model")
        table[str(key)] = [_count_value(counts[0]), _count_value(counts[1])]
    return table
