"""The trap guard: vetoes a near match when what changes an answer differs. Pure.

Embeddings put "Track order 48213" and "Track order 48231", or "Is ibuprofen safe with
alcohol?" and "... unsafe ...", almost on top of each other. A semantic match is served
only if every :class:`Verifier` accepts it; :class:`LexicalGuard` is the built-in one and
always runs. It compares, between the new question and the cached one:

==============  ===========================================================================
``number``      digits and codes (``48213``, ``23kg``, ``6:30pm``, ``1,000`` = ``1000``,
                ``2.50`` = ``2.5``) and written numbers (``two`` = ``2``, ``twenty three``
                = ``23``, ``third`` = ``3rd``; a lone ``one`` is a pronoun); the sets must
                be equal
``date``        month and weekday names (``May`` only capitalised), today / tomorrow /
                yesterday / tonight / weekend / weekday / overnight; the sets must be equal
``negation``    not, no, never, none, without, cannot, ``n't``, ``non-`` ...: present in
                both or in neither; and no word of one is a negated form of a word of the
                other (``safe`` / ``unsafe``, ``able`` / ``disable``)
``antonym``     one side has a word and the other its opposite, from a fixed list of
                general antonyms (open / closed, on / off, include / exclude, before /
                after, buy / sell, accept / decline ...)
``entity``      a name (a capitalised word not opening a sentence, or any word with a
                capital past its first letter: ``iPhone``) on one side that the other side
                does not contain, in any case; an all-capitals word (``ATM``, ``CEO``: as
                often a common noun) only when the other side has another one instead
``scope``       only, except, all, every, each, both, none, neither: on one side alone; the
                weaker any, some, most, least, first, last, next, previous, per, another
                ...: one swapped for another
``unit``        currencies (``£``, ``$``, ``€``, pounds, dollars ...), ``%``, measures and
                periods (kg, km, GB, hour, month, yearly ...): when both sides name some,
                the same ones
==============  ===========================================================================

The lists are general English, written from the categories above, then loosened where
they vetoed paraphrases in half of the fow-cache pairs (filler words, acronyms, seasons);
what each rule costs in hits and saves in wrong answers is measured on those pairs by
``benchmarks/cache_eval.py`` (benchmarks/README.md, "Issue 11").

A :class:`Verifier` is anything with ``accepts(new_text, cached_text) -> bool``: a later
one may ask the tenant's cheapest model whether the cached question answers the new one.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

__all__ = ["LexicalGuard", "Verifier"]


@runtime_checkable
class Verifier(Protocol):
    """Decides whether a semantic match may be served: ``True`` accepts, ``False`` vetoes.

    Called only for a candidate already at or above the similarity threshold; it must
    be safe to call from any thread and should not raise (a raise is a veto).
    """

    def accepts(self, new_text: str, cached_text: str) -> bool:
        """Whether the answer cached for ``cached_text`` also answers ``new_text``."""
        ...


_NEGATIONS = frozenset("""
    not no never none nobody nothing nowhere neither nor without cannot cant dont doesnt
    didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt
    neednt aint nope shant non
