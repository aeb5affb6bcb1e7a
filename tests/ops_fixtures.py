"""Run outputs for the operator-tool tests (plan, report, export), written without Ray or a model.

Two runs under one OUT, committed with the real Committer and run records:

run 1 (RUN1): seven files of an archive under PREFIX, in two commits
    ep01.mp3              ok       75 s  3 windows
    ep02.wav              ok       40 s  2 windows
    ep03.flac             partial  45 s  2 windows (decode_error part-way)
    ep04.mp3              error    invalid_data
    ep05.m4a              error    no_audio_stream
    interviews/ep06.mp3   ok      130 s  5 windows
    ep07.mp3              error    read_error (transient)
run 2 (RUN2): ep01.mp3 changed (new texts, "v2") and ep07.mp3 retried (now ok, 20 s).

Every window has transcribe, caption and emotion rows with contiguous timestamps; emotion rows
carry model-style answers and their label (as the pipeline fills it).
"""

from __future__ import annotations

import datetime as dt
import math
import random

import pyarrow as pa

import schemas
from pipelines.labels import segment_label
from pipelines.output import RUNS_DIR, CommittedFile, Committer, OutputStore
from pipelines.output.runs import RunRecord
from schemas.vocabulary import RUN_COMPLETED

RUN1 = "20260101T020000Z-aaaaaa"
RUN2 = "20260102T020000Z-bbbbbb"
PREFIX = "/data/podcasts/"
CHASH = "cafe0123456789ab"
MODEL_ID = "salmonn-13b"
TASKS = ("transcribe", "caption", "emotion")

EMOTION_ANSWERS = ("Neutral.", "The speaker sounds happy.", "Excited", "I think the speaker is sad.", "calm",
                   "The speaker sounds angry", "Surprised!", "neutral tone")
SENTENCES = (
    "Welcome back to the show, today we talk about the history of radio.",
    "Our guest spent twenty years building transmitters in the mountains.",
    "She explains why long wave signals travel so far at night.",
    "Then we take a short break for a word from our sponsors.",
    "After the break we answer questions sent in by listeners.",
    "The first question is about antennas for small apartments.",
    "We close with a song recorded live in the studio last week.",
)
CAPTIONS = ("A man speaks in a quiet room.", "A woman talks while soft music plays in the background.",
            "Two people are having a conversation with light laughter.", "Speech with a low hum in the background.")

T0 = dt.datetime(2026, 1, 1, 2, 0, 0, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 1, 2, 2, 0, 0, tzinfo=dt.UTC)

# uri suffix -> (status, error_type, duration_s, container, codec)
RUN1_FILES = {
    "ep01.mp3": ("ok", None, 75.0, "mp3", "mp3"),
    "ep02.wav": ("ok", None, 40.0, "wav", "pcm_s16le"),
    "ep03.flac": ("partial", "decode_error", 45.0, "flac", "flac"),
    "ep04.mp3": ("error", "invalid_data", None, None, None),
    "ep05.m4a": ("error", "no_audio_stream", None, "mov,mp4,m4a,3gp,3g2,mj2", None),
    "interviews/ep06.mp3": ("ok", None, 130.0, "mp3", "mp3"),
    "ep07.mp3": ("error", "read_error", None, None, None),
}
RUN2_FILES = {
    "ep01.mp3": ("ok", None, 75.0, "mp3", "mp3"),
    "ep07.mp3": ("ok", None, 20.0, "mp3", "mp3"),
}

