"""Emotion tags as tags: the emotion task's free-text answer -> one label of a fixed set.

SALMONN answers the official emotion prompt ("Describe the emotion of the speaker in one word.")
with free text: "Happy.", "The speaker sounds angry", "neutral tone", "Excited", "calm"... This
module maps such an answer onto :data:`schemas.EMOTION_LABELS` so an archive can be filtered by
emotion (``segments.label``). The mapping is a table (:data:`KEYWORDS`, :data:`PHRASES`): extend the
table, not the code.

Rules, in order:

1. Lower-case the answer and split it into words (apostrophes kept: "isn't").
2. Find every phrase of :data:`PHRASES` ("no emotion", "matter of fact") and every word of
   :data:`KEYWORDS`. A word hit preceded within :data:`NEGATION_WINDOW` words by a negation
   ("not", "no", "isn't", "never"...) is dropped: "not angry, just calm" -> neutral.
3. The earliest remaining hit wins ("sad and angry" -> sad); nothing left -> ``"other"``.

The emotion task's rows get ``label = segment_label(task, text)``; every other task's rows get null.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from schemas import EMOTION_LABELS

EMOTION_TASK = "emotion"
OTHER = "other"

# label -> words that name it. Inflections are listed (no stemmer): exact, reviewable matches.
# Grouping follows the usual corpus conventions: IEMOCAP merges "excited" into happy, RAVDESS's
# "calm" is scored as neutral, and anxiety/nervousness are fear-family states.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "neutral": (
        "neutral", "neutrality", "calm", "calmly", "calmness", "normal", "relaxed", "peaceful",
        "composed", "serene", "indifferent", "unemotional", "emotionless", "monotone", "monotonous",
        "flat", "informative", "matter-of-fact", "unbothered", "placid", "objective", "formal",
    ),
    "happy": (
        "happy", "happily", "happiness", "joy", "joyful", "joyous", "excited", "excitement",
        "exciting", "cheerful", "cheery", "glad", "delighted", "delight", "amused", "amusement",
        "pleased", "elated", "enthusiastic", "enthusiasm", "playful", "laughing", "laughter",
        "contented", "satisfied", "upbeat", "positive", "thrilled", "ecstatic", "jubilant",
        "merry", "gleeful", "hopeful", "proud", "loving", "grateful",
    ),
    "sad": (
        "sad", "sadly", "sadness", "unhappy", "unhappiness", "sorrow", "sorrowful", "depressed",
        "depression", "melancholy", "melancholic", "gloomy", "disappointed", "disappointment",
        "grief", "grieving", "crying", "tearful", "lonely", "miserable", "heartbroken", "hurt",
        "downcast", "despair", "despairing", "somber", "sombre", "mournful", "regretful", "sullen",
        "dejected", "hopeless", "upset", "negative",
    ),
    "angry": (
        "angry", "angrily", "anger", "mad", "furious", "fury", "annoyed", "annoyance", "irritated",
        "irritation", "frustrated", "frustration", "rage", "enraged", "hostile", "irate", "outraged",
        "resentful", "aggressive", "agitated", "indignant", "bitter", "livid", "stern",
    ),
    "fearful": (
        "fear", "fearful", "afraid", "scared", "frightened", "anxious", "anxiety", "nervous",
        "nervousness", "worried", "worry", "terrified", "terror", "panic", "panicked", "panicky",
        "tense", "uneasy", "alarmed", "apprehensive", "timid", "fright", "horrified", "horror",
        "insecure", "stressed",
    ),
    "disgusted": (
        "disgust", "disgusted", "disgusting", "revulsion", "repulsed", "revolted", "contempt",
        "contemptuous", "grossed", "disdain", "loathing", "sickened", "nauseated", "distaste",
    ),
    "surprised": (
        "surprise", "surprised", "surprising", "astonished", "astonishment", "amazed", "amazement",
        "shocked", "shock", "startled", "stunned", "astounded", "incredulous",
    ),
}

# Multi-word phrases, matched before single words (a phrase hit also hides the words inside it).
PHRASES: dict[str, tuple[str, ...]] = {
    "neutral": (
        "no emotion", "no emotions", "no particular emotion", "no strong emotion", "no clear emotion",
        "no obvious emotion", "no specific emotion", "without emotion", "not emotional",
        "not very emotional", "matter of fact", "no strong feelings",
    ),
    "happy": ("in a good mood", "good mood"),
    "sad": ("in a bad mood", "bad mood", "down in the dumps"),
    "angry": ("fed up", "pissed off", "ticked off"),
    "fearful": ("on edge", "freaked out"),
    "disgusted": ("grossed out",),
}

NEGATIONS = frozenset({
    "not", "no", "never", "neither", "nor", "without", "hardly", "barely", "isn't", "aren't",
    "wasn't", "weren't", "doesn't", "don't", "didn't", "isnt", "doesnt", "dont", "nothing", "lack",
    "lacks", "lacking",
})
NEGATION_WINDOW = 3  # a negation this many words before a keyword cancels it ("not very angry")...
# ...unless punctuation or one of these words comes between them ("not angry, just calm").
SCOPE_BREAKS = frozenset({"but", "just", "rather", "instead", "only", "though", "although", "yet", "more"})
_PUNCT = re.compile(r"[.,;:!?()\[\]\"]")

_WORD = re.compile(r"[a-z]+(?:['\u2019\-][a-z]+)*")


def _check_table() -> None:
    known = set(EMOTION_LABELS)
    for table in (KEYWORDS, PHRASES):
        bad = set(table) - known
        if bad:
            raise ValueError(f"emotion table names labels outside {EMOTION_LABELS}: {sorted(bad)}")
    seen: dict[str, str] = {}
    for label, words in KEYWORDS.items():
        for w in words:
            if w in seen and seen[w] != label:
                raise ValueError(f"emotion keyword {w!r} maps to both {seen[w]!r} and {label!r}")
            seen[w] = label


_check_table()
_WORD_TO_LABEL: dict[str, str] = {w: label for label, words in KEYWORDS.items() for w in words}
_PHRASE_PATTERNS: list[tuple[re.Pattern[str], str]] = sorted(
    ((re.compile(r"(?<![a-z])" + r"\s+".join(map(re.escape, p.split())) + r"(?![a-z])"), label)
     for label, phrases in PHRASES.items() for p in phrases),
    key=lambda pl: -len(pl[0].pattern),  # longest first: "no particular emotion" before "no emotion"
)


def _words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, word) of each word; curly apostrophes normalised."""
    return [(m.start(), m.end(), m.group().replace("\u2019", "'")) for m in _WORD.finditer(text)]


