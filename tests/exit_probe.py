"""A process that walks the commit path and exits: the subject of tests/test_exit_codes.py.

    python tests/exit_probe.py OUT

Writes three driver commits of 16 files each into the Delta tables under OUT (a second run
replacing some of the first one's files), compacts and checkpoints them as a run's finish does,
reads them back through the Delta log (the ledger, the latest rows, an earlier version by time
travel), prints one line and exits through ``pipelines.lifecycle`` like every entry point.
"""

from __future__ import annotations

import sys

import pyarrow as pa

import schemas
from pipelines import lifecycle
from pipelines.output import CommittedFile, Committer, OutputStore, committed_ledger
from pipelines.output.runs import RunRecord
from schemas.vocabulary import RUN_COMPLETED


def tables(run_id: str, uris: list[str], n_seg: int = 12) -> tuple[pa.Table, pa.Table, list[CommittedFile]]:
    files = pa.Table.from_pylist([
        {"file_id": f"id-{u}", "uri": u, "status": "ok", "run_id": run_id, "n_segments": n_seg,
         "duration_s": 30.0 * n_seg, "config_hash": "h"} for u in uris], schema=schemas.FILES)
    segs = pa.Table.from_pylist([
        {"file_id": f"id-{u}", "uri": u, "segment_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1),
         "task": task, "text": f"{run_id} {task} answer {i} of {u}", "finish_reason": "stop", "run_id": run_id}
        for u in uris for i in range(n_seg) for task in ("caption", "transcribe", "emotion")],
        schema=schemas.SEGMENTS)
    entries = [CommittedFile(file_id=f"id-{u}", uri=u, version="v1", config_hash="h", status="ok",
                             error_type=None, run_id=run_id, seq=0) for u in uris]
    return files, segs, entries


def main() -> int:
    store = OutputStore(sys.argv[1])
    for run_id in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"):   # what `status` lists
        store.write_run(RunRecord.from_dict({"run_id": run_id, "status": RUN_COMPLETED, "started_at": run_id[:16]}))
    first = Committer(store, "20260101T000000Z-aaaaaa")
    for k in range(2):
        first.commit(*tables(first.run_id, [f"/a/{k}-{i:02d}.mp3" for i in range(16)]))
    first.finish()
    second = Committer(store, "20260102T000000Z-bbbbbb")
    second.commit(*tables(second.run_id, [f"/a/0-{i:02d}.mp3" for i in range(8)] + [f"/a/2-{i:02d}.mp3" for i in range(8)]))
    second.finish()
    ledger = committed_ledger(store)
    files, segs = store.read_table("files"), store.read_table("segments")
    earlier = store.read_run_rows("segments", first.run_id)
    assert len(ledger) == files.num_rows == 40 and segs.num_rows == 40 * 36, (len(ledger), files.num_rows, segs.num_rows)
    assert earlier.num_rows == 32 * 36, earlier.num_rows
    # last, what a run's driver does before it exits: the ledger and filtered reads, each scan
    # returning just before the next (and the process's end)
    for k in range(4):
        assert len(committed_ledger(store)) == 40
        assert store.read_table("segments", file_ids=[f"id-/a/1-{k:02d}.mp3"]).num_rows == 36
    print(f"exit_probe: {files.num_rows} files, {segs.num_rows} segment rows, {earlier.num_rows} by time travel")
    return 0


if __name__ == "__main__":
    lifecycle.main(main)
