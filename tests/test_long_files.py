"""Hour-long files end to end, at the lengths users have (podcasts and films run 1-3 h).

A one-hour MP3 and a two-hour Opus file (speech-like audio and pauses, low bit rate; encoded once
and muxed repeatedly so they are cheap to make) go through the real CLI and the real Ray graph
with short and broken files beside them, from a local folder and from the moto S3 server: one
files row each, ``ceil(duration / window)`` rows per task, contiguous timestamps, nothing
duplicated; the same tables whatever the inference batch size and the decode block size (8 and 4
by default; 32 and 7 from S3; 1 and 1 in the run that is stopped twice); a driver stopped during
the two-hour file by SIGTERM (143, interrupted, complete files committed), then SIGKILLed in its
resumed attempt, resumes to exactly-once output; and FFmpeg reads every exported subtitle whole.
"""

from __future__ import annotations

import math
import signal
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from pipelines.cli import main as cli_main
from pipelines.output import OutputStore
from pipelines.synth import noise, silence, speech_like, tone, write_audio
from schemas.vocabulary import RUN_COMPLETED, RUN_RUNNING
from tests.driver_kill import CLI, kill_driver_when, signal_driver_when

pytestmark = pytest.mark.slow

WINDOW_S = 30.0
CHUNK_S = 47.0          # speech then a pause; not a multiple of the window
LONG = {"two_hours.opus": ("opus", 154), "one_hour.mp3": ("mp3", 77)}   # name -> (format, repeats)
SHORT = {"short.wav": ("wav", 12.5), "clip.flac": ("flac", 61.0), "talk.m4a": ("m4a", 31.0)}
BROKEN = {"broken.mp3": "invalid_data", "empty.opus": "empty_file"}
# Cheap generation: one task, two new tokens per window.
RUN_ARGS = ["--tasks", "transcribe", "--max-new-tokens", "2", "--no-progress", "--num-cpus", "2",
            "--flush-files", "1", "--flush-seconds", "0"]


def _chunk(sr: int) -> np.ndarray:
    talk = speech_like(CHUNK_S - 9.0, sr, seed=3)
    return np.concatenate([talk, silence(9.0, sr)], axis=1)   # (1, N)


