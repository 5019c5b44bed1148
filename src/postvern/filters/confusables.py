"""Skeletons of domain names, so that look-alikes compare equal (after Unicode TR39 §4).

A homograph attack registers a name that *looks* like another: Cyrillic "раypal", digit
"paypa1", "rn" for "m". TR39 defines a skeleton (fold every character to a prototype it is
confusable with) and calls two strings confusable when their skeletons are equal. This is a
bounded subset of its table: the Latin look-alikes in Cyrillic, Greek, Armenian and
Latin-extended blocks that are used in domain names, plus ASCII digit and letter-pair
tricks; compatibility forms (fullwidth, mathematical letters) fold through NFKC first.
"""

from __future__ import annotations

import functools
import unicodedata

# Single characters and their Latin prototype (TR39 confusables.txt, restricted to the
# lower-case forms that IDNA allows in a domain label).
_CHAR_PROTOTYPE = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i",
    "ј": "j", "к": "k", "ӏ": "l", "м": "m", "п": "n", "о": "o", "р": "p", "ԛ": "q", "г": "r",
    "ѕ": "s", "т": "t", "ц": "u", "ѵ": "v", "ԝ": "w", "х": "x", "у": "y", "ү": "y", "з": "3",
    "ь": "b", "ы": "bl", "ꙇ": "i", "ԍ": "g", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ϲ": "c", "δ": "d", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ϳ": "j",
    # Armenian
    "ս": "u", "ո": "n", "օ": "o", "հ": "h", "ց": "g", "զ": "q", "ա": "w",
    # Latin extended and IPA
    "ı": "i", "ȷ": "j", "ł": "l", "ƚ": "l", "ɩ": "i", "ɑ": "a", "ɒ": "a", "ƅ": "b", "ɓ": "b",
    "ɗ": "d", "ɛ": "e", "ƒ": "f", "ɦ": "h", "ɪ": "i", "ʟ": "l", "ɱ": "m", "ɴ": "n",
    "ɵ": "o", "ø": "o", "ʀ": "r", "ʂ": "s", "ʋ": "v", "ʏ": "y", "ʐ": "z", "ᴄ": "c", "ᴏ": "o",
    "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ß": "b", "þ": "p", "đ": "d", "ħ": "h", "ŀ": "l",
    # ASCII digits that read as letters in most fonts
    "0": "o", "1": "l", "|": "l",
}  # fmt: skip
# Letter sequences that render like one letter (TR39 maps "m" to "rn"; here the other way,
# so that the skeleton stays as short as the name it imitates).
_PAIRS = (("rn", "m"), ("vv", "w"), ("cl", "d"), ("nn", "m"))
# Case-folding ran first, so "I" became "i"; in sans-serif fonts it is "l".
_AMBIGUOUS = {"i": "l"}

# Skeletons are computed for every host of every message; names past this length are cut.
MAX_SKELETON_INPUT = 253


@functools.lru_cache(maxsize=16384)
def skeleton(text: str) -> str:
    """The confusable skeleton of a domain or label (lower-case, prototype letters)."""
    folded = unicodedata.normalize("NFKC", text[:MAX_SKELETON_INPUT]).lower()
    # Accents are how most confusables differ from ASCII ("pаypál"); drop combining marks.
    decomposed = unicodedata.normalize("NFD", folded)
    chars = []
    for ch in decomposed:
        if unicodedata.combining(ch):
            continue
        ch = _CHAR_PROTOTYPE.get(ch, ch)
        chars.append(_AMBIGUOUS.get(ch, ch))
    result = "".join(chars)
    for pair, single in _PAIRS:
        result = result.replace(pair, single)
    return result


def is_mixed_script(label: str) -> bool:
    """True when a label mixes Latin letters with letters of another script (TR39 §5)."""
    scripts = set()
    for ch in label:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        scripts.add(name.split(" ", 1)[0] if name else "UNKNOWN")
        if len(scripts) > 1:
            return True
    return False
