"""Subtitle cues from word timings (pipelines.subtitles): the captioners' limits hold, cuts fall at
sentence ends, pauses and commas, lines break at the best place, cues never overlap."""

from __future__ import annotations

import random
import re

import pytest

from pipelines import subtitles
from pipelines.subtitles import Cue, build_cues, join_words, normalize_words

LIMITS = {"max_line": 42, "max_lines": 2, "max_duration_s": 7.0, "max_cps": 20.0, "pause_s": 0.5}


def timed(text: str, *, start: float = 0.0, cps: float = 14.0, gap: float = 0.05,
          pauses: dict[int, float] | None = None) -> list[dict]:
    """Whisper-style word rows (leading space) for ``text``, spoken at ``cps`` characters a second
    with ``gap`` between words (``pauses``: word index -> the silence before it)."""
    out, t = [], start
    for i, w in enumerate(text.split()):
        t += (pauses or {}).get(i, 0.0)
        d = max(0.12, len(w) / cps)
        out.append({"word": " " + w, "start_s": round(t, 3), "end_s": round(t + d, 3), "probability": 0.9})
        t += d + gap
    return out


def check_cues(cues: list[Cue], words: list[dict], *, max_line=42, max_lines=2, max_duration_s=7.0, max_cps=20.0,
               linger_s=0.5, min_gap_s=0.08) -> None:
    """The invariants every cut must keep."""
    shown = [w.text for c in cues for w in c.words]
    assert shown == [" ".join(w["word"].split()) for w in words if w["word"].strip()]   # every word once, in order
    for k, c in enumerate(cues):
        assert 1 <= len(c.lines) <= max_lines, c
        assert all(len(line) <= max_line or " " not in line for line in c.lines), c   # only a lone long word overflows
        assert re.sub(r"\s", "", "".join(c.lines)) == re.sub(r"\s", "", join_words(c.words))   # the words, broken
        assert c.start_s < c.end_s
        assert c.end_s - c.start_s <= max_duration_s + 1e-9, c
        assert c.end_s <= c.words[-1].end_s + linger_s + 1e-9      # never long after its words
        assert c.start_s <= c.words[0].start_s + 1e-9 or len(c.words) == 1   # (a stretched word: its end)
        if k + 1 < len(cues):
            nxt = cues[k + 1]
            assert c.end_s <= nxt.start_s, (c, nxt)                 # never overlapping
            assert c.end_s >= c.words[-1].start_s                  # every word shows
        chars = sum(len(line) for line in c.lines)
        if chars / (c.end_s - c.start_s) > max_cps + 1e-6:
            # too fast to read: only where it could not stay longer (linger used up, or the next cue)
            limit = c.words[-1].end_s + linger_s
            if k + 1 < len(cues):
                limit = min(limit, cues[k + 1].start_s - min_gap_s)
            assert c.end_s >= min(limit, c.start_s + max_duration_s) - 1e-6, c


MONOLOGUE = (
    "Well, I suppose the story begins in the winter of nineteen seventy two, when my father came home "
    "from the factory and told us that the plant was closing. Nobody said anything for a long time. "
    "My mother, who had worked there too before we were born, just kept stirring the soup, and the radio "
    "was playing something by the Beatles, I think it was Let It Be, although my brother always insists "
    "it was Hey Jude. Does it matter? Not really, but it is funny what you remember. The next morning "
    "he went out early to look for work, and he kept doing that every single day for about eight months, "
    "through the snow and the rain and the terrible heat of that summer, until finally a cousin of his "
    "found him a job at the port, loading and unloading ships from all over the world, which he did "
    "for the rest of his working life without ever once complaining about it to any of us.")


def test_limits_hold_on_a_long_monologue():
    rng = random.Random(7)
    text = " ".join([MONOLOGUE] * 6)
    pauses = {i: rng.choice([0.0, 0.0, 0.0, 0.2, 0.7, 1.5]) for i in range(len(text.split()))}
    words = timed(text, cps=rng.choice([12.0, 16.0]), pauses=pauses)
    cues = build_cues(words, **LIMITS)
    check_cues(cues, words)
    assert len(cues) > 60
    # fast speech (25 characters a second, no pause): the limits still hold, speed is all it breaks
    fast = timed(text, cps=25.0, gap=0.0)
    check_cues(build_cues(fast, **LIMITS), fast)


