"""A run: prepare -> plan -> apply removals and reuse -> process -> finish.

    prepare   the settings as the run uses them, the output store, the config hash
              (``pipelines.planning.prepare``); the tables' data files all there
              (``pipelines.output.health``: refuse, or repair with ``--repair``)
    plan      one listing and one read of ``files``: each file's action, the removals, the reuse
              (``pipelines.planning.make_plan``: the same plan ``salmonn-pipeline plan`` shows)
    apply     choose (or resume) the run and record it; the removal guard; commit the removals
              and the reused files (``pipelines.output.mirror``)
    process   the rest through the Ray Data graph (``pipelines.graph``), committed by the driver
              (``pipelines.driver``); Ray is not started when nothing is left
    finish    compaction and checkpoints of the tables written to; the search index brought up to
              them (``pipelines.search``: only the files whose rows changed); the run record

Runs are incremental and resumable: files whose (uri, version, config hash) are committed are
skipped; an unfinished run with the same config and input is continued by running the same
command again. A file that kills its worker process is retried in an isolating pass and, if it
kills it again, becomes an error row (``worker_crash``) instead of failing the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pipelines
import schemas
from pipelines import lifecycle, planning
from pipelines.config import PipelineConfig
from pipelines.driver import COMMIT_SHARE, REUSE_BATCH, CommitBuffer, Progress, error_file, reused_file
from pipelines.graph import one_line, ray_session, run_passes
from pipelines.output import RUNS_DIR, Committer, OutputStore, RunCounts, RunRecord, committed_seq, new_run_id, redact
from pipelines.output import utcnow as _utcnow
from pipelines.output.health import ensure_healthy
from pipelines.sources import KeyedRefs
from pipelines.watchdog import StallError
from schemas.vocabulary import PIPELINE_ERROR, RUN_COMPLETED, RUN_FAILED, RUN_INTERRUPTED, RUN_RUNNING

log = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "RunFailed", "RunSummary", "choose_run", "one_line", "run_pipeline"]


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run_id: str
    out: str
    resumed: bool
    n_inputs: int
    skipped: int
    processed: int
    ok: int
    partial: int
    error: int
    error_types: dict[str, int]
    audio_hours: float
    wall_s: float
    n_commits: int
    status: str
    removed: int = 0      # files gone from the input's scope whose rows the run removed (all its attempts)
    reused: int = 0       # files that took the results of the same content under another uri (all attempts)

    @property
    def audio_h_per_wall_h(self) -> float:
        return self.audio_hours / (self.wall_s / 3600) if self.wall_s > 0 else 0.0

    def format(self) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.error_types.items())) or "none"
        return (
            f"run {self.run_id} {self.status}{' (resumed)' if self.resumed else ''}: "
            f"{self.n_inputs} inputs, {self.processed} processed, {self.skipped} skipped, "
            f"removed {self.removed}, reused {self.reused} | "
            f"ok {self.ok}, partial {self.partial}, error {self.error} (error types: {errs}) | "
            f"{self.audio_hours:.3f} audio h in {self.wall_s:.1f} s = "
            f"{self.audio_h_per_wall_h:.1f} audio-h per wall-h | {self.n_commits} commits -> {self.out}"
        )


class RunFailed(RuntimeError):
    """The run itself could not complete; its run record says ``failed`` with ``message``."""

    def __init__(self, run_id: str, message: str):
        super().__init__(f"run {run_id} failed: {message}")
        self.run_id = run_id
        self.message = message


def _input_key(cfg: PipelineConfig) -> str:
    return cfg.input if isinstance(cfg.input, str) else "\n".join(cfg.input)


def choose_run(store: OutputStore, cfg: PipelineConfig, chash: str) -> tuple[str, RunRecord | None]:
    """The run id to use, and the record of the run being resumed (None for a new run)."""
    if cfg.resume_run_id:
        rec = store.read_run(cfg.resume_run_id)
        if rec is None:
            raise ValueError(f"--resume {cfg.resume_run_id}: no such run under {cfg.out}")
        return cfg.resume_run_id, rec
    if not cfg.fresh:
        for run_id in reversed(store.list_runs()):
            rec = store.read_run(run_id)
            if rec is None:
                continue
            if rec.completed:
                break  # the newest run finished: start a new (incremental) run
            if rec.config_hash == chash and rec.input == _input_key(cfg):
                return run_id, rec
    return new_run_id(), None


class Phases:
    """The driver's wall time by phase (``counts.phases_s`` of the run record)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0


