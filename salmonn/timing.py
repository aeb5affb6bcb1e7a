"""Word timings from Whisper's cross-attention: the pure steps (no model here).

openai-whisper's method (`whisper/timing.py`), one function per step, so that each can be tested on
its own; `salmonn.whisper_text` runs the decoder and calls them:

    alignment_matrix   pre-softmax cross-attention scores of the alignment heads (H, L, T) -> (L, T'):
                       cut to the window's real frames, softmax, z-score over tokens,
                       median filter 7, mean over heads
    dtw                the monotone path through -matrix (tokens x 20-ms frames)
    word_timings       words (from tokens) with start/end at the path's jumps, mean token probability
    merge_punctuations punctuation joined to its word ("'“¿([{- before, "'.。,，!！?？:：”)]}、 after)
    add_word_timestamps openai's duration clamps: median word duration (<= 0.7 s), words next to
                       sentence ends cut to 2 x median, the first words after a pause shortened,
                       first/last words against their segment's timestamps
    place_words        absolute times and the speech spans of the VAD: no word starts in silence,
                       none stretches across a pause, none overlaps the next

Times inside a window are seconds from the window's start; `place_words` adds the window's start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FRAMES_PER_SECOND = 50  # Whisper encoder frames per second (20 ms each): one DTW step
MEL_FRAMES_PER_SECOND = 100  # log-mel frames per second (hop 160 at 16 kHz): the unit of `num_frames`
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
MAX_MEDIAN_WORD_S = 0.7  # the median word duration used by the clamps is capped here (openai)
# Word anomaly score (openai's hallucination_silence_threshold heuristics)
LOW_PROBABILITY = 0.15
SHORT_WORD_S = 0.133
LONG_WORD_S = 2.0
ANOMALY_WORDS = 8  # a window's first 8 words (punctuation aside) are scored
# A gap between speech spans shorter than this is not a pause: words may run across it.
MIN_PAUSE_S = 0.3


@dataclass(frozen=True)
class Word:
    """One word with its time: seconds from the window's start (from `WhisperText`) or from the
    file's start (from `place_words`). `word` keeps Whisper's leading space (" Hello,")."""

    word: str
    start_s: float
    end_s: float
    probability: float  # mean teacher-forced probability of its tokens, in [0, 1]


@dataclass
class WordTiming:
    """A word during alignment (mutable, as the clamps edit it): its Whisper tokens too."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


# --- alignment -------------------------------------------------------------------------------
def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of odd `width` along the last axis, reflect-padded; inputs no
    longer than width // 2 come back unchanged (reflect padding needs more)."""
    if width <= 0 or width % 2 != 1:
        raise ValueError(f"median filter width must be odd and positive, got {width}")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    lead = x.shape[:-1]
    padded = F.pad(x.reshape(1, -1, x.shape[-1]), (pad, pad), mode="reflect")  # (1, N, T + 2 pad)
    windows = padded.unfold(-1, width, 1)  # (1, N, T, width)
    return windows.sort(dim=-1).values[..., pad].reshape(*lead, x.shape[-1])


