"""Time per pipeline stage, as numbers: taken from Ray Data's structured stats, kept in run.json.

The driver calls :func:`from_ray_summary` on each pass's dataset (``ds._get_stats_summary()``,
Ray Data's own per-operator record, the same numbers its ``stats()`` text prints) and appends
:func:`to_record` of the result to the run record under :data:`RECORD_KEY`; ``report`` reads them
back with :func:`from_record`, summed over passes and resumes. Nothing parses the human-readable
``stats()`` text, whose wording changes between Ray versions. This module imports no Ray: the
summary object is read by attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

RECORD_KEY = "stage_times"   # run.json: list of {"name", "wall_s", "task_s", "tasks"}, one per operator and pass


@dataclasses.dataclass(frozen=True)
class StageTime:
    name: str        # Ray Data operator, e.g. "MapBatches(DecodeStage)"
    wall_s: float    # the operator's wall time, first task start to last task end
    task_s: float    # wall time summed over its tasks (work done by all its workers)
    tasks: int       # tasks executed


def from_ray_summary(summary: Any) -> list[StageTime]:
    """One :class:`StageTime` per operator of a Ray Data ``DatasetStatsSummary`` (upstream
    operators first, as the dataset's parents hold them)."""
    out: list[StageTime] = []
    for parent in getattr(summary, "parents", None) or []:
        out.extend(from_ray_summary(parent))
    for op in getattr(summary, "operators_stats", None) or []:
        wall = getattr(op, "wall_time", None)
        rows = getattr(op, "task_rows", None)
        out.append(StageTime(
            name=str(op.operator_name),
            wall_s=float(getattr(op, "time_total_s", 0.0) or 0.0),
            task_s=float(wall.sum) if wall is not None else 0.0,
            tasks=int(rows.count) if rows is not None else 0,
        ))
    return out


def to_record(times: Iterable[StageTime]) -> list[dict[str, Any]]:
    """JSON-ready entries for the run record."""
    return [dataclasses.asdict(t) for t in times]


def from_record(entries: Iterable[Mapping[str, Any]] | None) -> list[StageTime]:
    """Entries of one or more passes summed per operator name, in first-seen order."""
    sums: dict[str, list[float]] = {}
    for e in entries or []:
        acc = sums.setdefault(str(e["name"]), [0.0, 0.0, 0.0])
        acc[0] += float(e.get("wall_s") or 0.0)
        acc[1] += float(e.get("task_s") or 0.0)
        acc[2] += int(e.get("tasks") or 0)
    return [StageTime(name, wall, task, int(n)) for name, (wall, task, n) in sums.items()]
