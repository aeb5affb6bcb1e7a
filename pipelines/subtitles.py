"""Subtitle cues from word timings, cut the way captioners cut them (pure Python, no I/O).

:func:`build_cues` turns the timed words of a file (``segments.words``, schema v5; times absolute
in the file) into cues of at most ``max_lines`` lines of at most ``max_line`` characters, on
screen at most ``max_duration_s``, read at about ``max_cps`` characters per second (the Netflix
Timed Text Style Guide's 42 characters, 2 lines, 7 s and 17-20 cps; see TIMED_TEXT_NOTES.md,
"Subtitle conventions"). The rules, in order:

1. **Pauses.** A silence of ``pause_s`` or more between two words always ends a cue.
2. **Cuts.** Between pauses, the cuts are chosen together (dynamic programming over the words)
   so that every cue fits the limits, at the least total cost (with 2 lines, the cost of each
   cue's best line break counts too): a cue ends best at a sentence end
   (``. ! ? …`` and their CJK forms), next best after a clause mark (``, ; :`` ...), otherwise
   between two words; never after an article, a determiner or a preposition ("the | house"); a
   sentence end inside a cue costs more than the extra cue, unless one of the two cues would be
   shorter than ``min_duration_s`` (a lone "Yes." then joins its neighbour). Every cue costs a
   little, so cues are as full as the rules allow.
3. **Lines.** A cue's text stays on one line when it fits, otherwise it is broken into the
   fewest lines at the best place: lines of about equal length, a break after punctuation or
   before a conjunction or preposition preferred, never between an article and its noun.
4. **Timing.** A cue starts at its first word's start and ends at its last word's end, extended
   (by at most ``linger_s``) to show it for ``min_duration_s`` and to bring its reading speed down
   to ``max_cps`` where the silence after it allows; the text is never condensed, so speech faster
   than ``max_cps`` stays faster. A cue ends ``min_gap_s`` before the next one starts (two
   frames at 25 fps), and never after it: cues never overlap. A single word longer than
   ``max_duration_s`` (an aligner that stretched it over a silence) is shown for the last
   ``max_duration_s`` of it: the end of a word is the better estimate (DTW and the first word
   after a pause both start words early).

Characters are Unicode code points (a CJK character counts as one). A word longer than
``max_line`` gets a line of its own and is never split. Words are joined as the aligner wrote
them: Whisper's words carry their leading space (" Hello") and CJK words none; plain words (no
word with a leading space) are joined with one space, except between CJK characters.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# A cue ends best here: the last character of a word (closing quotes and brackets skipped).
SENTENCE_END = frozenset(".!?\u2026\u3002\uff01\uff1f\u203c\u2047\u2048\u2049")
CLAUSE_END = frozenset(",;:\u2014\u2013\uff0c\u3001\uff1b\uff1a")
_CLOSERS = "\"')]}\u201d\u2019\u00bb\u300d\u300f\uff09"

# Words a line or a cue must not end with: the next word belongs to them (English; others are
# cut by punctuation and balance alone).
_BINDS_FORWARD = frozenset("""a an the this that these those my your his her its our their some any no every each
of to in on at by for with from into onto about over under after before between through during without within
and or but nor so if as than""".split())
# Words a line is better started with (a break before them reads well).
_STARTS_CLAUSE = frozenset("and or but nor so because although though while which who whom whose where when that "
                           "if unless until since".split())

# Costs of the cut choice (arbitrary units, compared with each other only).
_CUE = 1.0                  # every cue
_CUT_SENTENCE = 0.0         # a cue ending at a sentence end
_CUT_CLAUSE = 2.0           # ... after a clause mark
_CUT_WORD = 5.0             # ... between two words
_CUT_BINDING = 30.0         # ... after an article/determiner/preposition
_INNER_SENTENCE = 8.0       # a sentence end inside a cue
_SHORT = 12.0               # a cue shorter than min_duration_s (scaled by how much shorter)
_LAYOUT = 0.25              # x the cost of the cue's best two-line layout (balance, where it breaks)


@dataclasses.dataclass(frozen=True)
class Word:
    """One timed word: ``text`` as shown (stripped), ``space`` whether a space precedes it."""

    text: str
    start_s: float
    end_s: float
    probability: float | None = None
    space: bool = True


@dataclasses.dataclass(frozen=True)
class Cue:
    """One subtitle: its display times (seconds, absolute), its lines and the words it shows."""

    start_s: float
    end_s: float
    lines: tuple[str, ...]
    words: tuple[Word, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------

def _is_cjk(ch: str) -> bool:
    """A character of a script written without spaces between words."""
    if not ch:
        return False
    o = ord(ch)
    return (0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF
            or 0xFF00 <= o <= 0xFFEF or 0x3000 <= o <= 0x303F or 0x0E00 <= o <= 0x0E7F or 0x20000 <= o <= 0x2FFFF)


def _clean(text: str) -> str:
    """A word's text as a cue can show it: control characters gone (a NUL ends FFmpeg's parse of
    an SRT file), any whitespace one space, ``-->`` (which would start a timing line) replaced.
    (Escaping for WebVTT is the writer's.)"""
    text = "".join(c for c in text if unicodedata.category(c) != "Cc" or c in "\t\n\r")
    return re.sub(r"\s+", " ", text).strip().replace("-->", "\u2192")


def normalize_words(words: Iterable[Mapping[str, Any] | Word]) -> list[Word]:
    """Word rows (``segments.words`` structs: word, start_s, end_s, probability) or :class:`Word`s
    -> :class:`Word`s ready to cut: empty words dropped, times in ms, starts strictly increasing
    (a word that starts with or before the previous one is moved 1 ms after it), ends not before
    starts. Whisper's leading spaces decide where spaces go (see the module docstring)."""
    raw: list[tuple[str, float, float, float | None]] = []
    for w in words:
        if isinstance(w, Word):
            raw.append(((" " if w.space else "") + w.text, w.start_s, w.end_s, w.probability))
        else:
            if w.get("word") is None or w.get("start_s") is None:
                continue
            end = w.get("end_s")
            raw.append((str(w["word"]), float(w["start_s"]), float(end if end is not None else w["start_s"]),
                        w.get("probability")))
    raw = [r for r in raw if math.isfinite(r[1]) and math.isfinite(r[2])]
    spaced = any(t[:1].isspace() for t, *_ in raw[1:])
    out: list[Word] = []
    prev_start = -math.inf
    for text, start, end, prob in raw:
        shown = _clean(text)
        if not shown:
            continue
        if spaced:
            space = text[:1].isspace()
        else:
            space = not (out and _is_cjk(out[-1].text[-1]) and _is_cjk(shown[0]))
        start = round(max(0.0, start), 3)
        if start <= prev_start:
            start = round(prev_start + 0.001, 3)
        end = max(round(end, 3), start)
        out.append(Word(shown, start, end, None if prob is None else float(prob), space))
        prev_start = start
    return out


def join_words(words: Sequence[Word]) -> str:
    """The words as one line of text."""
    return "".join((" " if w.space and i else "") + w.text for i, w in enumerate(words))


def _last_char(text: str) -> str:
    stripped = text.rstrip(_CLOSERS)
    return stripped[-1] if stripped else ""


def _ends_sentence(w: Word) -> bool:
    return _last_char(w.text) in SENTENCE_END


def _ends_clause(w: Word) -> bool:
    return _last_char(w.text) in CLAUSE_END


def _bare(w: Word) -> str:
    return w.text.strip("\"'()[]{}\u201c\u201d\u2018\u2019\u00ab\u00bb").casefold()


def _binds_forward(w: Word) -> bool:
    return not _ends_clause(w) and not _ends_sentence(w) and _bare(w) in _BINDS_FORWARD


# ---------------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------------

def _lengths(words: Sequence[Word]) -> list[int]:
    """Prefix lengths: the length of words[i:j] on one line is pre[j] - pre[i] - sep(i)."""
    pre = [0]
    for w in words:
        pre.append(pre[-1] + len(w.text) + (1 if w.space else 0))
    return pre


def _line_len(words: Sequence[Word], pre: Sequence[int], i: int, j: int) -> int:
    return pre[j] - pre[i] - (1 if words[i].space else 0)


def count_lines(words: Sequence[Word], max_line: int) -> int:
    """The fewest lines of at most ``max_line`` characters the words fit on (first fit, which is
    optimal for the count); a word longer than ``max_line`` takes a line of its own."""
    lines, length = 0, 0
    for w in words:
        add = len(w.text) + (1 if w.space else 0)
        if lines and length + add <= max_line:
            length += add
        else:
            lines += 1
            length = len(w.text)
    return lines


def _break_cost(words: Sequence[Word], k: int) -> float:
    """The cost of a line break between words[k-1] and words[k]."""
    before, after = words[k - 1], words[k]
    if _ends_sentence(before):
        return 0.0
    if _ends_clause(before):
        return 1.0
    if _binds_forward(before):
        return 40.0
    if _bare(after) in _STARTS_CLAUSE or _bare(after) in _BINDS_FORWARD:
        return 3.0
    if not after.space or not before.space and _is_cjk(before.text[-1]):
        return 4.0   # inside a run of CJK text: any character boundary will do
    return 6.0


def _balance_cost(length: int, target: float) -> float:
    return (abs(length - target) / 2.0) ** 1.5


def two_line_cost(words: Sequence[Word], max_line: int) -> float:
    """The cost of the best layout of ``words`` on one line (0) or two (what :func:`break_lines`
    minimises); inf where two lines cannot hold them. Linear in the words, for the cue cuts."""
    pre = _lengths(words)
    n = len(words)
    total = _line_len(words, pre, 0, n)
    if n == 1 or total <= max_line:
        return 0.0
    best = math.inf
    for k in range(1, n):
        a, b = _line_len(words, pre, 0, k), _line_len(words, pre, k, n)
        if (a <= max_line or k == 1) and (b <= max_line or k == n - 1):
            best = min(best, _balance_cost(a, total / 2) + _balance_cost(b, total / 2) + _break_cost(words, k))
    return best


def break_lines(words: Sequence[Word], *, max_line: int = 42, max_lines: int = 2) -> tuple[str, ...]:
    """The words of one cue as lines: one line if they fit, otherwise the fewest lines (at most
    ``max_lines`` where they fit at all) broken at the best places: lines of about equal length
    (each character of difference from the average costs), breaks after punctuation or before a
    conjunction/preposition preferred, after an article or preposition avoided."""
    if not words:
        return ()
    pre = _lengths(words)
    n = len(words)
    if n == 1 or _line_len(words, pre, 0, n) <= max_line:
        return (join_words(words),)
    n_lines = count_lines(words, max_line)   # >= 2 here; first fit shows a layout with this many exists
    total = _line_len(words, pre, 0, n)
    target = total / n_lines
    inf = math.inf
    # best[l][j]: the cost of words[:j] on l lines; back[l][j]: where the last line starts
    best = [[inf] * (n + 1) for _ in range(n_lines + 1)]
    back = [[0] * (n + 1) for _ in range(n_lines + 1)]
    best[0][0] = 0.0
    for lines in range(1, n_lines + 1):
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):
                length = _line_len(words, pre, i, j)
                if length > max_line and j - i > 1:
                    break
                if best[lines - 1][i] == inf:
                    continue
                cost = best[lines - 1][i] + _balance_cost(length, target)
                if i > 0:
                    cost += _break_cost(words, i)
                if cost < best[lines][j]:
                    best[lines][j], back[lines][j] = cost, i
    cuts, j = [], n
    for lines in range(n_lines, 0, -1):
        i = back[lines][j]
        cuts.append((i, j))
        j = i
    return tuple(join_words(words[i:j]) for i, j in reversed(cuts))


