"""The speech gate end to end: real voices and real non-speech through the real VAD weights, the
decode stage, the predictor (tiny model), the CLI, the config hash and a pipeline run on local Ray.

The voices are espeak-ng clips committed as fixtures (``pipelines.voices``): no system package.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import salmonn
from pipelines import synth, voices
from pipelines.cli import build_parser, config_from_args
from pipelines.config import ConfigError, PipelineConfig, config_hash, config_hash_of
from pipelines.decode import DecodeOptions
from pipelines.infer import SalmonnPredictor
from pipelines.sources import list_inputs
from pipelines.stages import DecodeStage
from pipelines.vad import DEFAULT_SPEECH_THRESHOLD
from schemas import stage as st
from schemas.vocabulary import FINISH_LENGTH, FINISH_NO_SPEECH, FINISH_SILENCE, FINISH_STOP

SR = 16_000
WINDOW_S = 10.0
GENERATED = (FINISH_STOP, FINISH_LENGTH)
REPO = Path(__file__).resolve().parents[1]


def _fit(x: np.ndarray, seconds: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    x = x.mean(axis=0) if x.ndim == 2 else x
    return np.resize(x, int(seconds * SR))


def make_archive(d: Path) -> dict[str, np.ndarray]:
    """Real encoded files; returns name -> ground-truth voiced mask at 16 kHz. Windows are 10 s."""
    d.mkdir(parents=True, exist_ok=True)
    truth: dict[str, np.ndarray] = {}

    def put(name: str, fmt: str, x: np.ndarray, voiced: np.ndarray | None = None) -> None:
        synth.write_audio(d / name, x[None, :], SR, fmt)
        truth[name] = np.zeros(x.size, bool) if voiced is None else voiced

    talk, voiced = voices.talk(24, seed=11)                                     # 3 windows of talk
    put("talk.mp3", "mp3", talk, voiced)
    intro = _fit(synth.music_like(10, SR, 1, seed=2), 10)                      # music | talk over a bed | silence
    bed_talk, bed_voiced = voices.talk(10, seed=12)
    bed = bed_talk + 0.2 * _fit(synth.music_like(10, SR, 1, seed=3), 10)
    put("podcast.flac", "flac", np.concatenate([intro, bed, np.zeros(10 * SR, np.float32)]),
        np.concatenate([np.zeros(10 * SR, bool), bed_voiced, np.zeros(10 * SR, bool)]))
    put("music.m4a", "m4a", _fit(synth.music_like(14, SR, 1, bpm=150, seed=4), 14))
    put("noise.wav", "wav", synth.noise(12, SR, 1, 0.2, "pink", seed=5)[0])
    put("tone.ogg", "wav", synth.tone(440, 8, SR)[0])
    put("silence.wav", "wav", np.zeros(12 * SR, np.float32))
    said = voices.announcement("Front_Center")                                  # 1.5 s of one voice
    x = synth.noise(10, SR, 1, 0.003, "pink", seed=6)[0]
    x[2 * SR:2 * SR + said.size] += said
    v = np.zeros(x.size, bool)
    v[2 * SR:2 * SR + said.size] = True
    put("announcement.wav", "wav", x, v)
    return truth


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("speech-archive")
    return d, make_archive(d)


@pytest.fixture(scope="module")
def window_rows(archive) -> list[dict]:
    """The decode stage's rows for the archive, gate on (VAD on every window)."""
    d, _ = archive
    stage = DecodeStage(DecodeOptions(window_s=WINDOW_S), speech_gate=True)
    return [r for ref in list_inputs(str(d)) for r in stage.file_rows(ref)]


def _share(truth: dict[str, np.ndarray], row: dict) -> float:
    v = truth[row["uri"].rsplit("/", 1)[-1]][int(row["start_s"] * SR):int(row["end_s"] * SR)]
    return float(v.mean()) if v.size else 0.0


TASKS = (*salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=4)),
         salmonn.Task("topic", "What is this about?", salmonn.GenerationSettings(max_new_tokens=4)),
         salmonn.Task("who", "Who is speaking?", salmonn.GenerationSettings(max_new_tokens=3), needs_speech=True))


@pytest.fixture(scope="module")
def predictor() -> SalmonnPredictor:
    return SalmonnPredictor("tiny", TASKS, speech_threshold=DEFAULT_SPEECH_THRESHOLD)


