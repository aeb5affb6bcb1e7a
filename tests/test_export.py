"""export: SRT/WebVTT validated by parser libraries, latest results only, JSONL in Lhotse's names."""

from __future__ import annotations

import json
import os
from datetime import UTC

import pytest
import srt
import webvtt

from pipelines.ops import commands as cli_ops
from pipelines.ops import export
from tests import ops_fixtures as fx


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "out")
    fx.build_two_runs(path)
    return path


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_srt_parses_with_contiguous_timestamps_and_latest_text(out, tmp_path):
    res = export.export(out, fmt="srt", task="transcribe", to=str(tmp_path))
    # one file per input with segments (errors have none); nested input keeps its folder
    assert _files(tmp_path) == ["ep01.srt", "ep02.srt", "ep03.srt", "ep07.srt", "interviews/ep06.srt"]
    assert res.inputs == 5 and len(res.files) == 5

    subs = list(srt.parse((tmp_path / "ep01.srt").read_text()))
    assert [s.index for s in subs] == [1, 2, 3]
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [(0, 30), (30, 60), (60, 75)]
    # ep01 was re-processed by run 2: only its new text, never run 1's
    assert all(s.content.startswith("v2 ") for s in subs)

    subs6 = list(srt.parse((tmp_path / "interviews" / "ep06.srt").read_text()))
    assert len(subs6) == 5
    for a, b in zip(subs6, subs6[1:]):
        assert a.end == b.start                                   # contiguous
    assert subs6[-1].end.total_seconds() == 130.0
    assert not any(s.content.startswith("v2 ") for s in subs6)    # untouched by run 2: run 1's text

    # the retried file comes from run 2, the partial one from run 1 with what was decoded
    assert list(srt.parse((tmp_path / "ep07.srt").read_text()))[0].content.startswith("v2 ")
    assert [s.end.total_seconds() for s in srt.parse((tmp_path / "ep03.srt").read_text())] == [30, 45]


def test_vtt_parses_and_matches_srt(out, tmp_path):
    export.export(out, fmt="vtt", task="transcribe", to=str(tmp_path / "vtt"))
    export.export(out, fmt="srt", task="transcribe", to=str(tmp_path / "srt"))
    for name in ("ep01", "ep02", "ep03", "ep07", "interviews/ep06"):
        path = tmp_path / "vtt" / f"{name}.vtt"
        assert path.read_text().startswith("WEBVTT\n")
        captions = webvtt.read(str(path)).captions
        subs = list(srt.parse((tmp_path / "srt" / f"{name}.srt").read_text()))
        assert [c.text for c in captions] == [s.content for s in subs]
        assert [(c.start_in_seconds, c.end_in_seconds) for c in captions] == [
            (int(s.start.total_seconds()), int(s.end.total_seconds())) for s in subs]
        for a, b in zip(captions, captions[1:]):
            assert a.end == b.start


def test_where_prefix_and_other_task(out, tmp_path):
    res = export.export(out, fmt="srt", task="caption", to=str(tmp_path), where=fx.PREFIX + "interviews/")
    assert _files(tmp_path) == ["ep06.srt"]
    assert res.segments == 5
    text = (tmp_path / "ep06.srt").read_text()
    assert any(c in text for c in fx.CAPTIONS)
    assert not any(s in text for s in fx.SENTENCES)  # captions, not transcripts


def test_jsonl_uses_lhotse_supervision_names(out, tmp_path):
    export.export(out, fmt="jsonl", task="emotion", to=str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "interviews" / "ep06.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for r in rows:
        assert {"id", "recording_id", "start", "duration", "text", "channel"} <= set(r)
        assert r["recording_id"] == "interviews/ep06"
        assert r["custom"]["uri"] == fx.PREFIX + "interviews/ep06.mp3"
        assert r["custom"]["label"] in ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised",
                                        "other")
    assert [r["start"] for r in rows] == [0.0, 30.0, 60.0, 90.0, 120.0]
    assert [r["duration"] for r in rows] == [30.0, 30.0, 30.0, 30.0, 10.0]
    assert len({r["id"] for r in rows}) == 5