# ---------------------------------------------------------------------------------------------
# Cues
# ---------------------------------------------------------------------------------------------

def _phrases(words: Sequence[Word], pause_s: float) -> list[list[Word]]:
    """The words split at every silence of ``pause_s`` or more."""
    out: list[list[Word]] = []
    for w in words:
        if out and w.start_s - out[-1][-1].end_s < pause_s:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _cut_phrase(words: Sequence[Word], *, max_line: int, max_lines: int, max_duration_s: float,
                min_duration_s: float) -> list[tuple[int, int]]:
    """(i, j) word ranges of the cues of one phrase: the cuts of least total cost (module
    docstring, rule 2) among those whose cues fit ``max_lines`` x ``max_line`` and
    ``max_duration_s`` (a single word always fits)."""
    n = len(words)
    max_chars = max_line * max_lines
    inf = math.inf
    best = [inf] * (n + 1)
    back = [0] * (n + 1)
    best[0] = 0.0
    for j in range(1, n + 1):
        inner = 0   # sentence ends inside words[i:j] (before its last word)
        for i in range(j - 1, -1, -1):
            if i < j - 1 and _ends_sentence(words[i]):
                inner += 1
            if j - i > 1:
                span = words[j - 1].end_s - words[i].start_s
                if span > max_duration_s:
                    break
                chunk = words[i:j]
                if len(join_words(chunk)) > max_chars + max_lines or count_lines(chunk, max_line) > max_lines:
                    break
            if best[i] == inf:
                continue
            cost = best[i] + _CUE + inner * _INNER_SENTENCE
            last = words[j - 1]
            if j < n:
                if _ends_sentence(last):
                    cost += _CUT_SENTENCE
                elif _ends_clause(last):
                    cost += _CUT_CLAUSE
                elif _binds_forward(last):
                    cost += _CUT_BINDING
                else:
                    cost += _CUT_WORD
            if max_lines == 2 and j - i > 1:    # how well its text breaks into two lines counts too
                cost += _LAYOUT * two_line_cost(words[i:j], max_line)
            shown = words[j - 1].end_s - words[i].start_s
            if shown < min_duration_s:
                cost += _SHORT * (1.0 - shown / min_duration_s)
            if cost < best[j]:
                best[j], back[j] = cost, i
    cuts, j = [], n
    while j > 0:
        cuts.append((back[j], j))
        j = back[j]
    return list(reversed(cuts))