def test_decode_stage_measures_speech_per_window(archive, window_rows):
    _, truth = archive
    rows = [r for r in window_rows if r["kind"] == st.KIND_WINDOW]
    assert rows and all(r["speech_ratio"] is not None for r in rows)
    for r in rows:
        share = _share(truth, r)
        if r["is_silent"]:
            assert r["speech_ratio"] == 0.0
        elif share >= 0.2:
            assert r["speech_ratio"] >= DEFAULT_SPEECH_THRESHOLD, (r["uri"], r["segment_index"], share)
            assert abs(r["speech_ratio"] - share) < 0.2, (r["uri"], r["segment_index"], share, r["speech_ratio"])
        elif share == 0.0:
            assert r["speech_ratio"] < DEFAULT_SPEECH_THRESHOLD, (r["uri"], r["segment_index"], r["speech_ratio"])
    silent = [r for r in rows if r["uri"].endswith("silence.wav")]
    assert silent and all(r["is_silent"] for r in silent)
    # gate off: no VAD, the column stays null
    d, _ = archive
    off = DecodeStage(DecodeOptions(window_s=WINDOW_S))
    ref = next(r for r in list_inputs(str(d)) if r.uri.endswith("talk.mp3"))
    assert all(r["speech_ratio"] is None for r in off.file_rows(ref))


def test_cut_at_pauses_ends_windows_between_sentences(archive):
    """--cut-at-pauses through the decode stage: windows of a real file end in a pause (never
    inside a sentence), at most PAUSE_SEARCH_S before the full length; the default cuts at 10 s."""
    from pipelines.vad import PAUSE_SEARCH_S

    d, truth = archive
    ref = next(r for r in list_inputs(str(d)) if r.uri.endswith("talk.mp3"))
    voiced = truth["talk.mp3"]
    fixed = [r for r in DecodeStage(DecodeOptions(window_s=WINDOW_S)).file_rows(ref) if r.get("end_s")]
    cut = [r for r in DecodeStage(DecodeOptions(window_s=WINDOW_S), cut_at_pauses=True).file_rows(ref)
           if r.get("end_s")]
    assert [r["end_s"] - r["start_s"] for r in fixed[:-1]] == [WINDOW_S] * (len(fixed) - 1)
    assert len(cut) >= len(fixed) and cut[-1]["end_s"] == pytest.approx(fixed[-1]["end_s"])
    for a, b in zip(cut, cut[1:]):
        assert a["end_s"] == b["start_s"]                                      # still tiling the file
        assert WINDOW_S - PAUSE_SEARCH_S <= a["end_s"] - a["start_s"] <= WINDOW_S
        at = int(round(a["end_s"] * SR))
        assert not voiced[at - 160:at + 160].any(), a["end_s"]                 # not within 10 ms of speech
    assert any(a["end_s"] - a["start_s"] < WINDOW_S - 0.05 for a in cut[:-1])   # the hook moved cuts
    assert all(r["speech_ratio"] is None for r in cut)                         # cut only: no gate column


def test_predictor_gates_speech_tasks_and_silence(archive, window_rows, predictor):
    """Speech windows keep every task; windows without speech keep the tasks that describe any
    audio (caption, custom prompts by default) and get no_speech rows for the others; digital
    silence gets silence rows for every task; every window has one row per task."""
    _, truth = archive
    batch = st.build(window_rows, st.WINDOWS, "test")
    before = predictor.windows_encoded
    out = predictor(batch).to_pylist()
    windows = [r for r in window_rows if r["kind"] == st.KIND_WINDOW]
    by_window: dict[tuple[str, int], dict[str, dict]] = {}
    for r in out:
        if r["kind"] == st.KIND_SEGMENT:
            by_window.setdefault((r["uri"], r["segment_index"]), {})[r["task"]] = r
    assert len(by_window) == len(windows)
    speech_tasks = {t.name for t in TASKS if t.needs_speech}
    assert speech_tasks == {"transcribe", "emotion", "who"}
    n_speech = n_no_speech = n_silent = 0
    for w in windows:
        rows = by_window[(w["uri"], w["segment_index"])]
        assert set(rows) == {t.name for t in TASKS}
        assert all(r["speech_ratio"] == pytest.approx(w["speech_ratio"]) for r in rows.values())
        if w["is_silent"]:
            n_silent += 1
            assert all(r["finish_reason"] == FINISH_SILENCE and r["text"] is None and r["n_output_tokens"] == 0
                       for r in rows.values())
        elif w["speech_ratio"] >= DEFAULT_SPEECH_THRESHOLD:
            n_speech += 1
            assert all(r["finish_reason"] in GENERATED and r["text"] is not None for r in rows.values())
        else:
            n_no_speech += 1
            assert _share(truth, w) < 0.2
            for name, r in rows.items():
                if name in speech_tasks:
                    assert (r["finish_reason"], r["text"], r["n_output_tokens"]) == (FINISH_NO_SPEECH, None, 0)
                else:
                    assert r["finish_reason"] in GENERATED and r["text"] is not None, name
    assert n_speech >= 5 and n_no_speech >= 5 and n_silent >= 2, (n_speech, n_no_speech, n_silent)
    assert predictor.windows_encoded - before == n_speech + n_no_speech       # silence is not encoded
    assert [r["file_info"] is not None for r in out if r["kind"] == st.KIND_SEGMENT].count(True) == \
        sum(w.get("file_info") is not None for w in windows)