class Attempt:
    """One attempt of a run (a new run, or the resumption of one): what it has done so far, and
    its run record, built here and only here."""

    def __init__(self, prep: planning.Prepared, plan: planning.WorkPlan, phases: Phases, t0: float):
        self.prep, self.plan, self.phases = prep, plan, phases
        self.t0 = t0     # when the run started (before planning)
        cfg, store = prep.cfg, prep.store
        self.run_id, self.resumed = choose_run(store, cfg, prep.config_hash)
        self.started = self.resumed.started_at if self.resumed and self.resumed.started_at else _utcnow().isoformat()
        self.resumes = list(self.resumed.resumes) if self.resumed else []
        if self.resumed is not None:
            self.resumes.append(_utcnow().isoformat())
            log.warning("resuming run %s (%d commits so far)", self.run_id, committed_seq(store, self.run_id))
        self.earlier = self.resumed.counts if self.resumed and self.resumed.counts else RunCounts()
        self.times: list[dict[str, Any]] = list(self.resumed.stage_times) if self.resumed else []
        self.keyed = KeyedRefs({r.file_id: r for r in plan.refs}, plan.hasher)
        self.committer: Committer | None = None
        self.buffers: list[CommitBuffer] = []          # the reused files' commits, then the processed files'
        self.progress = Progress(len(plan.to_process), cfg.progress)
        self.n_removed = 0
        self.n_reused = 0
        self.n_to_process = len(plan.to_process)
        self.again: list[Any] = []    # files of an interrupted removal the listing returns again
        self.resources: dict[str, Any] | None = None   # what the first pass planned (None: no Ray needed)
        self.mirror = {"scope": plan.listing.scope.describe(), "indexed_in_scope": plan.removals.indexed,
                       "to_remove": len(plan.removals)}

    def buffer(self, *, flush_files: int, flush_seconds: float, progress: Progress,
               commit_share: float | None = COMMIT_SHARE) -> CommitBuffer:
        assert self.committer is not None
        p = self.prep
        b = CommitBuffer(self.committer, self.keyed, progress, run_id=self.run_id, model_id=p.model_id,
                         chash=p.config_hash, flush_files=flush_files, flush_seconds=flush_seconds,
                         commit_share=commit_share)
        self.buffers.append(b)
        return b

    def flush_all(self) -> None:
        """Commit what is complete, whatever else fails (a stop, a stall)."""
        for b in self.buffers:
            try:
                b.flush()
            except Exception as e:  # noqa: BLE001
                log.error("could not commit the complete files (%s)", one_line(e))

    def counts(self) -> RunCounts:
        p, plan = self.progress, self.plan
        hasher = plan.hasher
        return RunCounts(
            n_inputs=len(plan.refs), skipped=plan.skipped, processed=p.done,
            ok=p.status[schemas.STATUS_OK], partial=p.status[schemas.STATUS_PARTIAL],
            error=p.status[schemas.STATUS_ERROR], error_types=dict(p.error_types),
            audio_hours=p.audio_s / 3600, wall_s=time.monotonic() - self.t0,
            removed=self.earlier.removed + self.n_removed, reused=self.earlier.reused + self.n_reused,
            n_todo=len(plan.todo), n_to_process=self.n_to_process,
            commit_s=round(sum(b.commit_s for b in self.buffers), 3),
            ray_init_s=round(self.phases.seconds.get("ray_init", 0.0), 3),
            hashed_files=hasher.files, hashed_bytes=hasher.bytes, hash_s=round(hasher.seconds, 3),
            phases_s={k: round(v, 3) for k, v in self.phases.seconds.items()})

    def record(self, status: str, *, final: bool = False, error: str | None = None) -> RunRecord:
        cfg, p = self.prep.cfg, self.prep
        return RunRecord(
            run_id=self.run_id, status=status, input=_input_key(cfg), out=cfg.out, model=cfg.model,
            model_id=p.model_id, config_hash=p.config_hash, pipeline_version=pipelines.__version__,
            schema_version=schemas.SCHEMA_VERSION,
            tasks=[{"name": t.name, "prompt": t.prompt, **dataclasses.asdict(t.settings),
                    "needs_speech": t.needs_speech} for t in p.tasks],
            decode=dataclasses.asdict(cfg.decode),
            speech_gate={"on": cfg.speech_gate, "threshold": cfg.speech_threshold, "cut_at_pauses": cfg.cut_at_pauses},
            storage_options=redact(cfg.storage_options),
            out_storage_options=redact(cfg.out_storage_options) if cfg.out_storage_options is not None else None,
            batch_size=cfg.batch_size, engine=cfg.engine, keep_removed=cfg.keep_removed,
            max_removed=cfg.max_removed, max_removed_files=cfg.max_removed_files,
            started_at=self.started, resumes=self.resumes,
            finished_at=_utcnow().isoformat() if final else None,
            n_inputs=len(self.plan.refs), n_todo=len(self.plan.todo), skipped=self.plan.skipped,
            mirror=self.mirror, counts=self.counts(), resources=self.resources, error=error,
            stage_times=self.times,
            n_commits_this_attempt=self.committer.n_commits if final and self.committer is not None else None,
        )

    def write(self, status: str, *, final: bool = False, error: str | None = None) -> None:
        self.prep.store.write_run(self.record(status, final=final, error=error))

    def summary(self, status: str) -> RunSummary:
        c = self.counts()
        return RunSummary(run_id=self.run_id, out=self.prep.cfg.out, resumed=self.resumed is not None,
                          n_inputs=c.n_inputs, skipped=c.skipped, processed=c.processed, ok=c.ok,
                          partial=c.partial, error=c.error, error_types=c.error_types, audio_hours=c.audio_hours,
                          wall_s=c.wall_s, n_commits=self.committer.n_commits if self.committer is not None else 0,
                          status=status, removed=c.removed, reused=c.reused)


