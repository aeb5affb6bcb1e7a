"""Reprocessing in a large table: the driver's commits, spaced out vs one every 32 files.

A run that reprocesses files already in the tables (a new model, a changed config) replaces their
rows. Delta rewrites every data file that holds any of them (copy-on-write), and file ids are
hashes, so each commit rewrites most of the ``segments`` table however few files it carries. The
driver therefore spaces its commits out (``pipelines.driver.CommitBuffer``, ``COMMIT_SHARE``): after a
commit of C seconds the next waits 9 C, and carries every file completed meanwhile. The baseline
is the same buffer without spacing (one commit every 32 files or 30 s, as before).

This builds a ``segments`` table of ``--files`` files x ``--rows`` rows (transcript-like text of
random words, so it compresses like real text) and a ``files`` table, compacted as a run leaves
them, on the local disk; then feeds ``--reprocess`` randomly chosen files of it, as complete
results, through the real ``CommitBuffer`` and ``Committer`` at ``--rate`` files per second. As in
a run, the results keep coming while the driver commits, up to ``--ahead`` files not yet taken
(the pipeline's backpressure bound), after which the producer waits. Reported for each policy:
wall time until every file is committed, the number of commits, the driver's seconds spent
committing, and the files' rows checked afterwards (each file once, the new run's rows).

    python benchmarks/commit_scale.py [--files 20000] [--rows 180] [--reprocess 800] [--rate 20]
    python benchmarks/commit_scale.py --smoke      # a small table (a test)

The last line: the baseline's wall time / the spaced commits' wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = ("caption", "transcribe", "emotion")
OLD_RUN, OLD_HASH = "20260101T000000Z-old000", "oldconfig"
WORDS = np.array(("the of and to a in that is was he for it with as his on be at by i this had not are but from or "
                  "have an they which one you were her all she there would their we him been has when who will "
                  "more no if out so said what up its about into than them can only other new some could time "
                  "these two may then do first any my now such like our over man me even most made after also "
                  "podcast episode music guest interview story question answer voice laughter applause").split())


def uri_of(i: int) -> str:
    return f"s3://archive/show/ep{i:07d}.mp3"


def build(out: str, n_files: int, rows: int, seed: int = 1) -> tuple[float, int, int]:
    """The two tables of a finished run over ``n_files`` files; returns (seconds, data files, bytes)."""
    from deltalake import write_deltalake

    import schemas
    from pipelines.output import CommittedFile, OutputStore, maintain
    from pipelines.output.commit import with_ledger_columns
    from pipelines.output.tables import WRITER_PROPERTIES, table_schema
    from pipelines.sources import file_id_for

    rng = np.random.default_rng(seed)
    store = OutputStore(out)
    store.open_for_write("files")
    store.open_for_write("segments")
    t0 = time.perf_counter()
    chunk = max(1, 600_000 // rows)
    for start in range(0, n_files, chunk):
        idx = range(start, min(n_files, start + chunk))
        uris = [uri_of(i) for i in idx]
        ids = [file_id_for(u) for u in uris]
        n = len(uris) * rows
        rep = np.repeat(np.arange(len(uris)), rows)
        n_words = rng.integers(3, 60, n)
        words = WORDS[rng.integers(0, WORDS.size, int(n_words.sum()))]
        ends = np.cumsum(n_words)
        text = [" ".join(words[e - k:e]) for e, k in zip(ends.tolist(), n_words.tolist())]
        window = np.tile(np.arange(rows // len(TASKS) + 1).repeat(len(TASKS))[:rows], len(uris))
        seg = pa.table({
            "file_id": pa.array(np.array(ids, dtype=object)[rep]), "uri": pa.array(np.array(uris, dtype=object)[rep]),
            "segment_index": pa.array(window.astype(np.int32)),
            "start_s": pa.array(window * 30.0), "end_s": pa.array(window * 30.0 + 30.0),
            "task": pa.array(np.tile(np.array(TASKS, dtype=object), n // len(TASKS) + 1)[:n]),
            "prompt": pa.array(["<Speech><SpeechHere></Speech> prompt"] * n), "text": pa.array(text),
            "lora_scale": pa.array(np.full(n, 4.0, np.float32)), "num_beams": pa.array(np.full(n, 4, np.int32)),
            "n_output_tokens": pa.array(n_words.astype(np.int32) * 2), "finish_reason": pa.array(["stop"] * n),
            "run_id": pa.array([OLD_RUN] * n), "model_id": pa.array(["salmonn-13b"] * n),
            "label": pa.array([None] * n, pa.string()), "speech_ratio": pa.array(np.ones(n, np.float32)),
        })
        seg = schemas.conform(seg, schemas.SEGMENTS).cast(table_schema("segments"))   # timed-text columns null
        write_deltalake(store.table_uri("segments"), seg, mode="append", writer_properties=WRITER_PROPERTIES)
        files = pa.Table.from_pylist([{"file_id": f, "uri": u, "status": "ok", "run_id": OLD_RUN,
                                       "config_hash": OLD_HASH, "n_segments": rows // len(TASKS),
                                       "duration_s": rows // len(TASKS) * 30.0} for f, u in zip(ids, uris)],
                                     schema=schemas.FILES)
        entries = [CommittedFile(f, u, "v1", OLD_HASH, "ok", None, OLD_RUN, 0) for f, u in zip(ids, uris)]
        files = with_ledger_columns(files, entries).cast(table_schema("files"))
        write_deltalake(store.table_uri("files"), files, mode="append", writer_properties=WRITER_PROPERTIES)
    maintain(store)
    seconds = time.perf_counter() - t0
    data = store.data_files("segments")
    return seconds, len(data), sum(os.path.getsize(p) for p in data)


def complete_file(i: int, rows: int):
    """A reprocessed file's complete result, as the assembler hands it to the driver."""
    from pipelines.decode import FileInfo
    from pipelines.sources import file_id_for
    from pipelines.stages import CompleteFile

    uri, n_win = uri_of(i), rows // len(TASKS)
    fid = file_id_for(uri)
    info = FileInfo(file_id=fid, uri=uri, status="ok", error_type=None, error_message=None, container="mp3",
                    codec="mp3", sample_rate_in=44100, channels_in=2, duration_s=n_win * 30.0, n_segments=n_win)
    segments = [{"file_id": fid, "uri": uri, "segment_index": w, "start_s": w * 30.0, "end_s": w * 30.0 + 30.0,
                 "task": t, "prompt": "p", "text": f"new answer {w} {t}", "lora_scale": 2.0, "num_beams": 4,
                 "n_output_tokens": 4, "finish_reason": "stop", "speech_ratio": 1.0}
                for w in range(n_win) for t in TASKS]
    return CompleteFile(info, segments, {})