def test_txt_is_text_in_time_order(out, tmp_path):
    export.export(out, fmt="txt", task="transcribe", to=str(tmp_path))
    lines = (tmp_path / "ep01.txt").read_text().splitlines()
    assert len(lines) == 3 and all(ln.startswith("v2 ") for ln in lines)


def test_cue_text_is_made_safe():
    seg = export.Segment("f", "/x.wav", 0, 0.0, 1.5, "transcribe", "a --> b\n\n\nsecond line", None, "r", None)
    empty = export.Segment("f", "/x.wav", 1, 1.5, 3.0, "transcribe", "more", None, "r", None)
    body = export.to_srt([seg, empty])
    subs = list(srt.parse(body))
    assert subs[0].content == "a \u2192 b\nsecond line" and subs[1].content == "more"
    assert export.srt_time(3723.456) == "01:02:03,456" and export.vtt_time(59.9996) == "00:01:00.000"


def test_name_clashes_keep_extensions():
    names = export.output_names(["/a/x.mp3", "/a/x.wav", "/a/sub/y.flac", "/a/z.ogg"])
    assert names == {"/a/x.mp3": "x.mp3", "/a/x.wav": "x.wav", "/a/sub/y.flac": "sub/y", "/a/z.ogg": "z"}
    assert export.output_names(["s3://bucket/pod/e1.mp3", "s3://bucket/pod/e2.mp3"]) == {
        "s3://bucket/pod/e1.mp3": "e1", "s3://bucket/pod/e2.mp3": "e2"}


def test_names_stay_unique_after_every_rename():
    names = export.output_names(["/a/clash.mp3", "/a/clash.wav", "/a/clash.mp3.wav"])
    assert names == {"/a/clash.mp3": "clash.mp3", "/a/clash.wav": "clash.wav", "/a/clash.mp3.wav": "clash.mp3.wav"}
    # one file on a case-insensitive file system (macOS, Windows): still two outputs
    names = export.output_names(["/a/Talk.mp3", "/a/talk.mp3", "/a/other.mp3"])
    assert len({n.casefold() for n in names.values()}) == 3 and names["/a/other.mp3"] == "other"
    # the same key listed twice is one input
    assert export.output_names(["/a/x.mp3", "/a/x.mp3"]) == {"/a/x.mp3": "x"}


HOSTILE_KEYS = [
    "s3://b/pod/../../../../outside/evil.mp3", "s3://b/pod/..\\..\\..\\win.mp3", "s3://b/pod/\x00nul.mp3",
    "s3://b/pod//double//slash.mp3", "s3://b/pod/./dot.mp3", "s3://b/pod/..", "s3://b/pod/", "s3://b//abs.mp3",
    "/etc/passwd", "s3://b/pod/" + "x" * 600 + ".mp3", "s3://b/pod/ep1.mp3",
]


def test_no_name_leaves_the_export_directory():
    names = export.output_names(HOSTILE_KEYS)
    assert names["s3://b/pod/ep1.mp3"] != names["s3://b/pod/../../../../outside/evil.mp3"]
    assert len(set(names.values())) == len(HOSTILE_KEYS)
    root = "/export/here"
    for uri, name in names.items():
        assert name and not name.startswith("/") and "\x00" not in name and "\\" not in name, (uri, name)
        assert ".." not in name.split("/"), (uri, name)
        path = os.path.normpath(os.path.join(root, name + ".jsonl"))
        assert path.startswith(root + "/"), (uri, name)
        assert all(len(c.encode()) <= 255 for c in path.split("/")), (uri, name)