def alignment_matrix(scores: torch.Tensor, num_frames: int, filter_width: int = MEDIAN_FILTER_WIDTH) -> torch.Tensor:
    """(L, T') token-by-frame alignment weights from the pre-softmax cross-attention scores
    (H, L, 1500) of the alignment heads over a window of `num_frames` real log-mel frames.

    The scores are cut to the real audio's num_frames // 2 encoder frames *before* the softmax (so
    each token's attention over the real frames sums to one), normalised per frame over the
    tokens, median-filtered along time and averaged over the heads."""
    weights = scores[:, :, : num_frames // 2].float().softmax(dim=-1)  # (H, L, T')
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)  # over tokens
    weights = (weights - mean) / std
    weights = median_filter(weights, filter_width)
    return weights.mean(dim=0)  # (L, T')


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotone path of least total `cost` (N, M) from (0, 0) to (N-1, M-1):
    (token indices, frame indices), each of the path's length.

    openai-whisper's recursion and tie-breaking (diagonal only when strictly cheaper than both
    others, then up when strictly cheaper, else left), in float64; evaluated one anti-diagonal
    at a time, whose cells depend only on the two before it."""
    x = np.asarray(cost, dtype=np.float64)
    n, m = x.shape
    acc = np.full((n + 1, m + 1), np.inf)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    acc[0, 0] = 0.0
    for d in range(2, n + m + 1):  # cells (i, j) with i + j == d, 1 <= i <= n, 1 <= j <= m
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        diag = (c0 < c1) & (c0 < c2)
        up = ~diag & (c1 < c0) & (c1 < c2)
        acc[i, j] = x[i - 1, j - 1] + np.where(diag, c0, np.where(up, c1, c2))
        trace[i, j] = np.where(diag, 0, np.where(up, 1, 2))
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    path: list[tuple[int, int]] = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        elif step == 2:
            j -= 1
        else:  # pragma: no cover - every cell on a path was filled
            raise RuntimeError(f"DTW trace has no step at ({i}, {j})")
    steps = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return steps[:, 0], steps[:, 1]


def word_timings(
    matrix: torch.Tensor | np.ndarray,
    words: Sequence[str],
    word_tokens: Sequence[Sequence[int]],
    token_probs: Sequence[float],
) -> list[WordTiming]:
    """Words timed by the DTW path through -matrix.

    `matrix` (n + 1, T') has one row per predicted text token and a last row for <|endoftext|>;
    `words`/`word_tokens` split those n tokens (without <|endoftext|>); `token_probs` (n,) are
    the teacher-forced probabilities. A word starts where the path first reaches its first token
    and ends where it first reaches the token after its last one."""
    lengths = [len(t) for t in word_tokens]
    if not words or sum(lengths) != len(token_probs):
        return []
    m = np.asarray(matrix.float().cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    text_idx, time_idx = dtw(-m)
    jumps = np.concatenate([[True], np.diff(text_idx) != 0])  # the first frame of each token row
    jump_times = time_idx[jumps] / FRAMES_PER_SECOND  # (n + 1,)
    bounds = np.concatenate([[0], np.cumsum(lengths)])  # (words + 1,)
    probs = np.asarray(token_probs, dtype=np.float64)
    return [
        WordTiming(
            word=w,
            tokens=list(tokens),
            start=float(jump_times[a]),
            end=float(jump_times[b]),
            probability=float(probs[a:b].mean()) if b > a else 0.0,
        )
        for w, tokens, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:])
    ]


def merge_punctuations(
    timings: Sequence[WordTiming],
    prepended: str = PREPEND_PUNCTUATIONS,
    appended: str = APPEND_PUNCTUATIONS,
) -> list[WordTiming]:
    """Punctuation joined to its word (openai's rules): a word that is a space plus an opening
    mark goes onto the next word, a closing mark onto the word before (unless that one ends with
    a space). The emptied entries stay, with no word and no tokens, so that token counts still
    add up; times are not changed."""
    out = [dataclasses.replace(t, tokens=list(t.tokens)) for t in timings]
    i, j = len(out) - 2, len(out) - 1
    while i >= 0:
        before, after = out[i], out[j]
        if before.word.startswith(" ") and before.word.strip() in prepended:
            after.word, after.tokens = before.word + after.word, before.tokens + after.tokens
            before.word, before.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(out):
        before, after = out[i], out[j]
        if not before.word.endswith(" ") and after.word in appended:
            before.word, before.tokens = before.word + after.word, before.tokens + after.tokens
            after.word, after.tokens = "", []
        else:
            i = j
        j += 1
    return out


# --- openai's duration clamps ----------------------------------------------------------------------
def add_word_timestamps(
    timings: Sequence[WordTiming],
    segments: Sequence[tuple[float, float, int]],
    *,
    last_speech_s: float = 0.0,
) -> tuple[list[list[Word]], list[tuple[float, float]]]:
    """openai-whisper's `add_word_timestamps` heuristics on one window's aligned words.

    `timings` are the window's words as `word_timings` returns them (punctuation not merged yet);
    `segments` are (start_s, end_s, number of text tokens) of the window's timestamp segments
    (one segment over the real audio for a text without timestamps). Returns the words of each
    segment and the segments' (start_s, end_s), adjusted as openai adjusts them."""
    durations = np.array([t.end - t.start for t in timings])
    durations = durations[durations.nonzero()]
    median = min(MAX_MEDIAN_WORD_S, float(np.median(durations))) if len(durations) else 0.0
    longest = 2 * median
    timings = [dataclasses.replace(t) for t in timings]
    if len(durations):  # words at sentence ends no longer than twice the median
        for i in range(1, len(timings)):
            if timings[i].end - timings[i].start > longest:
                if timings[i].word in SENTENCE_END_MARKS:
                    timings[i].end = timings[i].start + longest
                elif timings[i - 1].word in SENTENCE_END_MARKS:
                    timings[i].start = timings[i].end - longest
    timings = merge_punctuations(timings)

    out_words: list[list[Word]] = []
    out_bounds: list[tuple[float, float]] = []
    k = 0
    for seg_start, seg_end, n_tokens in segments:
        taken = 0
        ws: list[list] = []  # [word, start, end, probability]
        while k < len(timings) and taken < n_tokens:
            t = timings[k]
            if t.word:
                ws.append([t.word, round(t.start, 2), round(t.end, 2), t.probability])
            taken += len(t.tokens)
            k += 1
        if ws:
            # the first (and second) word after a pause: no longer than twice the median
            if ws[0][2] - last_speech_s > median * 4 and (
                ws[0][2] - ws[0][1] > longest or (len(ws) > 1 and ws[1][2] - ws[0][1] > longest * 2)
            ):
                if len(ws) > 1 and ws[1][2] - ws[1][1] > longest:
                    boundary = max(ws[1][2] / 2, ws[1][2] - longest)
                    ws[0][2] = ws[1][1] = boundary
                ws[0][1] = max(0.0, ws[0][2] - longest)
            # the segment's own timestamps win over a first or last word that is too long
            if seg_start < ws[0][2] and seg_start - 0.5 > ws[0][1]:
                ws[0][1] = max(0.0, min(ws[0][2] - median, seg_start))
            else:
                seg_start = ws[0][1]
            if seg_end > ws[-1][1] and seg_end + 0.5 < ws[-1][2]:
                ws[-1][2] = max(ws[-1][1] + median, seg_end)
            else:
                seg_end = ws[-1][2]
            last_speech_s = seg_end
        out_words.append([Word(w, float(s), float(e), float(p)) for w, s, e, p in ws])
        out_bounds.append((seg_start, seg_end))
    return out_words, out_bounds


def word_anomaly_score(word: Word) -> float:
    """openai's score of an unlikely word: improbable, very short or very long."""
    duration = word.end_s - word.start_s
    score = 0.0
    if word.probability < LOW_PROBABILITY:
        score += 1.0
    if duration < SHORT_WORD_S:
        score += (SHORT_WORD_S - duration) * 15
    if duration > LONG_WORD_S:
        score += duration - LONG_WORD_S
    return score


def is_anomalous(words: Sequence[Word]) -> bool:
    """openai's test of a hallucinated segment (used around silence): over its first 8 words
    that are not punctuation, a total score >= 3 or nearly one per word."""
    marks = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS
    scored = [w for w in words if w.word not in marks][:ANOMALY_WORDS]
    if not scored:
        return False
    score = sum(word_anomaly_score(w) for w in scored)
    return score >= 3 or score + 0.01 >= len(scored)


# --- speech spans ------------------------------------------------------------------------------------
def spans_from_mask(
    mask: Sequence[bool] | np.ndarray, frame_s: float, start_s: float = 0.0
) -> list[tuple[float, float]]:
    """(start_s, end_s) of each run of True in a per-frame speech mask (the VAD's 32-ms frames),
    absolute when `start_s` is the mask's first frame in the file."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    edges = np.diff(np.concatenate(([0], m.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(start_s + float(a) * frame_s, start_s + float(b) * frame_s) for a, b in zip(starts, ends)]


def merge_spans(spans: Sequence[tuple[float, float]], min_pause_s: float = MIN_PAUSE_S) -> list[tuple[float, float]]:
    """Spans sorted, overlaps joined, and gaps shorter than `min_pause_s` closed."""
    out: list[tuple[float, float]] = []
    for start, end in sorted((float(a), float(b)) for a, b in spans if b > a):
        if out and start - out[-1][1] < min_pause_s:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _snap(start: float, end: float, spans: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """One word's (start, end) inside the speech spans; see `place_words`."""
    starts = [a for a, _ in spans]
    k = int(np.searchsorted(starts, start, side="right")) - 1  # the last span starting at or before `start`
    if k < 0 or start >= spans[k][1]:  # starts in silence: before the first span, in a pause, after the last
        nxt = k + 1
        if nxt < len(spans) and end > spans[nxt][0]:
            start, k = spans[nxt][0], nxt  # it reaches into the next span: it starts there
        else:  # wholly in silence: into the nearer span, keeping its duration where that fits
            duration = end - start
            before = spans[k] if k >= 0 else None
            after = spans[nxt] if nxt < len(spans) else None
            if before is not None and (after is None or start - before[1] <= after[0] - end):
                return max(before[0], before[1] - duration), before[1]
            assert after is not None  # spans is not empty
            return after[0], min(after[1], after[0] + duration)
    b = spans[k][1]
    if end <= b:
        return start, end
    # runs past the end of its span: across a pause into a later span, or into silence
    m = int(np.searchsorted(starts, end, side="right")) - 1
    if m > k and end > spans[m][0] and end - spans[m][0] > b - start:
        return spans[m][0], min(end, spans[m][1])  # most of it lies after the pause: it starts there
    return start, b


def place_words(
    words: Sequence[Word],
    window_start_s: float,
    speech_spans: Sequence[tuple[float, float]] | None,
    *,
    min_pause_s: float = MIN_PAUSE_S,
) -> list[Word]:
    """A window's words (times from the window's start) at absolute times in the file, moved
    into speech where the VAD found it.

    `speech_spans` are the VAD's (start_s, end_s) in the file (overlapping the window or not;
    gaps under `min_pause_s` are not pauses; `spans_from_mask` turns the speech gate's per-frame
    mask, pipelines.vad.speech_frames, into them). With spans:

    - a word that starts in silence starts where the next span starts, if it reaches into it;
    - a word that runs from one span across a pause into a later one keeps the side holding
      more of it (DTW drags the first word after a pause back into the silence before it);
    - a word that runs from a span into silence ends with its span;
    - a word wholly in silence moves into the nearer span, keeping its duration where it fits.

    Then each word starts no earlier than the previous one ends (the earlier word wins). Without
    spans (None: no VAD ran, or an empty list: the VAD heard no speech, so there is nothing to
    snap to) the times are only offset and made non-overlapping: openai's clamps, already applied
    by `WhisperText`, are all there is. Times are rounded to milliseconds."""
    spans = merge_spans(speech_spans or [], min_pause_s)
    out: list[Word] = []
    prev_end = -np.inf
    for w in words:
        start, end = window_start_s + w.start_s, window_start_s + w.end_s
        if spans:
            start, end = _snap(start, end, spans)
        start = max(start, prev_end)
        end = max(end, start)
        prev_end = end
        out.append(Word(w.word, round(start, 3), round(end, 3), w.probability))
    return out
