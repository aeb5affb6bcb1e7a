"""The pipeline end to end on a real local Ray with the tiny model (issue: pipeline end to end).

Inputs are real encoded files served by moto's S3 server on 127.0.0.1; outputs go to a local
folder and to another S3 bucket.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines.cli import main as cli_main
from pipelines.decode import DecodeOptions
from pipelines.ops import report
from pipelines.output import OutputStore, data_file_schema_version
from pipelines.run import PipelineConfig, run_pipeline
from pipelines.synth import noise, speech_like, tone, write_audio, write_video
from schemas.vocabulary import RUN_COMPLETED, RUN_RUNNING

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 4.0

# (name, format, seconds, rate, channels): durations avoid multiples of the window
GOOD = [
    ("talk01.mp3", "mp3", 5.3, 16000, 1), ("talk02.mp3", "mp3", 9.1, 44100, 2),
    ("talk03.flac", "flac", 3.7, 22050, 1), ("talk04.flac", "flac", 6.2, 48000, 2),
    ("talk05.wav", "wav", 2.9, 8000, 1), ("talk06.wav", "wav24", 7.6, 44100, 2),
    ("talk07.wav", "wavf32", 4.5, 96000, 1), ("talk08.ogg", "ogg", 5.9, 44100, 2),
    ("talk09.opus", "opus", 10.3, 48000, 2), ("talk10.opus", "opus", 2.2, 16000, 1),
    ("talk11.m4a", "m4a", 6.7, 44100, 2), ("talk12.m4a", "m4a", 3.3, 22050, 1),
    ("video13.mp4", "mp4", 5.1, 44100, 2), ("video14.mkv", "mkv", 4.9, 48000, 2),
    ("video15.mov", "mov", 3.1, 48000, 1), ("video16.webm", "webm", 5.5, 48000, 2),
    ("talk17.wav", "wav", 1.4, 16000, 6),
]
BAD = {"broken18.mp3": "invalid_data", "empty19.wav": "empty_file", "silent_video20.mp4": "no_audio_stream"}


def _signal(i: int, seconds: float, sr: int, channels: int) -> np.ndarray:
    if i % 3 == 0:
        return np.repeat(speech_like(seconds, sr, seed=i), channels, axis=0)  # (C, N)
    if i % 3 == 1:
        return tone(220.0 + 40 * i, seconds, sr, channels=channels)
    return noise(seconds, sr, channels=channels)


def make_archive(directory: Path) -> dict[str, float]:
    """20 files in mixed formats, 3 of them bad; returns name -> encoded duration of the good ones."""
    directory.mkdir(parents=True, exist_ok=True)
    durations = {}
    for i, (name, fmt, seconds, sr, ch) in enumerate(GOOD):
        enc = write_audio(directory / name, _signal(i, seconds, sr, ch), sr, fmt)
        durations[name] = enc.duration_s
    (directory / "broken18.mp3").write_bytes(b"<html>definitely not an mp3</html>\n" * 40)
    (directory / "empty19.wav").write_bytes(b"")
    write_video(directory / "silent_video20.mp4", 2.0, "mp4")
    return durations


def upload_dir(fs, local: Path, bucket: str) -> None:
    fs.mkdir(bucket)
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{bucket}/{p.name}")


def check_output(store: OutputStore, durations: dict[str, float], n_tasks: int) -> None:
    files = store.read_table("files")
    segs = store.read_table("segments")
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in files.to_pylist()}
    assert sorted(by_name) == sorted([*durations, *BAD]), "exactly one files row per input"
    assert files.num_rows == len(durations) + len(BAD)
    for name, etype in BAD.items():
        assert by_name[name]["status"] == "error", by_name[name]
        assert by_name[name]["error_type"] == etype, by_name[name]
        assert by_name[name]["error_message"]
    seg_rows = segs.to_pylist()
    for name, expected in durations.items():
        row = by_name[name]
        assert row["status"] == "ok", row
        # within one codec frame (AAC pads its last 1024-sample frame: 46 ms at 22.05 kHz)
        assert abs(row["duration_s"] - expected) < 0.05, (name, row["duration_s"], expected)
        n_windows = math.ceil(row["duration_s"] / WINDOW_S)
        assert row["n_segments"] == n_windows
        mine = [s for s in seg_rows if s["file_id"] == row["file_id"]]
        assert len(mine) == n_windows * n_tasks, name
        for task in {s["task"] for s in mine}:
            spans = sorted((s["start_s"], s["end_s"]) for s in mine if s["task"] == task)
            assert [a for a, _ in spans] == [pytest.approx(WINDOW_S * k) for k in range(n_windows)]
            assert all(b == pytest.approx(a2) for (_, b), (a2, _) in zip(spans, spans[1:])), "contiguous"
            assert spans[-1][1] == pytest.approx(row["duration_s"], abs=1e-3)
        # The speech gate (on by default) answers transcribe/emotion on the tone and noise files
        # without the model: no_speech, no text, no label.
        generated = [s for s in mine if s["finish_reason"] != "no_speech"]
        assert all(s["task"] in ("transcribe", "emotion") and s["text"] is None for s in mine if s not in generated)
        assert all(s["finish_reason"] in ("stop", "length") for s in generated)
        assert all(s["model_id"] == "tiny-random" for s in mine)
        assert all((s["label"] in schemas.EMOTION_LABELS) == (s["task"] == "emotion") for s in generated)
    # one segments row per (file, segment, task): no duplicates
    keys = [(s["file_id"], s["segment_index"], s["task"]) for s in seg_rows]
    assert len(keys) == len(set(keys))
    for name in ("files", "segments"):   # every Delta data file carries the schema version
        paths = store.data_files(name)
        assert paths
        for path in paths:
            with store.fs.open(path, "rb") as f:
                assert data_file_schema_version(pq.read_schema(f)) == schemas.SCHEMA_VERSION


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("archive")
    return d, make_archive(d)


def test_s3_archive_to_local_and_s3_outputs(archive, s3_server, s3_storage_options, ray_local, tmp_path):
    local_dir, durations = archive
    fs = s3_server.s3fs()
    upload_dir(fs, local_dir, "podcasts")
    decode = DecodeOptions(window_s=WINDOW_S)

    # 1) S3 input -> local output, the three built-in tasks
    out_local = tmp_path / "out"
    summary = run_pipeline(PipelineConfig(input="s3://podcasts/", out=str(out_local), decode=decode,
                                          storage_options=s3_storage_options, out_storage_options={},
                                          progress=False, batch_size=4))
    assert summary.status == "completed"
    assert (summary.ok, summary.error, summary.partial) == (17, 3, 0)
    store = OutputStore(str(out_local))
    check_output(store, durations, n_tasks=3)

    # DuckDB reads both Delta tables: the README's offline query (as written, OUT replaced)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- tested: readme-duckdb -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(block.replace('"OUT/', f'"{out_local}/'), scope)
    n_windows = sum(math.ceil(r["duration_s"] / WINDOW_S)
                    for r in store.read_table("files").to_pylist() if r["status"] == "ok")
    assert len(scope["transcripts"]) == n_windows
    assert len({uri for uri, *_ in scope["transcripts"]}) == 17   # every ok file

    # 2) the same archive -> an S3 bucket, with two custom prompts beside the built-in tasks
    import salmonn

    fs.mkdir("podcast-index")
    tasks = (*salmonn.default_tasks(),
             salmonn.Task("topic", "What is the topic of this recording?", salmonn.GenerationSettings(max_new_tokens=8)),
             salmonn.Task("music", "Is there music? Answer yes or no.",
                          salmonn.GenerationSettings(max_new_tokens=4, lora_scale=2.0)))
    summary = run_pipeline(PipelineConfig(input="s3://podcasts/", out="s3://podcast-index/run", decode=decode,
                                          tasks=tasks, storage_options=s3_storage_options, progress=False,
                                          batch_size=4))
    assert (summary.ok, summary.error) == (17, 3)
    s3store = OutputStore("s3://podcast-index/run", s3_storage_options)
    check_output(s3store, durations, n_tasks=5)
    segs = s3store.read_table("segments").to_pylist()
    per_window: dict[tuple[str, int], list[str]] = {}
    for s in segs:
        per_window.setdefault((s["file_id"], s["segment_index"]), []).append(s["task"])
    assert all(sorted(v) == sorted(["caption", "transcribe", "emotion", "topic", "music"]) for v in per_window.values())
    assert {s["lora_scale"] for s in segs if s["task"] == "music"} == {2.0}
    assert all(s["n_output_tokens"] <= 8 for s in segs if s["task"] == "topic")


def test_untracked_file_is_ignored_by_status_and_resume(tmp_path, ray_local, capsys):
    from pipelines.synth import make_demo_clips

    audio = tmp_path / "audio"
    make_demo_clips(audio, seconds=3.0)
    out = tmp_path / "out"
    cfg = PipelineConfig(input=str(audio), out=str(out), progress=False, flush_files=2)
    first = run_pipeline(cfg)
    store = OutputStore(str(out))
    n_files = store.read_table("files").num_rows
    n_segs = store.read_table("segments").num_rows

    # Debris of a write interrupted before its Delta commit: a data file in the table's folder
    # that no table version lists, holding a copy of real rows, and the run left "running" as a
    # killed driver leaves it.
    src = Path(store.data_files("segments")[0])
    orphan = src.parent / "part-99999-0badf00d-c000.zstd.parquet"
    orphan.write_bytes(src.read_bytes())
    rec = store.read_run(first.run_id)
    # what the run planned on this CPU-only Ray: the CPU batch size, one CPU inference actor
    assert (rec.batch_size, rec.resources["batch_size"]) == (None, 8)
    assert rec.resources["infer_actors"] == 1 and rec.resources["gpus_per_infer_actor"] == 0
    # where the driver's wall time went: each phase, within the run's wall time
    phases = rec.counts.phases_s
    assert set(phases) == {"list", "ledger", "ray_init", "graph", "finish", "index"}
    assert all(v >= 0 for v in phases.values()) and phases["graph"] > 0
    assert sum(phases.values()) <= rec.counts.wall_s and rec.counts.commit_s <= phases["graph"]
    assert "  of which: listing " in report.render_text(report.collect(str(out), first.run_id))
    store.write_run(dataclasses.replace(rec, status=RUN_RUNNING))

    assert cli_main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{n_files} files" in text and "1 untracked file(s) ignored" in text
    assert f"{n_segs} segment rows" in text

    again = run_pipeline(cfg)
    assert again.run_id == first.run_id and again.resumed
    assert again.processed == 0 and again.skipped == n_files
    assert store.read_table("segments").num_rows == n_segs
    assert store.read_run(first.run_id).status == RUN_COMPLETED
    # a file no version lists cannot be told from a concurrent run's write in progress, so resume
    # leaves it; vacuum removes it (with a 0-hour retention here: nothing else writes to OUT)
    assert cli_main(["maintain", str(out), "--vacuum-hours", "0"]) == 0
    assert not orphan.exists()
    assert store.read_table("segments").num_rows == n_segs


def test_encoders_run_once_per_window_for_five_tasks():
    """Direct (no Ray): five tasks over a batch cost one encoder pass per window."""
    import salmonn
    from pipelines.infer import SalmonnPredictor
    from pipelines.stages import DecodeStage

    tasks = (*salmonn.default_tasks(), salmonn.Task("a", "Say a.", salmonn.GenerationSettings(max_new_tokens=3)),
             salmonn.Task("b", "Say b.", salmonn.GenerationSettings(max_new_tokens=3)))
    pred = SalmonnPredictor("tiny", tasks)
    calls = {"whisper": 0, "beats": 0, "rows": 0}
    pred.model.speech_encoder.register_forward_hook(
        lambda m, i, o: calls.__setitem__("whisper", calls["whisper"] + i[0].shape[0]))
    pred.model.beats.register_forward_hook(
        lambda m, i, o: calls.__setitem__("beats", calls["beats"] + i[0].shape[0]))
    rng = np.random.default_rng(0)
    rows = [DecodeStage.window_row(_window(i, rng.standard_normal(16000 * (i + 2)).astype(np.float32) * 0.1))
            for i in range(4)]
    from schemas import stage as cols

    out = pred(cols.build(rows, cols.WINDOWS, "test"))
    assert out["kind"].to_pylist().count(cols.KIND_SEGMENT) == 4 * 5
    assert calls["whisper"] == 4 and calls["beats"] == 4
    assert pred.windows_encoded == 4


def _window(i: int, samples: np.ndarray):
    from pipelines.decode import Window

    return Window(file_id=f"f{i}", uri=f"/x/{i}.wav", segment_index=0, start_s=0.0,
                  end_s=len(samples) / 16000, samples=samples, is_silent=False)


def test_demo_command(tmp_path):
    """`salmonn-pipeline demo` through the installed console script, as the README runs it."""
    exe = Path(sys.executable).with_name("salmonn-pipeline")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    proc = subprocess.run([*cmd, "demo", "--dir", str(tmp_path / "demo"), "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stdout
    assert "completed" in proc.stdout and "error 1" in proc.stdout
    store = OutputStore(str(tmp_path / "demo" / "out"))
    files = store.read_table("files")
    assert files.num_rows == 6
    assert sorted(files["status"].to_pylist()).count("ok") == 5
    # every command the demo prints works as printed
    lines = proc.stdout.splitlines()
    query = lines[next(i for i, line in enumerate(lines) if line.startswith("Read the latest result")) + 1]
    ran = subprocess.run(query.strip(), shell=True, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert all(word in ran.stdout for word in ("uri", "task", "start_s", "text", "caption")), ran.stdout
    # timed text is on in the demo: transcripts carry words, and the printed export and search run
    segs = store.read_table("segments", columns=["task", "text", "language", "words"]).to_pylist()
    assert any(r["language"] for r in segs)
    assert all(r["words"] is not None for r in segs if r["task"] == "transcribe" and r["text"])
    for prefix in ("Subtitles cut from word times: ", "Search (the run kept the index current): "):
        line = next(x for x in lines if x.startswith(prefix))[len(prefix):]
        ran = subprocess.run(line.replace("salmonn-pipeline", shlex.quote(cmd[0]), 1) if exe.exists() else line,
                             shell=True, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert ran.returncode == 0, (line, ran.stderr[-2000:])
    assert list((tmp_path / "demo" / "subtitles").rglob("*.srt"))


def test_failing_window_is_isolated_and_its_neighbours_kept(monkeypatch):
    """A batch that raises is retried once, then split: only the bad window becomes an error row."""
    import json

    import salmonn
    from pipelines import faults
    from pipelines.decode import FileInfo
    from pipelines.driver import file_status
    from pipelines.infer import SalmonnPredictor
    from pipelines.stages import DecodeStage, ResultAssembler, info_to_struct
    from schemas import stage as cols

    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "infer", "uri_contains": "/x/2.wav", "raise": "CUDA error: boom"}]))
    tasks = salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=4))
    pred = SalmonnPredictor("tiny", tasks)
    rng = np.random.default_rng(1)
    rows = [DecodeStage.window_row(_window(i, rng.standard_normal(16000 * 2).astype(np.float32) * 0.1))
            for i in range(5)]
    out = pred(cols.build(rows, cols.WINDOWS, "test"))
    kinds = out["kind"].to_pylist()
    assert kinds.count(cols.KIND_SEGMENT) == 4 * 3
    assert kinds.count(cols.KIND_WINDOW_ERROR) == 1
    bad = out.to_pylist()[kinds.index(cols.KIND_WINDOW_ERROR)]
    assert bad["file_id"] == "f2" and "CUDA error: boom" in bad["error"] and bad["error_type"] == "inference_error"
    assert {r["file_id"] for r in out.to_pylist() if r["kind"] == cols.KIND_SEGMENT} == {"f0", "f1", "f3", "f4"}

    # the driver side: the file of the bad window is an error row with the reason
    asm = ResultAssembler([t.name for t in tasks])
    info = FileInfo(file_id="f2", uri="/x/2.wav", status="ok", error_type=None, error_message=None,
                    container="wav", codec="pcm_s16le", sample_rate_in=16000, channels_in=1,
                    duration_s=2.0, n_segments=1)
    file_batch = cols.build([{"kind": cols.KIND_FILE, "file_id": "f2", "uri": "/x/2.wav",
                              "file_info": info_to_struct(info)}], cols.RESULTS, "test")
    (done1, failed1), (done2, failed2) = asm.add(out), asm.add(file_batch)
    assert not failed1 and not failed2
    done = done1 + done2
    (complete,) = [d for d in done if d.info.file_id == "f2"]
    status, etype, message = file_status(complete)
    assert (status, etype) == ("error", "inference_error") and "boom" in message


def _predictor_batch(n: int, seconds: float = 2.0):
    from pipelines.stages import DecodeStage
    from schemas import stage as cols

    rng = np.random.default_rng(7)
    rows = [DecodeStage.window_row(_window(i, rng.standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1))
            for i in range(n)]
    return cols.build(rows, cols.WINDOWS, "test")


def test_out_of_memory_halves_the_windows_run_at_once(monkeypatch, caplog):
    """A batch bigger than the GPU's memory (injected: more than 3 windows raise
    torch.OutOfMemoryError, as CUDA does) is not a failure of its windows: the predictor runs
    at most half as many at once from then on, once, and every result equals the unconstrained
    run's."""
    import json
    import logging

    import salmonn
    from pipelines import faults
    from pipelines.infer import SalmonnPredictor
    from schemas import stage as cols

    tasks = salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=5))
    batch = _predictor_batch(7)
    want = SalmonnPredictor("tiny", tasks)(batch)

    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "infer", "oom_over_windows": 3}]))
    pred = SalmonnPredictor("tiny", tasks)
    with caplog.at_level(logging.WARNING, logger="pipelines.infer"):
        got = pred(batch)
        again = pred(batch)    # the limit stays: no second out-of-memory
    assert pred.max_windows == 3
    oom_logs = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(oom_logs) == 1 and "at most 3 at a time" in oom_logs[0].getMessage()
    assert not [r for r in caplog.records if "retrying once" in r.getMessage()]   # not a batch failure
    for out in (got, again):
        assert out["kind"].to_pylist() == [cols.KIND_SEGMENT] * 7 * 3
        key = lambda o: sorted((r["task"], r["file_id"], r["text"], r["n_output_tokens"]) for r in o.to_pylist())  # noqa: E731
        assert key(out) == key(want)