def run_pipeline(cfg: PipelineConfig) -> RunSummary:
    """Run (or resume) the pipeline described by ``cfg``; returns the run's summary.

    Bad input never raises (it becomes error rows). Tables that lost data files raise
    :class:`pipelines.output.health.TableDamaged` (one line) before anything is written, unless
    ``cfg.repair`` repairs them first. A failure of the run itself (output not
    writable, cluster gone, a listing the removal guard refuses, a bug) raises :class:`RunFailed`
    after writing ``failed`` and the one-line reason into the run record."""
    t0 = time.monotonic()
    phases = Phases()
    prep = planning.prepare(cfg)
    with phases("ledger"):
        # a table that lost data files: refuse in one line (nothing written), or repair (--repair)
        ensure_healthy(prep.store, repair=cfg.repair)
    plan = planning.make_plan(prep)
    phases.seconds["list"] = plan.list_s
    phases.seconds["ledger"] += plan.read_s
    if plan.reuse_s:
        phases.seconds["reuse"] = plan.reuse_s
    with plan, lifecycle.StopSignals() as stop:   # SIGTERM / SIGINT -> Interrupted
        with phases("ledger"):
            attempt = Attempt(prep, plan, phases, t0)
            attempt.write(RUN_RUNNING)
        status, error = RUN_FAILED, None
        try:
            plan.check()            # a bad listing fails the run before any commit
            apply_mirror(attempt)
            process(attempt, stop)
            with phases("finish"):
                assert attempt.committer is not None
                attempt.committer.finish()   # compaction and checkpoints of the tables written to
            if attempt.committer.n_commits:
                with phases("index"):
                    update_search_index(prep.store)
            status = RUN_COMPLETED
        except (lifecycle.Interrupted, KeyboardInterrupt) as e:
            # Stopped by a signal (a pod eviction, `ray job stop`, Ctrl-C): the graph is shut down
            # (Ray too, when this run started it); the files already complete are committed, the
            # rest are redone when the same command resumes the run.
            status = RUN_INTERRUPTED
            error = str(e) if isinstance(e, lifecycle.Interrupted) else "interrupted (KeyboardInterrupt)"
            plan.hasher.stop()   # files still being hashed are committed without a content key
            attempt.flush_all()
            log.warning("run %s %s: %d files committed; the same command resumes it", attempt.run_id, error,
                        sum(len(b.committed_ids) for b in attempt.buffers))
            raise
        except Exception as e:
            # The run record says so in one line, the traceback goes next to it, and the caller
            # gets RunFailed.
            error = one_line(e)
            log.debug("run %s failed", attempt.run_id, exc_info=True)
            if isinstance(e, StallError):
                plan.hasher.stop()
                attempt.flush_all()   # files that did complete before the stall are kept
            _try(prep.store.write_bytes, prep.store.path(RUNS_DIR, attempt.run_id, "error.txt"),
                 "".join(traceback.format_exception(e)).encode())
            raise RunFailed(attempt.run_id, error) from e
        finally:
            plan.hasher.stop()
            attempt.progress.tick(force=True)
            _try(lambda: attempt.write(status, final=True, error=error))
    return attempt.summary(status)


