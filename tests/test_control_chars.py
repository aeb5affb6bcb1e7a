"""Generated text holds no control characters, and every exported cue is read by FFmpeg.

A random (or confused) model emits byte-fallback tokens that decode to NUL, form feed, vertical
tab, ^D...; a NUL ends FFmpeg's parse of an SRT file, so one such answer silently dropped the rest
of a film's subtitles. The answers are cleaned when they are decoded (``salmonn.text``), and the
exporter keeps each subtitle format's rules on top. The subtitles are parsed here by FFmpeg's own
demuxers (libavformat, through PyAV), the parser most people burn and mux subtitles with.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from pipelines.ops import export
from salmonn.text import clean_text
from schemas import stage as st

CONTROLS = [chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))]


def ffmpeg_cues(path) -> list[bytes]:
    """The cues FFmpeg's demuxer reads from a subtitle file (one packet per cue)."""
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


def test_clean_text_drops_every_control_character_but_newline_and_tab():
    text = "a\x00b\x0cc\x1fd\x7fe\x85f\x9fg\th\ni\r\nj" + "".join(CONTROLS)
    cleaned, n = clean_text(text)
    assert cleaned == "abcdefg\th\ni\nj"
    assert n == 7 + len(CONTROLS)
    assert clean_text("caf\u00e9 \u2192 \u65e5\u672c")[0] == "caf\u00e9 \u2192 \u65e5\u672c"   # printable text untouched


def test_ffmpeg_stops_at_a_nul(tmp_path):
    """What the cleaning is for: FFmpeg reads nothing of an SRT file past a NUL."""
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\x00\n\n2\n00:00:01,000 --> 00:00:02,000\nworld\n")
    good = tmp_path / "good.srt"
    good.write_text(bad.read_text().replace("\x00", ""))
    assert len(ffmpeg_cues(good)) == 2
    assert len(ffmpeg_cues(bad)) < 2


@pytest.fixture(scope="module")
def control_predictor():
    """The tiny predictor whose LM head can only say byte-fallback tokens of control characters,
    a few letters, a space and newline (never EOS): answers full of control characters."""
    import salmonn
    from pipelines.infer import SalmonnPredictor

    tasks = salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=24))
    pred = SalmonnPredictor("tiny", tasks)
    tok = pred.model.tokenizer
    keep = [tok.convert_tokens_to_ids(f"<0x{ord(c):02X}>") for c in CONTROLS if ord(c) < 0x80]
    keep += [tok.convert_tokens_to_ids(t) for t in ("<0x0A>", "<0x09>", "a", "e", "\u2581the")]
    assert 0 not in keep and len(set(keep)) == len(keep)   # all in the vocabulary (0 is <unk>)
    head = pred.model.llm.get_output_embeddings().weight   # (V, D)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        mask = torch.zeros(head.shape[0], dtype=torch.bool)
        mask[keep] = True
        head[~mask] = 0.0
        head[mask] = torch.randn(int(mask.sum()), head.shape[1], generator=g) * 4.0
    return pred


def _windows(n: int, seconds: float = 2.0) -> list[dict]:
    from pipelines.decode import Window
    from pipelines.stages import DecodeStage

    rng = np.random.default_rng(3)
    return [DecodeStage.window_row(Window(file_id="f0", uri="/x/film.mp4", segment_index=i, start_s=i * seconds,
                                          end_s=(i + 1) * seconds, is_silent=False,
                                          samples=(0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)))
            for i in range(n)]


def test_answers_full_of_control_characters_are_cleaned_and_every_cue_survives(control_predictor, tmp_path):
    pred = control_predictor
    out = pred(st.build(_windows(6), st.WINDOWS, "test"))
    rows = [r for r in out.to_pylist() if r["kind"] == st.KIND_SEGMENT]
    assert len(rows) == 6 * 3
    # the raw answers were full of control characters: each row generated tokens, and the
    # predictor counted what it dropped
    assert all(r["n_output_tokens"] > 0 for r in rows)
    assert pred.controls_dropped >= len(rows)
    for r in rows:
        assert clean_text(r["text"])[1] == 0, repr(r["text"])

    segments = [export.Segment(file_id=r["file_id"], uri=r["uri"], segment_index=r["segment_index"],
                               start_s=r["start_s"], end_s=r["end_s"], task=r["task"], text=r["text"],
                               label=None, run_id="r", model_id="tiny-random")
                for r in rows if r["task"] == "transcribe"]
    with_text = [s for s in segments if export.cue_text(s.text or "")]
    (tmp_path / "film.srt").write_text(export.to_srt(with_text))
    (tmp_path / "film.vtt").write_text(export.to_vtt(with_text))
    assert len(ffmpeg_cues(tmp_path / "film.srt")) == len(with_text)
    assert len(ffmpeg_cues(tmp_path / "film.vtt")) == len(with_text)


def test_export_cleans_text_already_in_a_table(tmp_path):
    """Rows written before the engines cleaned their answers: the exporter still writes cues that
    FFmpeg reads whole (every control character, blank lines, '-->', CR LF)."""
    texts = ["one\x00two", "\x0c\x0b\x04\x13", "line\n\nbreak --> arrow", "tab\there\r\nnext", "\x85c1 \x9f",
             "ok", "".join(CONTROLS) + "end"]
    segs = [export.Segment(file_id="f", uri="/x/a.wav", segment_index=i, start_s=float(i), end_s=i + 1.0,
                           task="transcribe", text=t, label=None, run_id="r", model_id="m") for i, t in enumerate(texts)]
    keep = [s for s in segs if export.cue_text(s.text or "")]
    assert len(keep) == len(texts) - 1          # the cue of nothing but control characters has no text
    (tmp_path / "a.srt").write_text(export.to_srt(keep))
    (tmp_path / "a.vtt").write_text(export.to_vtt(keep))
    assert len(ffmpeg_cues(tmp_path / "a.srt")) == len(keep)
    assert len(ffmpeg_cues(tmp_path / "a.vtt")) == len(keep)
    assert clean_text(export.to_txt(segs))[1] == 0