RAY_STATS = """Operator 0 FromItems: 1 tasks executed, 7 blocks produced in 0.05s
* Remote wall time: 675.14us min, 24.29ms max, 5.52ms mean, 27.59ms total
* Remote cpu time: 658.15us min, 23.11ms max, 5.25ms mean, 26.25ms total

Operator 1 MapBatches(DecodeStage): 7 tasks executed, 14 blocks produced in 41.3s
* Remote wall time: 205.17ms min, 12.65s max, 5.67s mean, 39.7s total
* Remote cpu time: 5.62ms min, 11.03s max, 4.27s mean, 29.9s total

Operator 2 MapBatches(SalmonnPredictor): 14 tasks executed, 14 blocks produced in 2.4min
* Remote wall time: 1.02s min, 20.44s max, 9.55s mean, 2.2min total
* Remote cpu time: 2.14ms min, 6.26ms max, 3.14ms mean, 15.7ms total

Dataset throughput:
\t* Ray Data throughput: 14.194290462771747 rows/s
"""


def file_id(uri: str) -> str:
    from pipelines.sources import file_id_for

    return file_id_for(uri)


def windows(duration: float | None, window: float = 30.0) -> list[tuple[float, float]]:
    if not duration:
        return []
    n = math.ceil(duration / window)
    return [(i * window, min(duration, (i + 1) * window)) for i in range(n)]


def tables(run_id: str, files: dict[str, tuple], processed_at: dt.datetime, *, version: str = "v1",
           text_tag: str = "", chash: str = CHASH, seed: int = 0, tasks=TASKS):
    rng = random.Random(seed)
    frows, srows, entries = [], [], []
    for suffix, (status, etype, dur, container, codec) in files.items():
        uri = PREFIX + suffix
        fid = file_id(uri)
        wins = windows(dur)
        frows.append({
            "file_id": fid, "uri": uri, "size_bytes": int((dur or 1.0) * 16000), "etag": None,
            "mtime": T0 - dt.timedelta(days=3), "status": status, "error_type": etype,
            "error_message": f"{etype}: simulated" if etype else None, "container": container, "codec": codec,
            "sample_rate_in": 44100 if dur else None, "channels_in": 2 if dur else None, "duration_s": dur,
            "n_segments": len(wins), "run_id": run_id, "model_id": MODEL_ID, "config_hash": chash,
            "pipeline_version": "0.1.0", "processed_at": processed_at,
        })
        for i, (start, end) in enumerate(wins):
            for task in tasks:
                if task == "transcribe":
                    text = f"{text_tag}{rng.choice(SENTENCES)}"
                elif task == "caption":
                    text = f"{text_tag}{rng.choice(CAPTIONS)}"
                else:
                    text = rng.choice(EMOTION_ANSWERS)
                srows.append({
                    "file_id": fid, "uri": uri, "segment_index": i, "start_s": start, "end_s": end, "task": task,
                    "prompt": f"prompt for {task}", "text": text, "lora_scale": 4.0, "num_beams": 1,
                    "n_output_tokens": len(text.split()) * 2 + rng.randint(0, 5), "finish_reason": "stop",
                    "run_id": run_id, "model_id": MODEL_ID, "label": segment_label(task, text),
                })
        entries.append(CommittedFile(file_id=fid, uri=uri, version=version, config_hash=chash, status=status,
                                     error_type=etype, run_id=run_id, seq=0))
    return (pa.Table.from_pylist(frows, schema=schemas.FILES), pa.Table.from_pylist(srows, schema=schemas.SEGMENTS),
            entries)


def run_record(run_id: str, started: dt.datetime, finished: dt.datetime, files: dict[str, tuple], *,
               n_inputs: int, skipped: int, chash: str = CHASH) -> RunRecord:
    statuses = [v[0] for v in files.values()]
    etypes: dict[str, int] = {}
    for v in files.values():
        if v[1]:
            etypes[v[1]] = etypes.get(v[1], 0) + 1
    audio_h = sum(v[2] or 0 for v in files.values()) / 3600
    return RunRecord.from_dict({
        "run_id": run_id, "status": RUN_COMPLETED, "input": PREFIX, "out": "OUT", "model": "salmonn-13b",
        "model_id": MODEL_ID, "config_hash": chash, "pipeline_version": "0.1.0",
        "schema_version": schemas.SCHEMA_VERSION,
        "tasks": [{"name": t, "prompt": f"prompt for {t}"} for t in TASKS],
        "started_at": started.isoformat(), "finished_at": finished.isoformat(), "resumes": [],
        "counts": {"n_inputs": n_inputs, "n_todo": len(files), "skipped": skipped, "processed": len(files),
                   "ok": statuses.count("ok"), "partial": statuses.count("partial"),
                   "error": statuses.count("error"), "error_types": etypes, "audio_hours": audio_h,
                   "wall_s": (finished - started).total_seconds()},
    })