def test_random_word_lists_keep_the_invariants():
    rng = random.Random(3)
    vocab = ["a", "the", "house", "I", "extraordinarily", "well,", "yes.", "no?", "and", "of", "to", "it's",
             "café", "über", "naïve", "x" * 50, "co-operate", "end."]
    for _ in range(200):
        t, words = rng.uniform(0, 100), []
        for _ in range(rng.randint(0, 120)):
            t += rng.choice([0.0, 0.0, 0.01, 0.1, 0.3, 0.6, 2.0])
            d = rng.choice([0.0, 0.05, 0.2, 0.5, 1.0, 9.0])
            words.append({"word": " " + rng.choice(vocab), "start_s": round(t, 3), "end_s": round(t + d, 3),
                          "probability": rng.random()})
            t += d * rng.choice([0.5, 1.0])       # words may overlap, as aligners' words sometimes do
        opts = {"max_line": rng.choice([20, 32, 42]), "max_lines": rng.choice([1, 2, 3]),
                "max_duration_s": rng.choice([3.0, 7.0]), "max_cps": 20.0}
        cues = build_cues(words, **opts)
        check_cues(cues, words, **opts)
        starts = [w.start_s for c in cues for w in c.words]
        assert starts == sorted(set(starts))                       # strictly increasing


def test_splits_at_sentence_ends():
    words = timed("I went home early. She stayed at the office until late.")
    cues = build_cues(words, **LIMITS)
    assert [c.text for c in cues] == ["I went home early.", "She stayed at the office until late."]


def test_a_short_sentence_joins_its_neighbour():
    words = timed("Yes. I think we should go now.", cps=20.0)
    assert [c.text for c in build_cues(words, **LIMITS)] == ["Yes. I think we should go now."]


def test_splits_at_pauses_not_at_short_gaps():
    words = timed("we walked down to the river and then we sat there", pauses={6: 0.6})
    assert [c.text for c in build_cues(words, **LIMITS)] == ["we walked down to the river", "and then we sat there"]
    words = timed("we walked down to the river and then we sat there", pauses={6: 0.4})
    cue, = build_cues(words, **LIMITS)
    assert cue.lines == ("we walked down to the river", "and then we sat there")   # one cue, broken before "and"


def test_long_sentence_splits_at_its_comma():
    text = ("When the results finally came back from the laboratory in Geneva, nobody in the room could "
            "quite believe what the numbers were telling them")
    cues = build_cues(timed(text, cps=18.0), **LIMITS)
    assert len(cues) == 2
    assert cues[0].text.replace("\n", " ").endswith("Geneva,")
    assert cues[1].text.replace("\n", " ").startswith("nobody")


def test_lines_break_at_the_best_place():
    # fits one line: one line
    assert [c.lines for c in build_cues(timed("a short line of text"))] == [("a short line of text",)]
    # after the comma, not in the middle of "the house"
    cue, = build_cues(timed("When we finally got back, the house was completely empty"), **LIMITS)
    assert cue.lines == ("When we finally got back,", "the house was completely empty")
    # never between an article and its noun, even if that would balance better
    cue, = build_cues(timed("She walked slowly along the quiet road to the old stone bridge"), **LIMITS)
    assert len(cue.lines) == 2
    assert not cue.lines[0].endswith((" the", " a", " to")), cue.lines
    assert abs(len(cue.lines[0]) - len(cue.lines[1])) <= 16        # about balanced
    # the break API on its own
    ws = normalize_words(timed("one two three four five six seven eight nine ten eleven twelve"))
    lines = subtitles.break_lines(ws, max_line=22, max_lines=3)     # 61 characters: 3 lines
    assert len(lines) == 3 and all(len(x) <= 22 for x in lines)