def test_out_of_memory_on_a_single_window_is_that_windows_error(monkeypatch):
    import json

    import salmonn
    from pipelines import faults
    from pipelines.infer import SalmonnPredictor
    from schemas import stage as cols

    monkeypatch.setenv(faults.ENV, json.dumps([{"stage": "infer", "oom_over_windows": 0}]))
    pred = SalmonnPredictor("tiny", salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=2)))
    out = pred(_predictor_batch(2))
    assert out["kind"].to_pylist() == [cols.KIND_WINDOW_ERROR] * 2
    assert all("OutOfMemoryError" in e and "out of memory" in e for e in out["error"].to_pylist())
    assert pred.max_windows == 1


def test_resources_follow_the_cluster():
    """Pool sizes and batch size from the cluster's CPUs and GPUs; explicit settings win."""
    from pipelines.graph import plan_resources

    cfg = PipelineConfig(input="x", out="y")
    gpu = plan_resources(cfg, {"CPU": 16.0, "GPU": 4.0})
    assert (gpu.infer_actors, gpu.gpus_per_infer_actor, gpu.decode_actors, gpu.batch_size) == (4, 1.0, 12, 32)
    cpu = plan_resources(cfg, {"CPU": 2.0})
    assert (cpu.infer_actors, cpu.gpus_per_infer_actor, cpu.decode_actors, cpu.batch_size) == (1, 0.0, 1, 8)
    half = plan_resources(dataclasses.replace(cfg, gpus_per_infer_actor=0.5, batch_size=12), {"CPU": 8.0, "GPU": 2.0})
    assert (half.infer_actors, half.decode_actors, half.batch_size) == (4, 4, 12)