def build_two_runs(out: str) -> OutputStore:
    """The two runs described in the module docstring, under ``out``."""
    store = OutputStore(out)
    items = list(RUN1_FILES.items())
    first, second = dict(items[:4]), dict(items[4:])
    c1 = Committer(store, RUN1)
    c1.commit(*tables(RUN1, first, T0 + dt.timedelta(minutes=2), seed=1))
    c1.commit(*tables(RUN1, second, T0 + dt.timedelta(minutes=5), seed=2))
    store.write_run(run_record(RUN1, T0, T0 + dt.timedelta(minutes=5, seconds=20), RUN1_FILES,
                               n_inputs=len(RUN1_FILES), skipped=0))
    store.write_bytes(store.path(RUNS_DIR, RUN1, "ray_stats-0.txt"), RAY_STATS.encode())
    c2 = Committer(store, RUN2)
    c2.commit(*tables(RUN2, RUN2_FILES, T1 + dt.timedelta(minutes=1), version="v2", text_tag="v2 ", seed=3))
    store.write_run(run_record(RUN2, T1, T1 + dt.timedelta(minutes=1, seconds=10), RUN2_FILES,
                               n_inputs=len(RUN1_FILES), skipped=len(RUN1_FILES) - len(RUN2_FILES)))
    return store


def build_big_run(out: str, n_files: int = 80, n_commits: int = 8, seed: int = 7) -> OutputStore:
    """One larger run with varied durations, statuses and commit times (for the report's plots)."""
    rng = random.Random(seed)
    store = OutputStore(out)
    run_id = "20260105T010000Z-cccccc"
    start = dt.datetime(2026, 1, 5, 1, 0, 0, tzinfo=dt.UTC)
    errors = ("invalid_data", "no_audio_stream", "too_long", "read_error", "empty_audio")
    files: dict[str, tuple] = {}
    for i in range(n_files):
        r = rng.random()
        dur = round(rng.lognormvariate(math.log(600), 0.8), 1)
        if r < 0.08:
            files[f"show{i:03d}.mp3"] = ("error", rng.choice(errors), None, None, None)
        elif r < 0.14:
            files[f"show{i:03d}.mp3"] = ("partial", rng.choice(("decode_error", "truncated")), dur, "mp3", "mp3")
        else:
            files[f"show{i:03d}.mp3"] = ("ok", None, dur, "mp3", "mp3")
    items = list(files.items())
    per = math.ceil(len(items) / n_commits)
    committer = Committer(store, run_id)
    t = start
    for k in range(n_commits):
        chunk = dict(items[k * per:(k + 1) * per])
        if not chunk:
            break
        audio_h = sum(v[2] or 0 for v in chunk.values()) / 3600
        t = t + dt.timedelta(hours=audio_h / rng.uniform(25, 45))
        committer.commit(*tables(run_id, chunk, t, seed=100 + k))
    store.write_run(run_record(run_id, start, t + dt.timedelta(seconds=30), files, n_inputs=n_files + 12,
                               skipped=12))
    store.write_bytes(store.path(RUNS_DIR, run_id, "ray_stats-0.txt"),
                       RAY_STATS.replace("41.3s", "22.9min").replace("2.4min", "23.3min")
                       .replace("39.7s total", "31.0min total").replace("2.2min total", "22.8min total").encode())
    return store
