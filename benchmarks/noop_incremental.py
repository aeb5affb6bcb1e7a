"""No-op incremental run: how long a nightly run takes when nothing changed.

Makes N small audio files, commits them (through the real Committer, in commits of 32 files as
a run would, with the real versions and config hash, so no model has to run), then times
``run_pipeline`` on the unchanged folder against the listing alone (its floor).

    .venv/bin/python benchmarks/noop_incremental.py --files 1000
Final line: ``noop_incremental: N files, no-op run / listing = R x``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa

import schemas
from pipelines.config import config_hash_of
from pipelines.output import CommittedFile, Committer, OutputStore, new_run_id
from pipelines.output.runs import RunRecord
from pipelines.run import PipelineConfig, run_pipeline
from pipelines.sources import list_inputs
from schemas.vocabulary import RUN_COMPLETED


def write_wav(path: Path, seconds: float = 0.5, sr: int = 16000) -> None:
    pcm = (np.sin(np.arange(int(seconds * sr)) * 0.1) * 8000).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm)
    path.write_bytes(buf.getvalue())


def commit_all(cfg: PipelineConfig, per_commit: int = 32) -> None:
    refs = list_inputs(cfg.input)
    chash = config_hash_of(cfg)
    store = OutputStore(cfg.out)
    run_id = new_run_id()
    committer = Committer(store, run_id)
    for i in range(0, len(refs), per_commit):
        chunk = refs[i:i + per_commit]
        files = pa.Table.from_pylist([{"file_id": r.file_id, "uri": r.uri, "status": "ok", "run_id": run_id,
                                       "n_segments": 1, "duration_s": 0.5, "config_hash": chash} for r in chunk],
                                     schema=schemas.FILES)
        entries = [CommittedFile(r.file_id, r.uri, r.version, chash, "ok", None, run_id, 0) for r in chunk]
        committer.commit(files, schemas.SEGMENTS.empty_table(), entries)
    store.write_run(RunRecord(run_id=run_id, status=RUN_COMPLETED, config_hash=chash, input=cfg.input))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio"
        audio.mkdir()
        for i in range(args.files):
            write_wav(audio / f"ep{i:05d}.wav")
        cfg = PipelineConfig(input=str(audio), out=str(Path(tmp) / "out"), progress=False)
        commit_all(cfg)
        listing, noop = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            list_inputs(cfg.input)
            listing.append(time.perf_counter() - t)
            t = time.perf_counter()
            summary = run_pipeline(cfg)
            noop.append(time.perf_counter() - t)
            assert summary.processed == 0 and summary.skipped == args.files, summary.format()
        lst, run = statistics.median(listing), statistics.median(noop)
        print(f"files: {args.files}")
        print(f"listing alone:   {lst * 1000:8.1f} ms (median of {args.repeats})")
        print(f"no-op run:       {run * 1000:8.1f} ms (listing + manifest + skip decisions + run record)")
        print(f"noop_incremental: {args.files} files, no-op run / listing = {run / lst:.1f}x "
              f"({run:.3f} s for the whole run)")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