def test_export_of_clashing_and_escaping_inputs_writes_one_file_each_inside_to(tmp_path):
    from datetime import datetime

    from pipelines.output import Committer, OutputStore

    out = str(tmp_path / "out")
    files = {name: ("ok", None, 20.0, "mp3", "mp3") for name in (
        "clash.mp3", "clash.wav", "clash.mp3.wav", "../../../../outside/evil.mp3", "deep/../../../up.mp3",
        "sub\\..\\..\\win.mp3")}
    Committer(OutputStore(out), fx.RUN1).commit(*fx.tables(fx.RUN1, files, datetime(2026, 1, 1, tzinfo=UTC)))
    to = tmp_path / "export" / "here"
    res = export.export(out, fmt="jsonl", task="transcribe", to=str(to))
    written = _files(to)
    assert len(res.files) == len(written) == len(files), written
    assert {"clash.mp3.jsonl", "clash.wav.jsonl", "clash.mp3.wav.jsonl"} <= set(written)
    assert _files(tmp_path) == sorted([os.path.join("export", "here", w) for w in written] +
                                      [os.path.relpath(os.path.join(r, f), tmp_path)
                                       for r, _, fs in os.walk(tmp_path / "out") for f in fs])
    ids = {json.loads(line)["recording_id"] for w in written for line in open(to / w)}
    assert len(ids) == len(files)