def _negated(text: str, words: list[tuple[int, int, str]], i: int) -> bool:
    """Whether word ``i`` is in the scope of a negation shortly before it."""
    for j in range(i - 1, max(-1, i - 1 - NEGATION_WINDOW), -1):
        w_start, w_end, w = words[j]
        if _PUNCT.search(text, w_end, words[j + 1][0]) or w in SCOPE_BREAKS:
            return False
        if w in NEGATIONS or w.endswith("n't"):
            return True
    return False


def emotion_label(text: str | None) -> str:
    """One of :data:`schemas.EMOTION_LABELS` for a free-text emotion answer.

    >>> emotion_label("The speaker sounds angry")
    'angry'
    >>> emotion_label("Excited!")
    'happy'
    >>> emotion_label("I'm not sure.")
    'other'
    """
    if not text:
        return OTHER
    lowered = text.lower()
    hits: list[tuple[int, str]] = []  # (char position, label)
    covered: list[tuple[int, int]] = []
    for pattern, label in _PHRASE_PATTERNS:
        for m in pattern.finditer(lowered):
            if any(s <= m.start() < e for s, e in covered):
                continue
            hits.append((m.start(), label))
            covered.append((m.start(), m.end()))
    words = _words(lowered)
    for i, (start, _end, word) in enumerate(words):
        if any(s <= start < e for s, e in covered):
            continue
        label = _WORD_TO_LABEL.get(word)
        if label is None and "-" in word:
            label = next((_WORD_TO_LABEL[p] for p in word.split("-") if p in _WORD_TO_LABEL), None)
        if label is None:
            continue
        if _negated(lowered, words, i):
            continue
        hits.append((start, label))
    if not hits:
        return OTHER
    return min(hits)[1]


def segment_label(task: str | None, text: str | None) -> str | None:
    """``segments.label`` for one row: the emotion label for the emotion task (null when the row
    has no text), null for every other task."""
    if task != EMOTION_TASK or text is None:
        return None
    return emotion_label(text)


def segment_labels(tasks: Iterable[str | None], texts: Iterable[str | None]) -> list[str | None]:
    """:func:`segment_label` over two columns (for filling a table's ``label`` column)."""
    return [segment_label(t, x) for t, x in zip(tasks, texts, strict=True)]
