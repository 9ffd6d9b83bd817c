"""Checks that decide whether a rewrite may replace the user's request.

A rewrite is refused (and the request used as written) when it is empty, when it is a
refusal, or when it is written in another language than the request. Language is judged
without a model, so it is deliberately conservative: first by writing system (Latin,
Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai, Hangul, Japanese kana, Han), then,
for Latin-script text, by the function words of eight common languages, and only when
both texts give clear evidence; a short request like "a red fox" gives none and is never
refused on language. ``language_of`` returns None when it cannot tell.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Optional

# Unicode name prefixes -> writing system. Japanese is told from Chinese by its kana.
_SCRIPTS = {"LATIN": "latin", "CYRILLIC": "cyrillic", "GREEK": "greek", "ARABIC": "arabic", "HEBREW": "hebrew",
            "DEVANAGARI": "devanagari", "THAI": "thai", "HANGUL": "hangul", "HIRAGANA": "kana",
            "KATAKANA": "kana", "CJK": "han"}

# Function words that are frequent in captions and rare in the other seven languages.
_FUNCTION_WORDS = {
    "en": "the of and with in on is are its their this that from which there behind under",
    "de": "der die das und mit ein eine einem einer ist sind auf im den dem des vor hinter unter",
    "fr": "le la les et avec un une des du est sont sur dans au aux devant derrière sous",
    "es": "el la los las y con un una del es son sobre en al detrás debajo delante",
    "it": "il lo la gli le e con un una del della è sono sul sulla nel nella dietro sotto",
    "pt": "o os as e com um uma do da dos das é são sobre no na atrás sob",
    "nl": "de het een en met is zijn op in van achter onder voor",
    "pl": "i w z na jest są się oraz pod nad za przed",
}
_WORDS = {lang: frozenset(words.split()) for lang, words in _FUNCTION_WORDS.items()}
# Words of several languages prove nothing: drop them from every list.
_SHARED = frozenset(w for w in set().union(*_WORDS.values()) if sum(w in s for s in _WORDS.values()) > 1)
_DISTINCT = {lang: words - _SHARED for lang, words in _WORDS.items()}

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|i can(?:no|')t|i cannot|i won'?t|i will not|"
    r"i'?m (?:not able|unable)|i am (?:not able|unable)|as an ai\b|i must decline)", re.IGNORECASE)


def script_of(text: str) -> Optional[str]:
    """The writing system most of the letters of ``text`` use (kana wins over han when
    any kana is present: Japanese mixes both), or None for text without letters."""
    counts: Counter = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        try:
            first = unicodedata.name(ch).split()[0]
        except ValueError:
            continue
        script = _SCRIPTS.get(first)
        if script:
            counts[script] += 1
    if not counts:
        return None
    if counts["kana"] and counts["kana"] + counts["han"] >= max(counts.values()):
        return "kana"
    return counts.most_common(1)[0][0]


def language_of(text: str) -> Optional[str]:
    """A language or script code when the evidence is clear, else None: 'en', 'de', ...
    for Latin-script text with at least two distinct function words of one language and
    twice as many as of any other; the script name ('cyrillic', 'han', 'kana', ...) for
    other writing systems."""
    script = script_of(text)
    if script != "latin":
        return script
    words = re.findall(r"[^\W\d_]+", text.lower())
    hits = {lang: len(set(words) & vocab) for lang, vocab in _DISTINCT.items()}
    best = max(hits, key=hits.get)
    runner_up = max(v for lang, v in hits.items() if lang != best)
    if hits[best] >= 2 and hits[best] >= 2 * runner_up:
        return best
    return None


def is_refusal(text: str) -> bool:
    """Whether ``text`` opens like a refusal or an apology (English phrasing)."""
    return bool(_REFUSAL.match(text))


def rejection_reason(request: str, rewrite: str) -> Optional[str]:
    """Why ``rewrite`` must not replace ``request`` (a short phrase), or None when it may."""
    if not rewrite.strip():
        return "the reasoner's answer is empty"
    if is_refusal(rewrite):
        return f"the reasoner refused: {rewrite.strip()[:80]!r}"
    asked, answered = language_of(request), language_of(rewrite)
    if asked is not None and answered is not None and asked != answered:
        return f"the rewrite is in another language ({answered}) than the request ({asked})"
    if asked is None and script_of(request) not in (None, script_of(rewrite)):
        return f"the rewrite is in another writing system ({script_of(rewrite)}) than the request " \
               f"({script_of(request)})"
    return None