def reprocess(out: str, picks: list[int], rows: int, rate: float, ahead: int, spaced: bool, run_id: str) -> dict:
    """Feed ``picks`` through a CommitBuffer as a run's results arriving at ``rate`` files/s."""
    from pipelines.driver import COMMIT_SHARE, CommitBuffer, Progress
    from pipelines.output import Committer, OutputStore
    from pipelines.sources import FileRef, file_id_for

    mtime = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    refs = {file_id_for(uri_of(i)): FileRef(uri_of(i), 1000, "v2", mtime, file_id_for(uri_of(i))) for i in picks}
    results = [complete_file(i, rows) for i in picks]
    store = OutputStore(out)
    buffer = CommitBuffer(Committer(store, run_id), refs, Progress(len(picks), False), run_id=run_id,
                          model_id="salmonn-13b", chash="newconfig", flush_files=32, flush_seconds=30.0,
                          commit_share=COMMIT_SHARE if spaced else None)
    gap = 1.0 / rate
    t0 = time.monotonic()
    produced = consumed = 0
    next_t = t0 + gap
    stalled = False
    while consumed < len(results):
        now = time.monotonic()
        while produced < len(results) and next_t <= now:
            if produced - consumed >= ahead:      # backpressure: the pipeline waits for the driver
                stalled = True
                break
            produced += 1
            next_t += gap
        if consumed < produced:
            buffer.add([results[consumed]])
            consumed += 1
            if stalled:                            # the producer starts again from here
                stalled, next_t = False, time.monotonic() + gap
        else:
            time.sleep(max(0.0, min(next_t - now, 0.05)))
    buffer.flush()
    wall = time.monotonic() - t0
    return {"wall_s": wall, "commits": buffer.n_commits, "commit_s": buffer.commit_s,
            "ideal_s": len(results) / rate}