""".split())
_NEGATING_PREFIXES = ("un", "dis", "non", "in", "im", "il", "ir")

_ANTONYM_PAIRS = [
    ("open", "closed"), ("open", "close"), ("opening", "closing"), ("on", "off"),
    ("include", "exclude"), ("includes", "excludes"), ("included", "excluded"),
    ("including", "excluding"), ("inclusive", "exclusive"), ("accept", "decline"),
    ("accept", "reject"), ("allowed", "banned"), ("allowed", "forbidden"),
    ("allowed", "prohibited"), ("allow", "ban"), ("permitted", "prohibited"),
    ("before", "after"), ("increase", "decrease"), ("increase", "reduce"),
    ("raise", "lower"), ("up", "down"), ("upgrade", "downgrade"), ("add", "remove"),
    ("start", "stop"), ("start", "end"), ("begin", "end"), ("buy", "sell"),
    ("buying", "selling"), ("import", "export"), ("upload", "download"),
    ("send", "receive"), ("sending", "receiving"), ("deposit", "withdraw"),
    ("lend", "borrow"), ("win", "lose"), ("pass", "fail"), ("join", "leave"),
    ("arrive", "depart"), ("arrival", "departure"), ("arrivals", "departures"),
    ("inbound", "outbound"), ("incoming", "outgoing"), ("maximum", "minimum"),
    ("max", "min"), ("most", "least"), ("more", "less"), ("more", "fewer"),
    ("higher", "lower"), ("high", "low"), ("cheapest", "dearest"),
    ("cheapest", "expensive"), ("cheap", "expensive"), ("earliest", "latest"),
    ("early", "late"), ("earlier", "later"), ("safe", "dangerous"), ("true", "false"),
    ("eat", "avoid"), ("take", "avoid"), ("do", "avoid"), ("always", "never"),
    ("for", "against"), ("above", "below"), ("over", "under"), ("inside", "outside"),
    ("internal", "external"), ("domestic", "international"), ("private", "public"),
    ("oldest", "newest"), ("old", "new"), ("hot", "cold"), ("male", "female"),
    ("men", "women"), ("adult", "child"), ("adults", "children"), ("full", "part"),
    ("import", "export"), ("credit", "debit"), ("income", "expense"), ("gain", "loss"),
    ("profit", "loss"), ("positive", "negative"), ("north", "south"), ("east", "west"),
    ("left", "right"), ("top", "bottom"), ("front", "back"), ("login", "logout"),
    ("sign", "cancel"), ("subscribe", "unsubscribe"), ("lock", "unlock"),
    ("activate", "deactivate"), ("connect", "disconnect"), ("encrypt", "decrypt"),
    ("pros", "cons"), ("advantages", "disadvantages"), ("benefits", "risks"),
    ("best", "worst"), ("better", "worse"), ("fastest", "slowest"), ("faster", "slower"),
    ("largest", "smallest"), ("biggest", "smallest"), ("bigger", "smaller"),
    ("longest", "shortest"), ("longer", "shorter"), ("same", "different"), ("many", "few"),
]
_ANTONYMS: dict[str, frozenset[str]] = {}
for _a, _b in _ANTONYM_PAIRS:
    _ANTONYMS[_a] = _ANTONYMS.get(_a, frozenset()) | {_b}
    _ANTONYMS[_b] = _ANTONYMS.get(_b, frozenset()) | {_a}

# Scope words that narrow or widen a question on their own ("only", "except"): one side
# having one the other lacks is a veto. The weaker ones ("some", "first", "another") also
# appear as filler ("some extra money", "without warning me first"), so only a swap of
# one for another is.
_STRONG_SCOPE = frozenset("only except all every each both none neither".split())
_SCOPE = _STRONG_SCOPE | frozenset("""
    any some most least first last next previous either whole entire total partial per
    single multiple several few other another additional extra specific particular
""".split())

_MONTHS = frozenset("""
    january february march april june july august september october november december
    jan feb apr jun jul aug sep sept oct nov dec
""".split())
_WEEKDAYS = frozenset("monday tuesday wednesday thursday friday saturday sunday".split())
_RELATIVE_DAYS = frozenset("""
    today tomorrow yesterday tonight weekend weekday overnight