def test_a_word_longer_than_the_limits():
    long_word = "Pneumonoultramicroscopicsilicovolcanoconiosis-and-more-words"   # 60 characters
    words = timed(f"he said {long_word} again")
    cues = build_cues(words, **LIMITS)
    check_cues(cues, words)
    assert any(c.lines == (long_word,) for c in cues) or any(long_word in c.lines for c in cues)
    # a word stretched over 20 s of silence: on screen 7 s at most, its last 7 s
    stretched = [{"word": " Hello", "start_s": 10.0, "end_s": 30.0, "probability": 0.2},
                 {"word": " there.", "start_s": 30.0, "end_s": 30.4, "probability": 0.9}]
    cues = build_cues(stretched, **LIMITS)
    check_cues(cues, stretched)
    assert cues[0].start_s == pytest.approx(23.0) and cues[0].end_s <= 30.0


def test_empty_and_blank_words():
    assert build_cues([]) == []
    assert build_cues([{"word": "  ", "start_s": 1.0, "end_s": 1.5, "probability": None},
                       {"word": None, "start_s": 2.0, "end_s": 2.5, "probability": None}]) == []
    one = build_cues([{"word": " Hi", "start_s": 1.0, "end_s": 1.2, "probability": None}])
    assert [(c.text, c.start_s) for c in one] == [("Hi", 1.0)]
    assert one[0].end_s == pytest.approx(1.7)          # shown longer (min duration), at most linger_s after it
    with pytest.raises(ValueError):
        build_cues([], max_line=0)


def test_unicode_text():
    # Whisper's Japanese words: no spaces between them
    ja = [{"word": w, "start_s": 0.3 * i, "end_s": 0.3 * i + 0.25, "probability": 0.8}
          for i, w in enumerate(["今日", "は", "とても", "いい", "天気", "です", "ね", "。", "散歩", "に", "行き", "ましょう", "。"])]
    cues = build_cues(ja, **LIMITS)
    assert [c.text for c in cues] == ["今日はとてもいい天気ですね。", "散歩に行きましょう。"]
    # a long run of CJK text breaks into lines of at most max_line characters
    long_ja = [{"word": "漢字" * 3, "start_s": 0.2 * i, "end_s": 0.2 * i + 0.18, "probability": None} for i in range(20)]
    cues = build_cues(long_ja, max_line=16, max_lines=2)
    check_cues(cues, long_ja, max_line=16)
    # plain word lists (no leading spaces) get spaces, except between CJK characters
    plain = [{"word": w, "start_s": float(i), "end_s": i + 0.5, "probability": None}
             for i, w in enumerate(["Ça", "va", "très", "bien", "🙂"])]
    assert build_cues(plain, pause_s=5.0)[0].text == "Ça va très bien 🙂"
    # control characters and a timing arrow never reach a cue
    odd = [{"word": " a\x00b", "start_s": 0.0, "end_s": 0.5, "probability": None},
           {"word": " -->", "start_s": 0.5, "end_s": 1.0, "probability": None}]
    assert build_cues(odd)[0].text == "ab \u2192"


def test_no_overlap_with_colliding_times():
    words = [{"word": f" w{i}", "start_s": 5.0, "end_s": 5.0, "probability": None} for i in range(30)]
    words += [{"word": " late.", "start_s": 4.0, "end_s": 9.0, "probability": None}]   # starts before the others
    cues = build_cues(words, **LIMITS)
    check_cues(cues, words)


def test_timed_lines_for_webvtt_karaoke():
    words = timed("I went home early. She stayed at the office until late tonight, as she always does.")
    stamp = lambda t: f"{t:.3f}"
    for cue in build_cues(words, **LIMITS):
        lines = subtitles.timed_lines(cue, stamp, escape=lambda x: x.replace("<", "&lt;"))
        flat = " ".join(lines)
        times = [float(x) for x in re.findall(r"<([0-9.]+)>", flat)]
        assert len(times) == len(cue.words) - 1
        assert times == sorted(times) and all(cue.start_s < t < cue.end_s for t in times)
        assert re.sub(r"<[0-9.]+>", "", flat) == " ".join(cue.lines)