def apply_mirror(attempt: Attempt) -> None:
    """The committer of the attempt, then the plan's removals and reused files, committed."""
    plan, prep, phases = attempt.plan, attempt.prep, attempt.phases
    committer = attempt.committer = Committer(prep.store, attempt.run_id)
    by_id = {r.file_id: r for r in plan.refs}
    todo_ids = {f.ref.file_id for f in plan.todo}
    # files of an interrupted removal that the listing returns again: processed again
    again = [i for i in committer.in_flight_removal() if i in by_id and i not in todo_ids]
    attempt.again = [by_id[i] for i in again]
    committer.settle_in_flight([*todo_ids, *again])
    if plan.removals.file_ids:
        with phases("remove"), lifecycle.critical():   # a stop signal waits until both tables have it
            committer.remove(plan.removals.file_ids)
        attempt.n_removed = len(plan.removals)
    reused = plan.reused
    if reused:
        with phases("reuse_commit"):
            buffer = attempt.buffer(flush_files=REUSE_BATCH, flush_seconds=math.inf, progress=Progress(0, False),
                                    commit_share=None)
            for start in range(0, len(reused), REUSE_BATCH):
                buffer.add([reused_file(attempt.keyed[f.ref.file_id], f.reuse)
                            for f in reused[start:start + REUSE_BATCH] if f.reuse is not None])
            buffer.flush()
        attempt.n_reused = len(reused)
        log.info("%d file(s) reuse the results of the same content under another uri", len(reused))
    if attempt.n_removed or reused:
        attempt.write(RUN_RUNNING)


def process(attempt: Attempt, stop: lifecycle.StopSignals) -> None:
    """The plan's files to process (and those of an interrupted removal) through the Ray graph."""
    cfg, phases = attempt.prep.cfg, attempt.phases
    refs = [f.ref for f in attempt.plan.to_process] + attempt.again
    attempt.n_to_process = len(refs)
    attempt.plan.hasher.submit(refs)   # their content keys, for their rows, while Ray works
    attempt.progress = Progress(len(refs), cfg.progress)
    buffer = attempt.buffer(flush_files=cfg.flush_files, flush_seconds=cfg.flush_seconds,
                            progress=attempt.progress)
    if not refs:
        return
    with contextlib.ExitStack() as stack:
        with phases("ray_init"):
            stack.enter_context(ray_session(cfg))
        stop.install()   # ray.init replaced the SIGTERM handler with its own
        with phases("graph"):
            missing, times, first = run_passes(cfg, refs, attempt.prep.tasks, buffer)
            attempt.times.extend(times)
            attempt.resources = dataclasses.asdict(first) if first is not None else None
            if missing:
                by_id = {r.file_id: r for r in refs}
                buffer.add([error_file(by_id[m], PIPELINE_ERROR,
                                       "no result came back for this file in any pass (see the Ray "
                                       "Data logs of this run for the failing task)") for m in missing])
            buffer.flush()


def update_search_index(store: OutputStore) -> None:
    """Bring the full-text index (``pipelines.search``) up to the tables this run committed to:
    only the files whose rows changed. The index is derived data: a failure here is logged and
    leaves the previous index readable; ``salmonn-pipeline index OUT`` (or the next run) makes it
    current, so the run still completes."""
    from pipelines.search import update_index

    try:
        log.info("%s", update_index(store).format())
    except Exception as e:  # noqa: BLE001
        log.warning("search index not updated (%s); `salmonn-pipeline index %s` brings it up to date",
                    one_line(e), store.out)


def _try(fn: Any, *args: Any) -> None:
    """Best-effort bookkeeping while a run is already failing: log, never raise."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        log.error("could not record the run's state (%s)", one_line(e))