def decoded_seconds(path: Path) -> float:
    """The file's duration as FFmpeg decodes it (samples / rate), independently of the pipeline.
    Each muxed repeat of an encode carries the encoder's delay and padding, so this is a little
    longer than repeats x chunk."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)) / stream.codec_context.sample_rate


def make_archive(directory: Path) -> dict[str, float]:
    """The long files, short ones and broken ones; returns name -> decoded duration (good files)."""
    directory.mkdir(parents=True, exist_ok=True)
    durations = {}
    for name, (fmt, repeats) in LONG.items():
        write_audio(directory / name, _chunk(16000), 16000, fmt, bit_rate=16000, repeats=repeats,
                    muxer_options={"write_xing": "0"} if fmt == "mp3" else None)
        durations[name] = decoded_seconds(directory / name)
        assert durations[name] >= repeats * CHUNK_S
    for i, (name, (fmt, seconds)) in enumerate(SHORT.items()):
        sig = [tone(330.0, seconds, 22050), noise(seconds, 22050), speech_like(seconds, 22050, seed=i)][i % 3]
        write_audio(directory / name, sig, 22050, fmt)
        durations[name] = decoded_seconds(directory / name)
    (directory / "broken.mp3").write_bytes(b"ID3 this is no mp3 at all" * 300)
    (directory / "empty.opus").write_bytes(b"")
    return durations


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    d = tmp_path_factory.mktemp("long") / "audio"
    return d, make_archive(d)


@pytest.fixture(scope="module")
def reference_out(archive, tmp_path_factory) -> Path:
    """The archive through the CLI from a local folder with the default batch sizes: its OUT."""
    audio, _ = archive
    out = tmp_path_factory.mktemp("long-out") / "out"
    assert cli_main(["run", str(audio), "--out", str(out), *RUN_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def reference(archive, reference_out) -> dict:
    return check_tables(OutputStore(str(reference_out)), archive[1])


def check_tables(store: OutputStore, durations: dict[str, float]) -> dict:
    """One files row per input; ceil(duration / window) rows per task, contiguous, no duplicate.
    Returns {name: (files row, [segment rows])} for comparisons."""
    files = store.read_table("files", latest=True).to_pylist()
    segs = store.read_table("segments", latest=True).to_pylist()
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in files}
    assert sorted(by_name) == sorted([*durations, *BROKEN]) and len(files) == len(by_name)
    for name, etype in BROKEN.items():
        assert (by_name[name]["status"], by_name[name]["error_type"]) == ("error", etype)
    out = {}
    for name, seconds in durations.items():
        row = by_name[name]
        assert row["status"] == "ok", row
        assert row["duration_s"] == pytest.approx(seconds, abs=0.05), name
        n_samples = round(row["duration_s"] * 16000)
        assert row["n_segments"] == math.ceil(n_samples / (WINDOW_S * 16000)), name
        rows = sorted((s for s in segs if s["file_id"] == row["file_id"]), key=lambda s: s["segment_index"])
        assert [s["segment_index"] for s in rows] == list(range(row["n_segments"])), f"{name}: missing/duplicate"
        assert {s["task"] for s in rows} == {"transcribe"}
        assert rows[0]["start_s"] == 0.0
        assert all(a["end_s"] == b["start_s"] for a, b in zip(rows, rows[1:])), f"{name}: gap or overlap"
        assert rows[-1]["end_s"] == pytest.approx(row["duration_s"], abs=1e-6)
        assert all(s["end_s"] - s["start_s"] <= WINDOW_S + 1e-9 for s in rows)
        out[name] = (row, rows)
    assert len(segs) == sum(len(v[1]) for v in out.values()), "segment rows of no input file"
    return out


def comparable(tables: dict) -> dict:
    """Everything but the run's own fields (run id, timing) and where the file was read from (its content
    key too: an S3 ETag there, a sha256 here)."""
    skip = {"run_id", "processed_at", "mtime", "etag", "version", "uri", "file_id", "size_bytes", "content_hash"}
    return {name: ({k: v for k, v in row.items() if k not in skip},
                   [{k: v for k, v in s.items() if k not in skip} for s in rows])
            for name, (row, rows) in tables.items()}


def test_hour_long_files_through_the_cli(reference):
    """1 h and 2 h files among short and broken ones: exit 0 (in the fixture), complete tables."""
    assert reference["two_hours.opus"][0]["n_segments"] == math.ceil(154 * CHUNK_S / WINDOW_S)
    assert reference["one_hour.mp3"][0]["n_segments"] == math.ceil(77 * CHUNK_S / WINDOW_S)


def test_same_tables_from_s3_with_batch_32_and_blocks_of_7(archive, reference, s3_server, s3fs_client,
                                                           s3_storage_options, tmp_path):
    audio, durations = archive
    s3fs_client.mkdir("long-in")
    for p in sorted(audio.iterdir()):
        s3fs_client.put_file(str(p), f"long-in/{p.name}")
    endpoint = s3_storage_options["client_kwargs"]["endpoint_url"]
    out = tmp_path / "out"
    args = ["run", "s3://long-in/", "--out", str(out), *RUN_ARGS, "--batch-size", "32", "--windows-per-batch", "7",
            "--storage-option", f"client_kwargs.endpoint_url={endpoint}",
            "--storage-option", f"key={s3_storage_options['key']}",
            "--storage-option", f"secret={s3_storage_options['secret']}",
            "--out-storage-option", "auto_mkdir=true"]
    assert cli_main(args) == 0
    got = check_tables(OutputStore(str(out)), durations)
    assert comparable(got) == comparable(reference)


def _committed_names(out: Path) -> set[str]:
    try:
        files = OutputStore(str(out)).read_table("files")
    except Exception:  # noqa: BLE001 - not written yet, or mid-commit
        return set()
    return {u.rsplit("/", 1)[-1] for u in files["uri"].to_pylist()}


def test_sigterm_then_sigkill_during_the_two_hour_file_then_resume_exactly_once(archive, reference, tmp_path):
    """A run stopped twice while the two-hour file is in flight, and resumed each time:

    1. SIGTERM (a pod eviction, `ray job stop`): the driver exits 143 well inside Kubernetes' 30 s
       grace period, the run record says interrupted, the files that were complete are committed;
    2. the same command resumes it, and its driver is SIGKILLed (a crash): nothing is recorded;
    3. the same command finishes the run: every row exactly once, across every version of the
       tables, and the reference run's tables (with batch 1 and decode blocks of 1 window here)."""
    audio, durations = archive
    out = tmp_path / "out"
    # batch 1, decode blocks of 1 window: the tables must still be the reference's (batch 8, blocks 4)
    cmd = [*CLI, "run", str(audio), "--out", str(out), *RUN_ARGS, "--batch-size", "1", "--windows-per-batch", "1",
           "--prefetch-batches", "2"]
    # 1. every short and broken file committed: the long files are what is left in flight
    ended = signal_driver_when(cmd, lambda: (set(SHORT) | set(BROKEN)) <= _committed_names(out), timeout_s=600,
                               what="the long files were in flight", after_s=3, sig=signal.SIGTERM, grace_s=30)
    print(f"SIGTERM during the two-hour file: exit {ended.returncode} after {ended.exit_s:.1f} s")
    assert ended.returncode == 143, ended.stderr[-3000:]
    assert ended.exit_s < 30
    assert "interrupted by SIGTERM" in ended.stderr
    assert "Aborted" not in ended.stderr and "terminate called" not in ended.stderr
    store = OutputStore(str(out))
    (run_id,) = store.list_runs()
    rec = store.read_run(run_id)
    assert rec.status == "interrupted" and rec.error == "interrupted by SIGTERM"
    committed = _committed_names(out)
    assert (set(SHORT) | set(BROKEN)) <= committed and "two_hours.opus" not in committed
    assert rec.counts.processed == len(committed)

    # 2. the resumed attempt, killed hard while it works on the two-hour file
    resumed = lambda: len(getattr(store.read_run(run_id), "resumes", [])) == 1   # noqa: E731
    kill_driver_when(cmd, resumed, timeout_s=120, what="the resumed attempt started", after_s=12)
    assert "two_hours.opus" not in _committed_names(out), "the kill landed after the two-hour file was committed"
    rec = store.read_run(run_id)
    assert rec.status == RUN_RUNNING and len(rec.resumes) == 1   # a SIGKILL records nothing

    # 3. the same command again: completed, exactly once, the reference's rows
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(resumed)" in done.stdout
    rec = store.read_run(run_id)
    assert store.list_runs() == [run_id] and rec.status == RUN_COMPLETED and len(rec.resumes) == 2
    files = store.read_table("files").to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in files) == sorted([*durations, *BROKEN])
    got = check_tables(store, durations)
    assert comparable(got) == comparable(reference)


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_every_exported_subtitle_of_the_hour_long_files_is_read_whole_by_ffmpeg(reference, reference_out, fmt,
                                                                                tmp_path):
    """A control character in one answer (a NUL ends FFmpeg's parse) must not cost the rest of a
    film's subtitles: FFmpeg's demuxer reads as many cues as each file has rows with text."""
    from pipelines.ops import export

    with_text = {name.rsplit(".", 1)[0]: sum(1 for s in rows if s["text"] and export.cue_text(s["text"]))
                 for name, (_, rows) in reference.items()}
    assert with_text["two_hours"] > 100 and with_text["one_hour"] > 50
    written = export.export(str(reference_out), fmt=fmt, task="transcribe", to=str(tmp_path))
    assert len(written.files) == sum(1 for n in with_text.values() if n)
    for path in written.files:
        with av.open(path) as c:
            cues = sum(1 for p in c.demux(c.streams.subtitles[0]) if p.size)
        want = with_text[Path(path).name.rsplit(".", 1)[0]]
        assert cues == want, f"{path}: FFmpeg read {cues} of {want} cues"
