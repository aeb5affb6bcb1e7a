"""The run record, ``OUT/_runs/<RUN>/run.json``: one typed dataclass, written and read here only.

A run writes its record when it starts (status ``running``), after the removal and reuse commits,
and when it ends (``completed``, ``interrupted`` or ``failed`` with a one-line reason); ``status``
and ``report`` read it back. Every field has a default, so records written by earlier versions
(or by ``migrate``) read with what they lack left at its default; keys this version does not know
are kept in ``extra`` and written back unchanged.

Credentials never reach a record: storage options pass through :func:`pipelines.output.store.redact`
before they are stored (:meth:`RunRecord.for_run` does it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from schemas.vocabulary import RUN_COMPLETED

STAGE_TIMES_KEY = "stage_times"   # list of {"name", "wall_s", "task_s", "tasks"}, one per operator and pass


@dataclasses.dataclass
class RunCounts:
    """What an attempt of a run did (``removed`` and ``reused``: over all attempts of the run)."""

    n_inputs: int = 0          # files listed
    skipped: int = 0           # unchanged files (already committed under this config)
    processed: int = 0         # files committed from the graph (ok + partial + error)
    ok: int = 0
    partial: int = 0
    error: int = 0
    error_types: dict[str, int] = dataclasses.field(default_factory=dict)
    audio_hours: float = 0.0
    wall_s: float = 0.0
    removed: int = 0
    reused: int = 0
    n_todo: int = 0            # files the plan gave to process or reuse
    n_to_process: int = 0      # of those, the ones sent through the graph
    commit_s: float = 0.0      # driver time spent committing
    ray_init_s: float = 0.0
    hashed_files: int = 0      # local files whose content key was computed
    hashed_bytes: int = 0
    hash_s: float = 0.0
    # driver wall time by phase: list (the inputs), ledger (the files table, the removals, the run
    # record), reuse (content keys of possible copies and their sources), remove and reuse_commit
    # (those commits), ray_init, graph (the Ray Data passes, driver commits included: commit_s of
    # it), finish (compaction and checkpoints), index (the search index)
    phases_s: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunRecord:
    run_id: str
    status: str
    input: str = ""
    out: str = ""
    model: str | None = None
    model_id: str | None = None
    config_hash: str | None = None
    pipeline_version: str | None = None
    schema_version: str | None = None
    tasks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    decode: dict[str, Any] = dataclasses.field(default_factory=dict)
    speech_gate: dict[str, Any] = dataclasses.field(default_factory=dict)
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    out_storage_options: dict[str, Any] | None = None
    batch_size: int | None = None
    engine: str | None = None          # as asked; resources["engine"]: what the passes ran
    keep_removed: bool = False
    max_removed: float | None = None
    max_removed_files: int | None = None
    started_at: str | None = None
    resumes: list[str] = dataclasses.field(default_factory=list)
    finished_at: str | None = None
    n_inputs: int = 0
    n_todo: int = 0
    skipped: int = 0
    mirror: dict[str, Any] = dataclasses.field(default_factory=dict)   # scope, indexed_in_scope, to_remove
    counts: RunCounts | None = None
    resources: dict[str, Any] | None = None    # what the first pass planned (None: no Ray needed)
    error: str | None = None
    stage_times: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    n_commits_this_attempt: int | None = None
    legacy_commits: list[dict[str, Any]] | None = None   # runs of the earlier layout (migrate)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)    # keys of other versions, kept

    @property
    def completed(self) -> bool:
        return self.status == RUN_COMPLETED

    @property
    def removed(self) -> int:
        return self.counts.removed if self.counts is not None else 0

    @property
    def reused(self) -> int:
        return self.counts.reused if self.counts is not None else 0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "counts")}
        d["counts"] = dataclasses.asdict(self.counts) if self.counts is not None else None
        if self.legacy_commits is None:
            del d["legacy_commits"]
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        counts = kwargs.pop("counts", None)
        if isinstance(counts, Mapping):
            known = {f.name for f in dataclasses.fields(RunCounts)}
            kwargs["counts"] = RunCounts(**{k: v for k, v in counts.items() if k in known})
        for key in ("resumes", "tasks", "stage_times"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        for key in ("decode", "speech_gate", "storage_options", "mirror"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})
