"""`salmonn-pipeline status OUT`: runs, counts and error types, from the Delta tables and run records;
first, whether every data file the tables reference exists (a table that lost one raises
``TableDamaged``: one line per table, and the command that repairs it)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import pyarrow.compute as pc

from pipelines.output import TABLE_NAMES, OutputStore, RunRecord
from pipelines.output.health import TableDamaged, check_tables


@dataclasses.dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str
    started_at: str | None
    finished_at: str | None
    resumes: int
    n_commits: int                 # complete driver commits (the files table's transaction version)
    files: dict[str, int]          # status -> count of this run's rows in the latest view
    error_types: dict[str, int]
    segment_rows: int              # this run's rows in the latest segments view
    audio_hours: float
    error: str | None = None       # a failed run's one-line reason (run.json)
    removed: int = 0               # files gone from the run's input scope whose rows it removed (run.json)
    reused: int = 0                # this run's rows in the latest view that copied another uri's results


def run_statuses(store: OutputStore) -> list[RunStatus]:
    runs = store.list_runs()
    files_dt = store.table("files")
    files = store.read_table("files", columns=["run_id", "status", "error_type", "duration_s", "reused_from"])
    seg_runs = store.read_table("segments", columns=["run_id"])["run_id"]
    seg_counts = {d["values"]: d["counts"] for d in pc.value_counts(seg_runs).to_pylist()} if len(seg_runs) else {}
    by_run: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in files.to_pylist():
        by_run[row["run_id"]].append(row)
    out = []
    for run_id in runs:
        rec = store.read_run(run_id) or RunRecord(run_id=run_id, status="unknown")
        rows = by_run.get(run_id, [])
        n_commits = (files_dt.transaction_version(run_id) or 0) if files_dt is not None else 0
        out.append(RunStatus(
            run_id=run_id, status=rec.status, started_at=rec.started_at,
            finished_at=rec.finished_at, resumes=len(rec.resumes),
            n_commits=n_commits or len(rec.legacy_commits or []),
            files=dict(collections.Counter(r["status"] for r in rows)),
            error_types=dict(collections.Counter(r["error_type"] for r in rows if r["error_type"])),
            segment_rows=seg_counts.get(run_id, 0),
            audio_hours=sum(r["duration_s"] or 0.0 for r in rows) / 3600,
            error=rec.error,
            removed=rec.removed,
            reused=sum(1 for r in rows if r["reused_from"] is not None),
        ))
    return out


def status_text(out: str, storage_options: Mapping[str, Any] | None = None) -> str:
    store = OutputStore(out, storage_options)
    # the data files each table references exist (one listing per table, no file opened): a
    # damaged table raises TableDamaged, one line per table (pipelines.output.health)
    health = {d.table: d for d in check_tables(store)}
    damaged = [d for d in health.values() if d.damaged]
    if damaged:
        raise TableDamaged(store.out, damaged, store.repair_command())
    runs = run_statuses(store)
    if not runs:
        return f"{out}: no runs"
    lines = [f"{out}: {len(runs)} run(s) (counts: each run's rows in the latest view; a file processed "
             f"again counts for the newer run)"]
    for r in runs:
        files = ", ".join(f"{k} {v}" for k, v in sorted(r.files.items())) or "no files"
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.error_types.items())) or "none"
        lines.append(
            f"  {r.run_id}  {r.status:<11} started {r.started_at or '?'}  finished {r.finished_at or '-'}"
            f"{f'  resumed x{r.resumes}' if r.resumes else ''}\n"
            f"      {r.n_commits} commits | files: {files} | error types: {errs} | "
            f"{r.segment_rows} segment rows | {r.audio_hours:.3f} audio h | removed {r.removed}, reused {r.reused}"
            + (f"\n      failed: {r.error} (traceback: {out.rstrip('/')}/_runs/{r.run_id}/error.txt; "
               f"the same command resumes the run)" if r.error else "")
        )
    latest = store.read_table("files", columns=["status"])
    c = collections.Counter(latest["status"].to_pylist())
    lines.append(f"latest view: {latest.num_rows} files ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})")
    tables = []
    for name in TABLE_NAMES[::-1]:
        dt_ = store.table(name)
        if dt_ is None:
            continue
        untracked = store.untracked_files(name)
        n_data = health[name].referenced if name in health else len(store.data_files(name))
        tables.append(f"{name} version {dt_.version()}, {n_data} data files"
                      + (" (all present)" if name in health else "")
                      + (f", {len(untracked)} untracked file(s) ignored (`salmonn-pipeline maintain "
                         f"--vacuum-hours H` removes them)" if untracked else ""))
    if tables:
        lines.append("Delta tables: " + "; ".join(tables))
    return "\n".join(lines)
