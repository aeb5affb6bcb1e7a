"""Timed text through the pipeline (issue 29): the decode stage's speech spans, the predictor's
language per window, Whisper's own transcript (the `whisper` task) and word times for SALMONN's
transcript, all from the one encoder pass; then the Ray graph end to end with `--timed-text on`,
and the subtitles export cuts from those words.

The tiny model's weights are random, so its texts are meaningless: the tests check what holds
for any text (times inside the window and inside the VAD's speech, in order, probabilities in
[0, 1], the language one of Whisper's, the rows' shape), on real speech (committed espeak-ng
voices) so that the speech spans are real.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import salmonn
from pipelines import synth, voices
from pipelines.config import PipelineConfig, config_hash_of
from pipelines.decode import DecodeOptions
from pipelines.infer import SalmonnPredictor
from pipelines.ops.export import export
from pipelines.output import OutputStore
from pipelines.run import run_pipeline
from pipelines.sources import list_inputs
from pipelines.stages import DecodeStage
from pipelines.vad import DEFAULT_SPEECH_THRESHOLD
from schemas import stage as st
from schemas.vocabulary import FINISH_LENGTH, FINISH_NO_SPEECH, FINISH_SILENCE, FINISH_STOP, FINISH_WHISPER_FAILED

SR = 16000
WINDOW_S = 10.0
GEN = salmonn.GenerationSettings(max_new_tokens=6)
TASKS = (salmonn.builtin_task("transcribe", GEN), salmonn.builtin_task("caption", GEN),
         salmonn.builtin_task("whisper", salmonn.GenerationSettings(max_new_tokens=24)))
LANGUAGES = {"en", "de", "zh", "fr", "es", "ja", "ru", "ko", "pt", "it"}   # a few of Whisper's 99 codes


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("timed-archive")
    talk, _ = voices.talk(24, seed=21)                         # three windows of talk with pauses
    synth.write_audio(d / "talk.flac", talk[None, :], SR, "flac")
    synth.write_audio(d / "quiet.wav", np.zeros((1, 6 * SR), np.float32), SR, "wav")   # digital silence
    synth.write_audio(d / "noise.wav", synth.noise(8, SR, 1, 0.2, "pink", seed=3), SR, "wav")
    return d


@pytest.fixture(scope="module")
def window_rows(archive) -> list[dict]:
    stage = DecodeStage(DecodeOptions(window_s=WINDOW_S), speech_gate=True)
    return [r for ref in list_inputs(str(archive)) for r in stage.file_rows(ref)]


def _inside(spans, t, slack=0.02) -> bool:
    return any(a - slack <= t <= b + slack for a, b in spans)


def test_decode_stage_gives_each_window_its_speech_spans(window_rows):
    windows = [r for r in window_rows if r["kind"] == st.KIND_WINDOW]
    assert windows
    for r in windows:
        spans = r["speech_spans"]
        length = r["end_s"] - r["start_s"]
        assert spans is not None
        assert all(0 <= s["start_s"] < s["end_s"] <= length + 1e-3 for s in spans)
        covered = sum(s["end_s"] - s["start_s"] for s in spans)
        assert covered == pytest.approx(r["speech_ratio"] * length, abs=0.05)   # the same mask
        if r["is_silent"]:
            assert spans == []
    talk = [r for r in windows if r["uri"].endswith("talk.flac")]
    assert all(r["speech_spans"] for r in talk)     # every window of the talk has speech


def test_predictor_times_words_and_tells_the_language(window_rows):
    predictor = SalmonnPredictor("tiny", TASKS, speech_threshold=DEFAULT_SPEECH_THRESHOLD, timed_text=True)
    assert predictor.whisper_text is not None and [t.name for t in predictor.llm_tasks] == ["transcribe", "caption"]
    out = predictor(st.build(window_rows, st.WINDOWS, "test"))
    rows = [r for r in out.to_pylist() if r["kind"] == st.KIND_SEGMENT]
    windows = {(r["uri"], r["segment_index"]): r for r in window_rows if r["kind"] == st.KIND_WINDOW}
    by_window: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        by_window.setdefault((r["uri"], r["segment_index"]), {})[r["task"]] = r
    assert set(by_window) == set(windows)
    n_timed = 0
    for key, tasks in by_window.items():
        w = windows[key]
        spans = [(w["start_s"] + s["start_s"], w["start_s"] + s["end_s"]) for s in w["speech_spans"]]
        langs = {(r["language"], r["language_prob"]) for r in tasks.values()}
        assert len(langs) == 1                                   # one language per window
        code, prob = langs.pop()
        if w["is_silent"]:
            assert code is None and all(r["finish_reason"] == FINISH_SILENCE for r in tasks.values())
            continue
        assert len(code) == 2 and 0.0 <= prob <= 1.0, (code, prob)
        assert tasks["caption"]["words"] is None                 # not a transcript: not timed
        whisper = tasks["whisper"]
        if w["speech_ratio"] < DEFAULT_SPEECH_THRESHOLD:         # the gate: no transcript of noise
            assert whisper["finish_reason"] == FINISH_NO_SPEECH and whisper["words"] is None
            assert tasks["transcribe"]["finish_reason"] == FINISH_NO_SPEECH
            continue
        assert whisper["finish_reason"] in (FINISH_STOP, FINISH_LENGTH, *FINISH_WHISPER_FAILED)
        assert whisper["avg_logprob"] <= 0 and whisper["compression_ratio"] > 0
        assert 0 <= whisper["no_speech_prob"] <= 1 and whisper["n_output_tokens"] > 0
        assert tasks["transcribe"]["avg_logprob"] is None        # Whisper's measures: its own rows only
        for name in ("whisper", "transcribe"):
            words = tasks[name]["words"]
            if not tasks[name]["text"]:
                continue
            assert words is not None
            n_timed += len(words)
            for a, b in zip(words, words[1:]):
                assert a["end_s"] <= b["start_s"] + 1e-6                         # in order, no overlap
            for x in words:
                assert w["start_s"] - 1e-6 <= x["start_s"] <= x["end_s"] <= w["end_s"] + 1e-3, (x, w["start_s"])
                assert 0.0 <= x["probability"] <= 1.0
                assert _inside(spans, x["start_s"]), (x, spans)                  # no word starts in silence
    assert n_timed > 0


def test_timed_text_run_and_its_subtitles(archive, tmp_path):
    """The Ray graph with --timed-text on: the rows carry words and languages, the config hash
    says timed text was on, and the SRT export cuts cues from the words (never 30-s cues)."""
    import srt

    out = tmp_path / "out"
    cfg = PipelineConfig(input=str(archive), out=str(out), tasks=TASKS, decode=DecodeOptions(window_s=WINDOW_S),
                         timed_text=True, progress=False, batch_size=4)
    assert config_hash_of(cfg) != config_hash_of(dataclasses.replace(cfg, timed_text=False))
    summary = run_pipeline(cfg)
    assert (summary.processed, summary.error) == (3, 0)
    segs = OutputStore(str(out)).read_table("segments").to_pylist()
    talk = [r for r in segs if r["uri"].endswith("talk.flac")]
    assert all(r["language"] for r in talk)
    timed = [r for r in talk if r["task"] == "whisper" and r["words"]]
    assert timed
    paths = export(str(out), fmt="srt", task="whisper", to=str(tmp_path / "subs")).files
    cues = list(srt.parse(Path(next(p for p in paths if str(p).endswith("talk.srt"))).read_text()))
    words = sum(len(r["words"]) for r in timed)
    assert cues and len(cues) <= words
    for c in cues:
        assert (c.end - c.start).total_seconds() <= 7.0 + 1e-6
    for a, b in zip(cues, cues[1:]):
        assert a.end <= b.start                                    # never two cues at once