def test_gate_off_rows_are_what_the_model_says(archive, window_rows):
    """With the gate off the predictor runs every task on every window, silence included, and its
    rows are exactly the model's answers (the path used before the gate existed)."""
    import torch

    rows = [r for r in window_rows if r["kind"] == st.KIND_WINDOW and
            r["uri"].rsplit("/", 1)[-1] in ("music.m4a", "silence.wav", "announcement.wav")]
    tasks = TASKS[:3]
    p = SalmonnPredictor("tiny", tasks)
    out = [r for r in p(st.build(rows, st.WINDOWS, "test")).to_pylist() if r["kind"] == st.KIND_SEGMENT]
    assert len(out) == len(rows) * len(tasks) and p.windows_encoded == len(rows)
    waves = [np.frombuffer(r["samples"], dtype="<f4") for r in rows]
    lengths = [w.size for w in waves]
    wave = np.zeros((len(waves), max(lengths)), np.float32)
    for i, w in enumerate(waves):
        wave[i, :w.size] = w
    with torch.inference_mode():
        expected = p.model.generate_tasks(p.model.encode(torch.from_numpy(wave), torch.tensor(lengths)), tasks)
    got = {(r["task"], r["uri"], r["segment_index"]): (r["text"], r["finish_reason"], r["n_output_tokens"])
           for r in out}
    for t in tasks:
        for w, g in zip(rows, expected[t.name], strict=True):
            assert got[(t.name, w["uri"], w["segment_index"])] == (g.text, g.finish_reason, g.n_tokens)
    # the rows carried speech ratios (0 for music and silence): a predictor without a threshold ignores them
    assert any(r["speech_ratio"] == 0.0 for r in out) and all(r["finish_reason"] in GENERATED for r in out)


def test_config_hash_with_the_gate_off_is_the_hash_from_before():
    cfg = PipelineConfig(input="/in", out="/out", speech_gate=False)
    tasks = salmonn.default_tasks()
    d = cfg.decode
    before = config_hash({        # what config_hash_of hashed before the speech gate existed
        "model": cfg.model, "model_options": {},
        "tasks": [(t.name, t.prompt, dataclasses.asdict(t.settings)) for t in tasks],
        "decode": {"window_s": d.window_s, "hop_s": d.hop_s, "snap": d.snap_to_silence,
                   "channel_mode": d.channel_mode, "sample_rate": d.sample_rate},
    })
    assert config_hash_of(cfg) == before
    on = PipelineConfig(input="/in", out="/out")
    assert on.speech_gate is True and on.speech_threshold == DEFAULT_SPEECH_THRESHOLD
    assert config_hash_of(on) != before
    assert config_hash_of(dataclasses.replace(on, speech_threshold=0.1)) != config_hash_of(on)
    assert config_hash_of(dataclasses.replace(cfg, cut_at_pauses=True)) != before
    custom = (salmonn.Task("topic", "What is this about?"),)
    gated = (salmonn.Task("topic", "What is this about?", needs_speech=True),)
    def chash(c: PipelineConfig, tasks: tuple) -> str:
        return config_hash_of(dataclasses.replace(c, tasks=tasks))

    assert chash(on, custom) != chash(on, gated)        # needs_speech matters with the gate on ...
    assert chash(cfg, custom) == chash(cfg, gated)      # ... and not with it off
    with pytest.raises(ConfigError, match="--speech-threshold"):
        PipelineConfig(input="/in", out="/out", speech_threshold=1.5)
    with pytest.raises(ConfigError, match="--speech-gate"):
        PipelineConfig(input="/in", out="/out", speech_gate="yes")


def test_cli_speech_flags_and_needs_speech_task_setting(tmp_path):
    def cfg(*extra: str) -> PipelineConfig:
        args = build_parser().parse_args(["run", str(tmp_path), "--out", str(tmp_path / "out"), *extra])
        return config_from_args(args)

    c = cfg()
    assert (c.speech_gate, c.speech_threshold, c.cut_at_pauses) == (True, DEFAULT_SPEECH_THRESHOLD, False)
    assert {t.name: t.needs_speech for t in c.tasks} == {"caption": False, "transcribe": True, "emotion": True}
    c = cfg("--speech-gate", "off", "--speech-threshold", "0.1", "--cut-at-pauses")
    assert (c.speech_gate, c.speech_threshold, c.cut_at_pauses) == (False, 0.1, True)
    c = cfg("--tasks", "caption", "--prompt", "topic=What is it about?", "--prompt", "mood=Describe the mood.",
            "--task-setting", "topic.needs_speech=true", "--task-setting", "caption.needs_speech=true",
            "--task-setting", "topic.max_new_tokens=7")
    by = {t.name: t for t in c.tasks}
    assert (by["topic"].needs_speech, by["mood"].needs_speech, by["caption"].needs_speech) == (True, False, True)
    assert by["topic"].settings.max_new_tokens == 7
    with pytest.raises(ConfigError, match="needs_speech"):
        cfg("--prompt", "topic=What?", "--task-setting", "topic.needs_speech=maybe")