def separate(cues: Sequence[Cue], *, min_gap_s: float) -> list[Cue]:
    """Cues (in time order, starts strictly increasing) with none overlapping: each ends at the
    latest ``min_gap_s`` before the next starts (or at its start, where the two are closer than
    that), and never before its own last word starts (so every word, and every WebVTT timestamp
    tag, is inside its cue)."""
    ordered = list(cues)
    out = []
    for k, c in enumerate(ordered):
        end = c.end_s
        if k + 1 < len(ordered):
            nxt = ordered[k + 1].start_s
            floor = max(c.start_s, c.words[-1].start_s if c.words else c.start_s) + 0.001
            end = min(end, max(nxt - min_gap_s, min(floor, nxt)))
        end = round(max(end, c.start_s), 3)
        out.append(dataclasses.replace(c, end_s=end))
    return out


def build_cues(words: Iterable[Mapping[str, Any] | Word], *, max_line: int = 42, max_lines: int = 2,
               max_duration_s: float = 7.0, max_cps: float = 20.0, pause_s: float = 0.5,
               min_gap_s: float = 0.08, min_duration_s: float = 1.0, linger_s: float = 0.5) -> list[Cue]:
    """Subtitle cues of timed words (see the module docstring for the rules).

    ``words``: ``segments.words`` structs (``word``, ``start_s``, ``end_s``, ``probability``) or
    :class:`Word`s, in time order, times absolute. Returns the cues in time order, none
    overlapping, each at most ``max_lines`` lines of at most ``max_line`` characters (a single
    word longer than that excepted), at most ``max_duration_s`` long, ending at most
    ``linger_s`` after its last word."""
    if max_line < 1 or max_lines < 1 or max_duration_s <= 0 or max_cps <= 0:
        raise ValueError("max_line, max_lines, max_duration_s and max_cps must be positive")
    ws = normalize_words(words)
    chunks = [tuple(phrase[i:j]) for phrase in _phrases(ws, pause_s)
              for i, j in _cut_phrase(phrase, max_line=max_line, max_lines=max_lines,
                                      max_duration_s=max_duration_s, min_duration_s=min_duration_s)]
    cues: list[Cue] = []
    for k, chunk in enumerate(chunks):
        lines = break_lines(chunk, max_line=max_line, max_lines=max_lines)
        start, last_end = chunk[0].start_s, chunk[-1].end_s
        if last_end - start > max_duration_s:    # one stretched word: its last max_duration_s ...
            start = round(last_end - max_duration_s, 3)
            if k + 1 < len(chunks):              # ... starting before the next cue (words may overlap)
                start = min(start, round(chunks[k + 1][0].start_s - 0.001, 3))
        chars = sum(len(line) for line in lines)
        want = max(start + min_duration_s, start + chars / max_cps)
        end = min(max(last_end, want), last_end + linger_s, start + max_duration_s)
        cues.append(Cue(start, round(end, 3), lines, chunk))
    return separate(cues, min_gap_s=min_gap_s)


# ---------------------------------------------------------------------------------------------
# Cue text with word timestamps (WebVTT karaoke)
# ---------------------------------------------------------------------------------------------

def timed_lines(cue: Cue, stamp: Callable[[float], str],
                escape: Callable[[str], str] = lambda text: text) -> tuple[str, ...]:
    """The cue's lines with a timestamp tag before every word but the first (``stamp(seconds)``
    -> e.g. ``00:00:01.240``): WebVTT's karaoke style, ``Hello <00:00:01.240>world``; each word's
    text passes through ``escape``. Only tags strictly inside the cue are written (starts are
    strictly increasing and a cue ends after its last word starts, :func:`separate`)."""
    out: list[str] = []
    k = 0
    for line in cue.lines:
        parts: list[str] = []
        length = 0
        while k < len(cue.words) and length < len(line):
            w = cue.words[k]
            sep = " " if parts and w.space else ""
            tag = f"<{stamp(w.start_s)}>" if k and cue.start_s < w.start_s < cue.end_s else ""
            parts.append(sep + tag + escape(w.text))
            length += len(sep) + len(w.text)
            k += 1
        out.append("".join(parts))
    return tuple(out)