def test_cli_export(out, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", out, "--format", "vtt", "--to", str(tmp_path), "--where", fx.PREFIX + "ep0"])
    assert args.func(args) == 0
    assert _files(tmp_path) == ["ep01.vtt", "ep02.vtt", "ep03.vtt", "ep07.vtt"]
    assert "exported" in capsys.readouterr().out


def test_rows_without_label_get_it_from_the_text(tmp_path):
    """Segments written before schema version 2 have no label: export and report map the text."""
    from pipelines.ops import report
    from pipelines.output import Committer, OutputStore

    files, segs, entries = fx.tables(fx.RUN1, {"old.wav": ("ok", None, 40.0, "wav", "pcm_s16le")}, fx.T0, seed=5)
    segs = segs.drop_columns(["label"])                   # as a version-1 writer had it
    store = OutputStore(str(tmp_path / "out"))
    Committer(store, fx.RUN1).commit(files, segs, entries)
    store.write_run(fx.run_record(fx.RUN1, fx.T0, fx.T0, {"old.wav": ("ok", None, 40.0)}, n_inputs=1, skipped=0))
    assert store.read_table("segments")["label"].null_count == segs.num_rows
    export.export(str(tmp_path / "out"), fmt="jsonl", task="emotion", to=str(tmp_path / "x"))
    rows = [json.loads(x) for x in (tmp_path / "x" / "old.jsonl").read_text().splitlines()]
    from pipelines.labels import emotion_label

    assert [r["custom"]["label"] for r in rows] == [emotion_label(r["text"]) for r in rows]
    d = report.collect(str(tmp_path / "out"))
    assert sum(d.label_counts.values()) == 2


# ---------------------------------------------------------------------------------------------
# Timed text (schema v5): cues from words, WebVTT word timestamps, Lhotse word alignments
# ---------------------------------------------------------------------------------------------

TALK = [   # (window start, end, text spoken in it; None: the row has no words, one cue per window)
    (0.0, 30.0, "Good evening and welcome. Tonight we look at the history of the city's bridges, from the "
                "first wooden crossings of the twelfth century to the steel arches that carry the trains today. "
                "Our guide is a historian who has spent thirty years in the archives, and she has brought "
                "some remarkable pictures with her."),
    (30.0, 60.0, "Thank you. It is a pleasure to be here & to talk about <bridges>, which I love. The oldest "
                 "one we know of was built in eleven forty two, and it lasted barely a decade."),
    (60.0, 75.0, None),
]


def _talk_words(start: float, end: float, text: str) -> list[dict]:
    """Whisper-style words spread over the window at ~15 characters a second, a 0.6-s pause
    after each sentence."""
    out, t = [], start + 0.4
    for w in text.split():
        d = max(0.15, len(w) / 15.0)
        out.append({"word": " " + w, "start_s": round(t, 3), "end_s": round(t + d, 3), "probability": 0.93})
        t += d + (0.6 if w.endswith(".") else 0.04)
    assert t < end
    return out


@pytest.fixture(scope="module")
def timed_out(tmp_path_factory):
    import pyarrow as pa

    import schemas
    from pipelines.output import CommittedFile, Committer, OutputStore

    out = str(tmp_path_factory.mktemp("timed") / "out")
    uri = fx.PREFIX + "talk.wav"
    fid = fx.file_id(uri)
    segs = []
    for i, (start, end, text) in enumerate(TALK):
        words = _talk_words(start, end, text) if text else None
        common = {"file_id": fid, "uri": uri, "segment_index": i, "start_s": start, "end_s": end, "run_id": fx.RUN1,
                  "finish_reason": "stop", "language": "en", "language_prob": 0.98}
        segs.append({**common, "task": "transcribe", "text": text or "a window the aligner did not time",
                     "words": words})
        segs.append({**common, "task": "whisper", "text": text or "", "words": words or [], "avg_logprob": -0.2,
                     "compression_ratio": 1.4, "no_speech_prob": 0.01})
        segs.append({**common, "task": "caption", "text": f"a caption of window {i}", "language": None,
                     "language_prob": None})
    files = pa.Table.from_pylist([{"file_id": fid, "uri": uri, "status": "ok", "run_id": fx.RUN1, "n_segments": 3,
                                   "duration_s": 75.0, "config_hash": "h"}], schema=schemas.FILES)
    Committer(OutputStore(out), fx.RUN1).commit(files, pa.Table.from_pylist(segs, schema=schemas.SEGMENTS),
                                                [CommittedFile(fid, uri, "v1", "h", "ok", None, fx.RUN1, 0)])
    return out


def ffmpeg_cues(path) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue as FFmpeg's demuxer (libavformat, through PyAV) reads it."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        tb = float(stream.time_base)
        return [(p.pts * tb, (p.pts + p.duration) * tb, bytes(p).decode()) for p in container.demux(stream) if p.size]


def test_srt_cues_from_words_keep_the_captioners_limits(timed_out, tmp_path):
    res = export.export(timed_out, fmt="srt", task="transcribe", to=str(tmp_path))
    assert res.segments == 3
    subs = list(srt.parse((tmp_path / "talk.srt").read_text()))
    timed_subs, window = subs[:-1], subs[-1]
    assert len(timed_subs) >= 8                                          # two windows of speech, cut small
    for s in timed_subs:
        lines = s.content.split("\n")
        assert len(lines) <= 2 and all(len(x) <= 42 for x in lines), s.content
        assert (s.end - s.start).total_seconds() <= 7.0
        assert s.end.total_seconds() <= 60.0
    for a, b in zip(subs, subs[1:]):
        assert a.end <= b.start                                          # never overlapping
    # every word once, in order, across the window boundary at 30 s
    shown = " ".join(s.content.replace("\n", " ") for s in timed_subs)
    assert shown == " ".join(t for _, _, t in TALK if t)
    assert any(s.content.replace("\n", " ").startswith("Thank you.") for s in timed_subs)   # a sentence starts a cue
    # the window without words keeps its one cue
    assert (window.start.total_seconds(), window.end.total_seconds()) == (60.0, 75.0)
    assert window.content == "a window the aligner did not time"
    # FFmpeg reads the same cues
    cues = ffmpeg_cues(tmp_path / "talk.srt")
    assert [(round(a, 3), round(b, 3)) for a, b, _ in cues] == [
        (s.start.total_seconds(), s.end.total_seconds()) for s in subs]


def test_vtt_word_timestamps(timed_out, tmp_path):
    import re

    export.export(timed_out, fmt="vtt", task="whisper", to=str(tmp_path / "plain"))
    export.export(timed_out, fmt="vtt", task="whisper", to=str(tmp_path / "karaoke"), word_timestamps=True)
    plain = webvtt.read(str(tmp_path / "plain" / "talk.vtt")).captions
    karaoke = webvtt.read(str(tmp_path / "karaoke" / "talk.vtt")).captions
    # the whisper task's empty window: no cue at all; the others as for transcribe
    assert len(plain) == len(karaoke) >= 8 and plain[-1].end_in_seconds <= 60
    body = (tmp_path / "karaoke" / "talk.vtt").read_text()
    assert "&amp;" in body and "&lt;bridges&gt;," in body               # escaped, never a tag
    n_tags = 0
    for p, k in zip(plain, karaoke):
        assert (p.start, p.end) == (k.start, k.end)
        raw = k.raw_text
        stamps = re.findall(r"<(\d\d):(\d\d):(\d\d)\.(\d\d\d)>", raw)
        times = [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in stamps]
        assert times == sorted(times)
        assert all(k.start_in_seconds <= t <= k.end_in_seconds + 1 for t in times)
        assert re.sub(r"<[\d:.]+>", "", raw) == p.raw_text                # the same text without its tags
        assert len(stamps) == len(p.raw_text.split()) - 1                 # every word but the first
        n_tags += len(stamps)
    assert n_tags > 50
    # FFmpeg's WebVTT demuxer reads every cue, tags included
    cues = ffmpeg_cues(tmp_path / "karaoke" / "talk.vtt")
    assert len(cues) == len(karaoke) and "<00:00:0" in cues[0][2]
    for a, b, text in cues:
        times = [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000
                 for h, m, s, ms in re.findall(r"<(\d\d):(\d\d):(\d\d)\.(\d\d\d)>", text)]
        assert all(a < t < b for t in times), (a, b, times)


def test_vtt_word_timestamps_on_the_cli(timed_out, tmp_path, capsys):
    from pipelines.cli import main as cli_main

    assert cli_main(["export", timed_out, "--format", "vtt", "--to", str(tmp_path), "--vtt-word-timestamps"]) == 0
    assert "<00:00:0" in (tmp_path / "talk.vtt").read_text()
    assert cli_main(["export", timed_out, "--format", "srt", "--to", str(tmp_path), "--vtt-word-timestamps"]) == 2
    assert "needs --format vtt" in capsys.readouterr().err


def _check_lhotse_layout(rows: list[dict]) -> None:
    """Lhotse's documented layout: SupervisionSegment fields, alignment {"word": [AlignmentItem]}
    with AlignmentItem = (symbol, start, duration, score), start relative to the recording."""
    for r in rows:
        assert {"id", "recording_id", "start", "duration", "channel", "text"} <= set(r)
        for item in r.get("alignment", {}).get("word", []):
            symbol, start, duration, score = item
            assert isinstance(symbol, str) and symbol == symbol.strip() and symbol
            assert r["start"] <= start and start + duration <= r["start"] + r["duration"] + 1e-6
            assert duration >= 0 and (score is None or 0 <= score <= 1)


def test_jsonl_carries_word_alignments_lhotse_reads(timed_out, tmp_path):
    export.export(timed_out, fmt="jsonl", task="transcribe", to=str(tmp_path))
    path = tmp_path / "talk.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    _check_lhotse_layout(rows)
    assert [r["language"] for r in rows] == ["en"] * 3 and rows[0]["custom"]["language_prob"] == pytest.approx(0.98)
    assert "alignment" not in rows[2]                                    # not timed
    words = rows[1]["alignment"]["word"]
    assert words[0][:2] == ["Thank", pytest.approx(30.4)]               # absolute in the recording
    assert " ".join(w[0] for w in words) == TALK[1][2]

    import lhotse
    sups = lhotse.SupervisionSet.from_jsonl(str(path))
    first = list(sups)[1]
    assert first.language == "en" and first.start == 30.0
    ali = first.alignment["word"]
    assert isinstance(ali[0], lhotse.supervision.AlignmentItem)
    assert (ali[0].symbol, ali[0].start) == ("Thank", pytest.approx(30.4))
    assert ali[0].score == pytest.approx(0.93)
    # Lhotse's own operations keep them: a cut of the recording from 30 s holds the words at 0.4 s
    shifted = first.with_offset(-30.0)
    assert shifted.start == 0.0


def test_caption_rows_without_words_keep_one_cue_per_window(timed_out, tmp_path):
    export.export(timed_out, fmt="srt", task="caption", to=str(tmp_path))
    subs = list(srt.parse((tmp_path / "talk.srt").read_text()))
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [(0, 30), (30, 60), (60, 75)]
    export.export(timed_out, fmt="jsonl", task="caption", to=str(tmp_path / "j"))
    rows = [json.loads(x) for x in (tmp_path / "j" / "talk.jsonl").read_text().splitlines()]
    assert all("alignment" not in r and "language" not in r for r in rows)