@pytest.mark.slow
def test_pipeline_run_gate_on_and_off(archive, ray_local, tmp_path):
    """run_pipeline on local Ray: the gate on writes speech_ratio per segment and speech_s per
    file and answers no_speech/silence rows; off, no VAD column is filled, every task of every
    window is generated, and the config hash is the one from before the gate."""
    from pipelines.output import OutputStore
    from pipelines.run import run_pipeline

    d, truth = archive
    tasks = tuple(salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=3)))
    base = PipelineConfig(input=str(d), out=str(tmp_path / "on"), tasks=tasks, decode=DecodeOptions(window_s=WINDOW_S),
                          progress=False, batch_size=8)
    on = run_pipeline(base)
    off_cfg = dataclasses.replace(base, out=str(tmp_path / "off"), speech_gate=False)
    off = run_pipeline(off_cfg)
    assert on.ok == off.ok == len(truth) and on.error == off.error == 0

    segs_on = OutputStore(str(tmp_path / "on")).read_table("segments").to_pylist()
    files_on = {r["uri"].rsplit("/", 1)[-1]: r
                for r in OutputStore(str(tmp_path / "on")).read_table("files").to_pylist()}
    assert all(r["speech_ratio"] is not None for r in segs_on)
    reasons = {(r["uri"].rsplit("/", 1)[-1], r["task"]): set() for r in segs_on}
    for r in segs_on:
        reasons[(r["uri"].rsplit("/", 1)[-1], r["task"])].add(r["finish_reason"])
    assert reasons[("talk.mp3", "transcribe")] <= set(GENERATED)
    for name in ("music.m4a", "noise.wav", "tone.ogg"):
        assert reasons[(name, "transcribe")] == reasons[(name, "emotion")] == {FINISH_NO_SPEECH}, name
        assert reasons[(name, "caption")] <= set(GENERATED), name
    assert all(reasons[("silence.wav", t.name)] == {FINISH_SILENCE} for t in tasks)
    assert reasons[("announcement.wav", "transcribe")] <= set(GENERATED)
    for name, voiced in truth.items():
        speech_s = files_on[name]["speech_s"]
        assert speech_s is not None and abs(speech_s - voiced.sum() / SR) < 0.15 * voiced.size / SR + 0.6, (
            name, speech_s, voiced.sum() / SR)
    assert files_on["silence.wav"]["speech_s"] == 0.0

    store_off = OutputStore(str(tmp_path / "off"))
    segs_off = store_off.read_table("segments").to_pylist()
    files_off = store_off.read_table("files").to_pylist()
    assert len(segs_off) == len(segs_on)
    assert all(r["speech_ratio"] is None and r["finish_reason"] in GENERATED and r["text"] is not None
               for r in segs_off)
    assert all(r["speech_s"] is None for r in files_off)
    assert {r["config_hash"] for r in files_off} == {config_hash_of(off_cfg)}
    assert config_hash_of(off_cfg) != config_hash_of(base)

    # report and plan show speech hours against audio hours, and the generations saved
    from pipelines.ops import plan, report

    skipped = sum(r["finish_reason"] in (FINISH_NO_SPEECH, FINISH_SILENCE) for r in segs_on)
    rep = report.collect(str(tmp_path / "on"))
    assert rep.speech_hours == pytest.approx(sum(f["speech_s"] for f in files_on.values()) / 3600)
    assert rep.generations_saved == pytest.approx(skipped / len(segs_on)) and 0 < skipped < len(segs_on)
    assert f"{skipped} of {len(segs_on)} rows" in report.render_text(rep)
    assert "speech hours" in report.render_html(rep)
    assert "speech gate: off" in report.render_text(report.collect(str(tmp_path / "off")))
    p = plan.plan_run(base, probe="never")
    assert p.speech_gate and p.speech_tasks == ("transcribe", "emotion")
    assert p.speech_measured[0] == pytest.approx(rep.speech_hours)
    assert "speech gate: on" in p.format()


@pytest.mark.slow
def test_speech_gate_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speech_gate.py"), "--smoke",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("speech_gate: generations saved podcast "), proc.stdout[-2000:]
    podcast, video = (float(x.split("%")[0]) for x in last.split("podcast ")[1].split(", video "))
    assert 0 <= podcast < 100 and 0 < video < 100, last     # the video clip is mostly music and noise