def test_gpus_the_cluster_lacks_are_named_at_once():
    """--gpus-per-actor on a cluster without (enough) GPUs: the run says at once that its
    inference actors wait for a GPU node and when the watchdog gives up, instead of waiting
    silently."""
    from pipelines.graph import gpu_shortfall, plan_resources

    cfg = PipelineConfig(input="x", out="y", gpus_per_infer_actor=1.0)
    cpu_only = {"CPU": 2.0}
    message = gpu_shortfall(plan_resources(cfg, cpu_only), cpu_only, 960.0)
    assert message is not None
    assert "1 GPU each" in message and "0 GPU(s) now" in message and "after 960 s" in message
    gpu = {"CPU": 8.0, "GPU": 2.0}
    assert gpu_shortfall(plan_resources(cfg, gpu), gpu, 960.0) is None
    # the default plan asks for no GPU on a CPU-only cluster
    assert gpu_shortfall(plan_resources(PipelineConfig(input="x", out="y"), cpu_only), cpu_only, 960.0) is None
    half = {"CPU": 4.0, "GPU": 0.5}     # less than one actor's share
    assert "0.5 GPU(s) now" in gpu_shortfall(plan_resources(cfg, half), half, None)


def test_file_info_rides_on_the_last_window(tmp_path):
    """Decode emits no separate file row for a file with windows (it would take an inference
    batch slot); the FileInfo is on its last window row and reaches the driver exactly once."""
    import salmonn
    from pipelines.infer import SalmonnPredictor
    from pipelines.sources import list_inputs
    from pipelines.stages import DecodeStage, ResultAssembler, refs_table
    from schemas import stage as cols

    write_audio(tmp_path / "a.flac", tone(440.0, 5.0, 16000), 16000, "flac")
    (tmp_path / "b.mp3").write_bytes(b"not audio" * 50)
    refs = list_inputs(str(tmp_path))
    stage = DecodeStage(DecodeOptions(window_s=2.0), windows_per_batch=64)
    (out,) = list(stage(refs_table(refs[:1])))
    assert out["kind"].to_pylist() == [cols.KIND_WINDOW] * 3
    assert [fi is not None for fi in out["file_info"].to_pylist()] == [False, False, True]
    (bad,) = list(stage(refs_table(refs[1:])))
    assert bad["kind"].to_pylist() == [cols.KIND_FILE]

    pred = SalmonnPredictor("tiny", salmonn.default_tasks(salmonn.GenerationSettings(max_new_tokens=3)))
    results = pred(out)
    assert sum(fi is not None for fi in results["file_info"].to_pylist()) == 1
    asm = ResultAssembler(["caption", "transcribe", "emotion"])
    (done,), failed = asm.add(results)
    assert not failed
    assert done.info.n_segments == 3 and len(done.segments) == 9