def check(out: str, picks: list[int], rows: int, run_id: str) -> None:
    """Each reprocessed file once in each table, with the new run's rows only."""
    import pyarrow.compute as pc

    from pipelines.output import OutputStore
    from pipelines.sources import file_id_for

    store = OutputStore(out)
    ids = [file_id_for(uri_of(i)) for i in picks]
    files = store.read_table("files", file_ids=ids, columns=["file_id", "run_id"])
    assert files.num_rows == len(ids) and set(files["run_id"].to_pylist()) == {run_id}, "files rows"
    segs = store.read_table("segments", file_ids=ids, columns=["file_id", "run_id"])
    assert segs.num_rows == len(ids) * (rows // len(TASKS)) * len(TASKS), (segs.num_rows, len(ids))
    assert pc.all(pc.equal(segs["run_id"], run_id)).as_py(), "old rows left beside the new ones"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20_000, help="files in the table")
    ap.add_argument("--rows", type=int, default=180, help="segment rows per file (windows x 3 tasks)")
    ap.add_argument("--reprocess", type=int, default=800, help="files the run reprocesses")
    ap.add_argument("--rate", type=float, default=20.0, help="complete files per second from the pipeline")
    ap.add_argument("--ahead", type=int, default=64, help="files the pipeline may complete ahead of the driver")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "salmonn-commit-scale")
    ap.add_argument("--smoke", action="store_true", help="500 files x 30 rows, 100 reprocessed")
    args = ap.parse_args()
    if args.smoke:
        args.files, args.rows, args.reprocess, args.rate = 500, 30, 100, 200.0
    logging.basicConfig(level=logging.ERROR)
    import deltalake

    built = args.dir / f"table-{args.files}x{args.rows}"
    if not (built / "files" / "_delta_log").exists():
        shutil.rmtree(built, ignore_errors=True)
        build_s, n_data, size = build(str(built), args.files, args.rows)
        print(f"built {args.files} files x {args.rows} rows in {build_s:.0f} s", flush=True)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; deltalake "
          f"{deltalake.__version__}; local disk", flush=True)
    picks = random.Random(7).sample(range(args.files), args.reprocess)
    results = {}
    for spaced in (False, True):
        out = args.dir / "work"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(built, out)
        from pipelines.output import OutputStore

        data = OutputStore(str(out)).data_files("segments")
        run_id = f"20260601T00000{int(spaced)}Z-redo00"
        r = reprocess(str(out), picks, args.rows, args.rate, args.ahead, spaced, run_id)
        check(str(out), picks, args.rows, run_id)
        results[spaced] = r
        name = "spaced (9x the last commit)" if spaced else "every 32 files / 30 s"
        print(f"{name:28} {r['commits']:4d} commits, {r['commit_s']:7.1f} s committing, wall {r['wall_s']:7.1f} s "
              f"(results arrive over {r['ideal_s']:.1f} s); table: {args.files * args.rows:,} segment rows in "
              f"{len(data)} data file(s), {sum(os.path.getsize(p) for p in data) / 2**20:.0f} MiB", flush=True)
    base, new = results[False], results[True]
    print(f"commit_scale: reprocessing {args.reprocess} of {args.files} files: every 32 files {base['wall_s']:.1f} s / "
          f"spaced {new['wall_s']:.1f} s = {base['wall_s'] / new['wall_s']:.2f}x wall; committing "
          f"{base['commit_s']:.1f} s / {new['commit_s']:.1f} s = {base['commit_s'] / max(new['commit_s'], 1e-9):.1f}x")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
