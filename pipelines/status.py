"""`salmonn-pipeline status OUT`: runs, counts and error types, from manifest-listed parts only."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

from pipelines import commit as cm


@dataclasses.dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str
    started_at: str | None
    finished_at: str | None
    resumes: int
    n_commits: int
    files: dict[str, int]          # status -> count (committed, listed parts only)
    error_types: dict[str, int]
    segment_rows: int
    audio_hours: float
    unlisted_parts: int            # debris of interrupted commits, ignored


def run_statuses(store: cm.OutputStore) -> list[RunStatus]:
    out = []
    for run_id in store.list_runs():
        rec = store.read_run(run_id) or {}
        commits = store.commits(run_id)
        files = store.read_parts("files", commits)
        by_status = collections.Counter(files["status"].to_pylist())
        errors = collections.Counter(e for e in files["error_type"].to_pylist() if e)
        audio_s = sum(d or 0.0 for d in files["duration_s"].to_pylist())
        out.append(RunStatus(
            run_id=run_id, status=rec.get("status", "unknown"), started_at=rec.get("started_at"),
            finished_at=rec.get("finished_at"), resumes=len(rec.get("resumes", [])), n_commits=len(commits),
            files=dict(by_status), error_types=dict(errors), segment_rows=sum(c.n_segments for c in commits),
            audio_hours=audio_s / 3600, unlisted_parts=len(store.orphan_parts(run_id)),
        ))
    return out


def status_text(out: str, storage_options: Mapping[str, Any] | None = None) -> str:
    store = cm.OutputStore(out, storage_options)
    runs = run_statuses(store)
    if not runs:
        return f"{out}: no runs"
    lines = [f"{out}: {len(runs)} run(s)"]
    for r in runs:
        files = ", ".join(f"{k} {v}" for k, v in sorted(r.files.items())) or "no files"
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.error_types.items())) or "none"
        lines.append(
            f"  {r.run_id}  {r.status:<11} started {r.started_at or '?'}  finished {r.finished_at or '-'}"
            f"{f'  resumed x{r.resumes}' if r.resumes else ''}\n"
            f"      {r.n_commits} commits | files: {files} | error types: {errs} | "
            f"{r.segment_rows} segment rows | {r.audio_hours:.3f} audio h"
            + (f" | {r.unlisted_parts} unlisted part(s) ignored" if r.unlisted_parts else "")
        )
    latest = store.read_table("files", latest=True)
    c = collections.Counter(latest["status"].to_pylist())
    lines.append(f"latest view: {latest.num_rows} files ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})")
    return "\n".join(lines)