""".split())

_UNITS = {
    "£": "£", "pound": "£", "pounds": "£", "gbp": "£", "quid": "£", "p": "£p",
    "pence": "£p", "$": "$", "dollar": "$", "dollars": "$", "usd": "$", "cent": "$c",
    "cents": "$c", "€": "€", "euro": "€", "euros": "€", "eur": "€", "¥": "¥", "yen": "¥",
    "%": "%", "percent": "%", "kg": "kg", "kgs": "kg", "kilo": "kg", "kilos": "kg",
    "kilogram": "kg", "kilograms": "kg", "g": "g", "gram": "g", "grams": "g", "lb": "lb",
    "lbs": "lb", "km": "km", "kms": "km", "kilometre": "km", "kilometres": "km",
    "kilometer": "km", "kilometers": "km", "mile": "mi", "miles": "mi", "m": "m",
    "metre": "m", "metres": "m", "meter": "m", "meters": "m", "cm": "cm", "mm": "mm",
    "litre": "l", "litres": "l", "liter": "l", "liters": "l", "ml": "ml", "gb": "gb",
    "mb": "mb", "tb": "tb", "kb": "kb", "mbps": "mbps", "mph": "mph", "kwh": "kwh",
    "kw": "kw", "w": "w", "watt": "w", "watts": "w", "second": "s", "seconds": "s",
    "minute": "min", "minutes": "min", "mins": "min", "hour": "h", "hours": "h",
    "hourly": "h", "hr": "h", "hrs": "h", "day": "d", "days": "d", "daily": "d",
    "week": "wk", "weeks": "wk", "weekly": "wk", "fortnight": "2wk", "fortnightly": "2wk",
    "month": "mo", "months": "mo", "monthly": "mo", "year": "yr", "years": "yr",
    "yearly": "yr", "annual": "yr", "annually": "yr", "decade": "10yr",
}

_WRITTEN_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "dozen": 12, "half": 0.5,
}
_MULTIPLIERS = {"hundred": 100, "thousand": 1000, "million": 1_000_000,
                "billion": 1_000_000_000}
_ORDINALS = {"third": "3rd", "fourth": "4th", "fifth": "5th", "sixth": "6th",
             "seventh": "7th", "eighth": "8th", "ninth": "9th", "tenth": "10th"}

# A word, with an inner apostrophe or hyphen kept apart below; a currency sign or % alone.
_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[£$€¥%]")
_SENTENCE_END = re.compile(r"[.!?:;\n\"“”()]")
_CLOCK = re.compile(r"(\d{1,2}(?:[:.]\d{2})?)\s*([ap])\.?m\b\.?", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?!\w|\.\d)")
_PRONOUN_I = frozenset({"i", "i'm", "i've", "i'd", "i'll", "i’m", "i’ve", "i’d", "i’ll"})


@dataclass(frozen=True, slots=True)
class _Features:
    words: frozenset[str]
    numbers: frozenset[str]
    dates: frozenset[str]
    negated: bool
    entities: frozenset[str]
    acronyms: frozenset[str]
    scope: frozenset[str]
    units: frozenset[str]


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def _number_word_runs(words: list[str]) -> list[str]:
    """Values of runs of written numbers (``twenty three`` -> ``23``); a lone ``one`` is
    a pronoun far more often than a count, so it is not one."""
    found: list[str] = []
    total = current = 0.0
    run: list[str] = []

    def close() -> None:
        nonlocal total, current, run
        if run and run != ["one"] and run != ["half"]:
            value = total + current
            found.append(str(int(value)) if value == int(value) else str(value))
        total = current = 0.0
        run = []

    for word in words:
        if word in _WRITTEN_NUMBERS:
            current += _WRITTEN_NUMBERS[word]
            run.append(word)
        elif word in _MULTIPLIERS and run:
            current = max(current, 1.0) * _MULTIPLIERS[word]
            if _MULTIPLIERS[word] >= 1000:
                total, current = total + current, 0.0
            run.append(word)
        elif word == "and" and run:
            continue
        else:
            close()
    close()
    return found


@lru_cache(maxsize=4096)
def _features(text: str) -> _Features:
    text = unicodedata.normalize("NFKC", text)
    # Clock times first, so "6 pm", "6pm" and "6:00 p.m." read alike.
    numbers: set[str] = set()

    def clock(match: re.Match[str]) -> str:
        hour = match.group(1).replace(".", ":")
        if hour.endswith(":00"):
            hour = hour[:-3]
        numbers.add(f"{hour}{match.group(2).lower()}m")
        return " "

    def decimal(match: re.Match[str]) -> str:
        numbers.add(match.group().rstrip("0").rstrip("."))  # 2.50 is 2.5
        return " "

    text = _CLOCK.sub(clock, text)
    text = _THOUSANDS.sub("", text)
    text = _DECIMAL.sub(decimal, text)
    raw_tokens: list[tuple[str, bool]] = []  # (token, opens a sentence)
    position = 0
    opening = True
    for match in _TOKEN.finditer(text):
        if _SENTENCE_END.search(text, position, match.start()):
            opening = True
        raw_tokens.append((match.group(), opening))
        opening = False
        position = match.end()
    # Hyphenated words are two words ("two-year", "follow-up"): the tokenizer stops at
    # the hyphen already. Apostrophes: "don't" -> "dont", "Apple's" -> "apple".
    words: list[str] = []
    entities: set[str] = set()
    acronyms: set[str] = set()
    for token, opens in raw_tokens:
        lower = token.lower()
        base = re.sub(r"['’]s$", "", lower)
        if base.endswith(("n't", "n’t")):
            base = base.replace("'", "").replace("’", "")
        words.append(base)
        if any(c.isdigit() for c in token):
            numbers.add(token.lower())
            continue
        if lower in _PRONOUN_I:
            continue
        if any(c.isupper() for c in token[1:]) or (token[:1].isupper() and not opens):
            entities.add(base)
            if len(token) > 1 and token.isupper():
                acronyms.add(base)
    numbers.update(_number_word_runs(words))
    numbers.update(_ORDINALS[w] for w in words if w in _ORDINALS)
    dates: set[str] = set()
    for token, word in zip((t for t, _ in raw_tokens), words, strict=True):
        single = _singular(word)
        if single in _WEEKDAYS or single in _RELATIVE_DAYS:
            dates.add(single)
        elif word in _MONTHS and (word != "may" or token[:1].isupper()):
            dates.add(word[:3])
        elif word == "may" and token == "May":
            dates.add("may")
    # A capitalised month or weekday is a date, compared as one, not also a name.
    entities -= {t.lower() for t, _ in raw_tokens if t.lower() in _MONTHS
                 or _singular(t.lower()) in _WEEKDAYS or t == "May"}
    word_set = frozenset(words)
    return _Features(
        words=word_set,
        numbers=frozenset(numbers),
        dates=frozenset(dates),
        negated=not _NEGATIONS.isdisjoint(word_set),
        entities=frozenset(entities),
        acronyms=frozenset(acronyms),
        scope=frozenset(w for w in words if w in _SCOPE),
        units=frozenset(_UNITS[w] for w in words if w in _UNITS),
    )


def _negated_form(words_a: frozenset[str], words_b: frozenset[str]) -> bool:
    """A word of one side is a prefix-negated word of the other (safe / unsafe)."""
    for word in words_a:
        if not word.startswith(_NEGATING_PREFIXES):
            continue
        for prefix in _NEGATING_PREFIXES:
            if word.startswith(prefix) and len(word) - len(prefix) >= 4 and (
                    word[len(prefix):] in words_b):
                return True
    return False


def _antonym_swap(a: frozenset[str], b: frozenset[str]) -> bool:
    for word in a - b:
        opposite = _ANTONYMS.get(word)
        if opposite and any(o in b and o not in a for o in opposite):
            return True
    return False


def _entity_differs(a: _Features, b: _Features) -> bool:
    """A name on one side the other lacks; for acronyms (``ATM``, ``CEO``: as often a
    common noun as a name) only a swap, one acronym for another."""
    only_a = {e for e in a.entities if e not in b.words}
    only_b = {e for e in b.entities if e not in a.words}
    if any(e not in a.acronyms for e in only_a) or any(e not in b.acronyms for e in only_b):
        return True
    return bool(only_a and only_b)


def _scope_differs(a: frozenset[str], b: frozenset[str]) -> bool:
    only_a, only_b = a - b, b - a
    if not _STRONG_SCOPE.isdisjoint(only_a) or not _STRONG_SCOPE.isdisjoint(only_b):
        return True
    return bool(only_a and only_b)


class LexicalGuard:
    """The built-in :class:`Verifier`: vetoes a near match whose numbers, dates,
    negation, names, scope words or units differ (see the module docstring)."""

    def veto_reason(self, new_text: str, cached_text: str) -> str | None:
        """Why the two questions may need different answers (``"number"``, ``"date"``,
        ``"negation"``, ``"antonym"``, ``"entity"``, ``"scope"``, ``"unit"``), or
        ``None`` if the guard sees no such difference."""
        a, b = _features(new_text), _features(cached_text)
        if a.numbers != b.numbers:
            return "number"
        if a.dates != b.dates:
            return "date"
        if a.negated != b.negated or _negated_form(a.words, b.words) or _negated_form(
                b.words, a.words):
            return "negation"
        if _antonym_swap(a.words, b.words):
            return "antonym"
        if _entity_differs(a, b):
            return "entity"
        if _scope_differs(a.scope, b.scope):
            return "scope"
        if a.units and b.units and a.units != b.units:
            return "unit"
        return None

    def accepts(self, new_text: str, cached_text: str) -> bool:
        """``True`` unless :meth:`veto_reason` finds a difference."""
        return self.veto_reason(new_text, cached_text) is None
