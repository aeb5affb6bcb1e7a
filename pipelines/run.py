"""Builds the Ray Data graph, runs it and drives the commit.

    list inputs (driver) -> decode + window (CPU actor pool) -> SALMONN (GPU actor pool)
        -> result rows streamed back to the driver -> ResultAssembler -> Committer

Heavy data (audio) never passes through the driver; text results do, which keeps the commit
simple and exactly-once (see ``pipelines.commit``).

Runs are incremental and resumable: files whose (uri, version, config hash) are committed are
skipped; an unfinished run with the same config and input is continued by running the same
command again. A file that kills its worker process is retried in an isolating pass and, if it
kills it again, becomes an error row (``worker_crash``) instead of failing the run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

import pipelines
import schemas
from pipelines import commit as cm
from pipelines import faults, lifecycle, stage_times, storage
from pipelines.config import PipelineConfig, check_output, config_hash_of, model_id_for, resolve_tasks
from pipelines.labels import segment_label
from pipelines.sources import FileRef, list_inputs
from pipelines.stages import (
    CompleteFile,
    DecodeStage,
    FailedFile,
    ResultAssembler,
    error_info,
    refs_table,
)
from pipelines.watchdog import StallError, stall_timeout_s, watch_dataset
from schemas.vocabulary import INFERENCE_ERROR, PIPELINE_ERROR, RUN_INTERRUPTED, WORKER_CRASH

log = logging.getLogger(__name__)


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

    @property
    def audio_h_per_wall_h(self) -> float:
        return self.audio_hours / (self.wall_s / 3600) if self.wall_s > 0 else 0.0

    def format(self) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.error_types.items())) or "none"
        return (
            f"run {self.run_id} {self.status}{' (resumed)' if self.resumed else ''}: "
            f"{self.n_inputs} inputs, {self.processed} processed, {self.skipped} skipped | "
            f"ok {self.ok}, partial {self.partial}, error {self.error} (error types: {errs}) | "
            f"{self.audio_hours:.3f} audio h in {self.wall_s:.1f} s = "
            f"{self.audio_h_per_wall_h:.1f} audio-h per wall-h | {self.n_commits} commits -> {self.out}"
        )


def _input_key(cfg: PipelineConfig) -> str:
    return cfg.input if isinstance(cfg.input, str) else "\n".join(cfg.input)


def choose_run(store: cm.OutputStore, cfg: PipelineConfig, chash: str) -> tuple[str, dict | None]:
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
            if rec.get("status") == cm.RUN_COMPLETED:
                break  # the newest run finished: start a new (incremental) run
            if rec.get("config_hash") == chash and rec.get("input") == _input_key(cfg):
                return run_id, rec
    return cm.new_run_id(), None


def _run_record(cfg: PipelineConfig, run_id: str, chash: str, status: str, **extra: Any) -> dict[str, Any]:
    tasks = resolve_tasks(cfg.tasks)
    return {
        "run_id": run_id,
        "status": status,
        "input": _input_key(cfg),
        "out": cfg.out,
        "model": cfg.model,
        "model_id": model_id_for(cfg.model),
        "config_hash": chash,
        "pipeline_version": pipelines.__version__,
        "schema_version": schemas.SCHEMA_VERSION,
        "tasks": [{"name": t.name, "prompt": t.prompt, **dataclasses.asdict(t.settings),
                   "needs_speech": t.needs_speech} for t in tasks],
        "decode": dataclasses.asdict(cfg.decode),
        "speech_gate": {"on": cfg.speech_gate, "threshold": cfg.speech_threshold, "cut_at_pauses": cfg.cut_at_pauses},
        "storage_options": cm.redact(cfg.storage_options),
        "out_storage_options": cm.redact(cfg.out_storage_options) if cfg.out_storage_options is not None else None,
        "batch_size": cfg.batch_size,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Tables for one commit
# ---------------------------------------------------------------------------------------------

def speech_seconds(segments: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds of speech in a file from its windows' speech ratios: each ratio applies to the part
    of its window before the next window starts (windows overlap when hop < window). None when no
    window has a ratio (the speech gate was off)."""
    spans = {s["segment_index"]: (s["start_s"], s["end_s"], s["speech_ratio"])
             for s in segments if s.get("speech_ratio") is not None}
    if not spans:
        return None
    order = sorted(spans)
    total = 0.0
    for k, i in enumerate(order):
        start, end, ratio = spans[i]
        if k + 1 < len(order):
            end = min(end, spans[order[k + 1]][0])
        total += float(ratio) * max(0.0, end - start)
    return total


def file_status(done: CompleteFile) -> tuple[str, str | None, str | None]:
    """(status, error_type, error_message) of a complete file, inference failures included."""
    info = done.info
    if not done.failed_windows:
        return info.status, info.error_type, info.error_message
    failed = sorted(done.failed_windows)
    first_type, first = done.failed_windows[failed[0]]
    msg = f"inference failed for segments {failed[:20]}{'...' if len(failed) > 20 else ''}: {first}"
    status = schemas.STATUS_ERROR if len(failed) >= info.n_segments else schemas.STATUS_PARTIAL
    types = {t for t, _ in done.failed_windows.values()}
    return status, (WORKER_CRASH if types == {WORKER_CRASH} else INFERENCE_ERROR), msg


def build_tables(done: Sequence[CompleteFile], refs: Mapping[str, FileRef], *, run_id: str, model_id: str,
                 chash: str) -> tuple[pa.Table, pa.Table, list[cm.CommittedFile]]:
    """The files and segments tables of one commit, and the ledger entries of its files.

    Each file's rows are checked against the output schemas on their own: a file whose rows do
    not fit (a bug upstream) becomes a ``pipeline_error`` row instead of failing the commit of
    the files beside it.
    """
    now = cm.utcnow()
    files_parts, seg_parts, entries = [], [], []
    for d in done:
        ref = refs[d.info.file_id]
        try:
            f, s, entry = _file_tables(d, ref, run_id=run_id, model_id=model_id, chash=chash, now=now)
        except Exception as e:  # noqa: BLE001 - one file's bad rows never stop the commit
            log.error("the results of %s do not fit the output schema: %s", ref.uri, e)
            bad = error_file(ref, PIPELINE_ERROR, f"its results did not fit the output schema: "
                                                  f"{type(e).__name__}: {e}"[:2000])
            f, s, entry = _file_tables(bad, ref, run_id=run_id, model_id=model_id, chash=chash, now=now)
        files_parts.append(f)
        seg_parts.append(s)
        entries.append(entry)
    files = pa.concat_tables(files_parts) if files_parts else schemas.FILES.empty_table()
    segs = pa.concat_tables(seg_parts) if seg_parts else schemas.SEGMENTS.empty_table()
    return files, segs, entries


def _file_tables(d: CompleteFile, ref: FileRef, *, run_id: str, model_id: str, chash: str,
                 now: Any) -> tuple[pa.Table, pa.Table, cm.CommittedFile]:
    info = d.info
    status, etype, emsg = file_status(d)
    files = schemas.conform(pa.Table.from_pylist([{
        "file_id": info.file_id, "uri": ref.uri, "size_bytes": ref.size_bytes, "etag": ref.etag,
        "mtime": ref.mtime, "status": status, "error_type": etype, "error_message": emsg,
        "container": info.container, "codec": info.codec, "sample_rate_in": info.sample_rate_in,
        "channels_in": info.channels_in, "duration_s": info.duration_s, "n_segments": info.n_segments,
        "run_id": run_id, "model_id": model_id, "config_hash": chash,
        "pipeline_version": pipelines.__version__, "processed_at": now,
        "speech_s": speech_seconds(d.segments), "audio_stream": info.audio_stream,
    }], schema=schemas.FILES), schemas.FILES)
    segs = schemas.conform(pa.Table.from_pylist(
        [{**s, "run_id": run_id, "model_id": model_id, "label": segment_label(s["task"], s["text"])}
         for s in d.segments], schema=schemas.SEGMENTS), schemas.SEGMENTS)
    schemas.check_values("files", files)
    schemas.check_values("segments", segs)
    entry = cm.CommittedFile(file_id=info.file_id, uri=ref.uri, version=ref.version, config_hash=chash,
                             status=status, error_type=etype, run_id=run_id, seq=0)
    return files, segs, entry


def error_file(ref: FileRef, error_type: str, message: str) -> CompleteFile:
    return CompleteFile(error_info(ref, error_type, message), [], {})


# ---------------------------------------------------------------------------------------------
# Progress and the commit buffer
# ---------------------------------------------------------------------------------------------

class Progress:
    """The driver's own progress line: files done / total, audio hours, throughput, errors."""

    def __init__(self, total: int, enabled: bool, every_s: float = 5.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.t0 = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.audio_s = 0.0
        self.status: collections.Counter[str] = collections.Counter()
        self.error_types: collections.Counter[str] = collections.Counter()

    def add(self, files: pa.Table) -> None:
        for row in files.select(["status", "error_type", "duration_s"]).to_pylist():
            self.done += 1
            self.status[row["status"]] += 1
            if row["error_type"]:
                self.error_types[row["error_type"]] += 1
            self.audio_s += row["duration_s"] or 0.0
        self.tick()

    def line(self) -> str:
        wall = time.monotonic() - self.t0
        rate = (self.audio_s / 3600) / (wall / 3600) if wall > 0 else 0.0
        errs = self.status[schemas.STATUS_ERROR] + self.status[schemas.STATUS_PARTIAL]
        return (f"[salmonn-pipeline] files {self.done}/{self.total} | audio {self.audio_s / 3600:.3f} h | "
                f"{rate:.1f} audio-h/wall-h | errors {errs} | {wall:.0f} s")

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.every_s):
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)


# A driver commits for at most about this share of its wall time. A commit that replaces earlier
# rows rewrites every data file holding any of them (Delta is copy-on-write here); file ids are
# hashes, so when a run reprocesses files of a large table (a new model or config), each commit
# touches most of its data files: 4.2 s per 32-file commit against an 18M-row segments table on
# a local disk, where a commit of new files takes 0.08 s. Such commits are spaced out, and each
# carries the files completed meanwhile, instead of rewriting the table every 32 files.
COMMIT_SHARE = 0.1


class CommitBuffer:
    """Complete files waiting for the next commit; flushes by count or age, and no sooner than
    the last commit's duration x (1 / ``commit_share`` - 1) after it ended (None: no spacing)."""

    def __init__(self, committer: cm.Committer, refs: Mapping[str, FileRef], progress: Progress, *,
                 run_id: str, model_id: str, chash: str, flush_files: int, flush_seconds: float,
                 commit_share: float | None = COMMIT_SHARE):
        self.committer, self.refs, self.progress = committer, refs, progress
        self.run_id, self.model_id, self.chash = run_id, model_id, chash
        self.flush_files, self.flush_seconds = flush_files, flush_seconds
        self.commit_share = commit_share
        self.buffer: dict[str, CompleteFile] = {}   # file_id -> the file, in completion order
        self.last_flush = time.monotonic()
        self.last_commit_s = 0.0     # how long the last commit took ...
        self.last_commit_end = 0.0   # ... and when it ended (monotonic)
        self.spaced = False          # commits are being spaced out (logged once)
        self.committed_ids: set[str] = set()
        self.commit_s = 0.0   # driver time spent writing parts and commit records

    @property
    def n_commits(self) -> int:
        return self.committer.n_commits

    def add(self, done: Sequence[CompleteFile]) -> None:
        for d in done:
            if d.info.file_id in self.committed_ids or d.info.file_id in self.buffer:
                continue  # delivered again by a retried task
            self.buffer[d.info.file_id] = d
        if self.due():
            self.flush()

    def due(self) -> bool:
        """Whether the buffered files should be committed now."""
        if not self.buffer:
            return False
        now = time.monotonic()
        if not (len(self.buffer) >= self.flush_files or now - self.last_flush >= self.flush_seconds):
            return False
        if self.commit_share:
            wait = self.last_commit_s * (1 / self.commit_share - 1)
            if now - self.last_commit_end < wait:
                if not self.spaced:
                    self.spaced = True
                    log.warning("a commit took %.1f s (it rewrites the table's data files that hold earlier rows "
                                "of the files it replaces): the next ones wait %.0f s after it, so committing "
                                "stays under %.0f%% of the driver's time", self.last_commit_s, wait,
                                100 * self.commit_share)
                return False
        return True

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        t0 = time.monotonic()
        for d in self.buffer.values():
            faults.maybe_crash("commit", d.info.uri)
        files, segs, entries = build_tables(list(self.buffer.values()), self.refs, run_id=self.run_id,
                                            model_id=self.model_id, chash=self.chash)
        with lifecycle.critical():   # a stop signal waits until both tables have the commit
            self.committer.commit(files, segs, entries)
            self.last_commit_end = time.monotonic()
            self.last_commit_s = self.last_commit_end - t0
            self.commit_s += self.last_commit_s
            self.committed_ids.update(self.buffer)
            self.progress.add(files)
            self.buffer = {}

    def add_failed(self, failed: Sequence[FailedFile]) -> None:
        """Files whose result rows the driver could not use: a ``pipeline_error`` row each."""
        self.add([error_file(self.refs[f.file_id], PIPELINE_ERROR, f.reason) for f in failed
                  if f.file_id in self.refs])


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def ray_session(cfg: PipelineConfig) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"runtime_env": dict(cfg.runtime_env) if cfg.runtime_env else None,
                              "log_to_driver": True, "logging_level": logging.WARNING}
    if cfg.address:
        ray.init(address=cfg.address, **kwargs)
    else:
        # "local" always starts a fresh instance: after an unclean exit Ray's current-cluster file
        # can remain, and a plain init would try to join that dead cluster.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


class RayAttemptLedger:
    """``AttemptLedger`` backed by a Ray actor, so counts survive the worker processes that die."""

    def __init__(self, handle: Any):
        self.handle = handle

    def begin(self, key: str) -> int:
        import ray

        return ray.get(self.handle.begin.remote(key))

    def end(self, key: str) -> None:
        self.handle.end.remote(key)  # ordered after this caller's earlier calls; no need to wait


def start_ledger() -> RayAttemptLedger:
    """The attempt counter of one pass, pinned to the driver's node: it must live exactly as long
    as the driver. Left to default placement it lands on any node, and when that node dies every
    later ``begin`` raises, so the pass drops those batches and the isolating pass redoes them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_restarts=0)
    class AttemptCounter:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def begin(self, key: str) -> int:
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

        def end(self, key: str) -> None:
            self.counts.pop(key, None)

    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RayAttemptLedger(AttemptCounter.options(scheduling_strategy=driver_node).remote())


MIN_OBJECT_STORE_BUDGET = 64 * 2**20   # bytes; below this Ray Data's own blocks would throttle it
INFER_TASKS_IN_FLIGHT = 2              # Ray Data's default tasks in flight per actor (max_concurrency 1 x 2)
GPU_BATCH_SIZE = 32   # windows per inference batch on a GPU actor (x tasks rows per generate)
CPU_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Resources:
    """How a pass uses the cluster (``plan_resources``)."""

    decode_actors: int
    infer_actors: int
    gpus_per_infer_actor: float
    cpus_per_infer_actor: float
    batch_size: int
    cpus_per_decode_actor: float = 1.0


def plan_resources(cfg: PipelineConfig, cluster: Mapping[str, float] | None = None,
                   nodes: Sequence[Mapping[str, float]] | None = None) -> Resources:
    """Actor pool sizes and the inference batch size for this cluster (explicit settings win).

    One inference actor per GPU (or ``gpus_per_infer_actor``), one on a CPU-only cluster; the
    remaining CPUs decode. Batches are bigger on GPU actors, where a decoding step costs about the
    same for 24 rows as for 96 (reading the weights dominates); a batch too big for the GPU's
    memory makes the predictor halve what it runs at once (``pipelines.infer``), it does not fail.
    ``cluster``: the cluster's resources (default: ``ray.cluster_resources()`` of the connected Ray);
    ``nodes``: each alive node's resources (default: from ``ray.nodes()`` when ``cluster`` is not
    given; None = one node).

    Headroom rule: when a node dies, Ray restarts its actors on the nodes left, and Ray Data waits
    without a limit for a restarted actor that finds no free slot. So the inference actors plus one
    decode actor must fit in the CPUs that survive the loss of the largest node (all CPUs on a
    one-node cluster): each actor asks for ``min(1, surviving CPUs / (inference actors + 1))``
    CPUs, rounded down to 0.01. With a few CPUs per node that is 1 CPU; only clusters of 1-CPU
    nodes, or a 1-CPU machine, get fractions (a request bounds how many actors a node takes, not
    the CPU a process uses). The decode pool autoscales from 1 to ``decode_actors`` and Ray Data
    releases idle decode actors (held back by backpressure, or out of input), which frees the CPUs
    a restarted actor needs. GPUs get no headroom, which would idle a GPU: the inference actor of a
    lost GPU node waits for a replacement node (an autoscaler adds one for it); without one the
    watchdog (``pipelines.watchdog``) ends the run, and the same command, planned for the nodes
    left, resumes it.
    """
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
        if nodes is None:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = float(cluster.get("CPU", 1))
    gpus = int(cluster.get("GPU", 0))
    gpus_per = cfg.gpus_per_infer_actor if cfg.gpus_per_infer_actor is not None else (1.0 if gpus else 0.0)
    if cfg.infer_actors:
        n_infer = cfg.infer_actors
    elif gpus_per > 0:
        n_infer = max(1, int(gpus / gpus_per))
    else:
        n_infer = 1
    node_cpus = [float(n.get("CPU", 0)) for n in nodes or () if n.get("CPU", 0) > 0]
    surviving = cpus - max(node_cpus) if len(node_cpus) > 1 else cpus
    per_actor = max(0.01, min(1.0, math.floor(100 * surviving / (n_infer + 1)) / 100))
    n_decode = cfg.decode_actors or max(1, min(64, int(cpus - n_infer * per_actor)))
    batch_size = cfg.batch_size or (GPU_BATCH_SIZE if gpus_per > 0 else CPU_BATCH_SIZE)
    return Resources(n_decode, n_infer, gpus_per, per_actor, batch_size, per_actor)


def gpu_shortfall(plan: Resources, cluster: Mapping[str, float], stall_s: float | None) -> str | None:
    """What to tell the user when the plan asks for GPUs the cluster does not have now (e.g.
    ``--gpus-per-actor 1`` on a CPU-only machine, or a GPU group scaled to zero): the inference
    actors wait for a node with GPUs, which an autoscaler may add, and the watchdog ends the run
    after ``stall_s`` without results. None when the GPUs are there."""
    need = plan.gpus_per_infer_actor
    have = float(cluster.get("GPU", 0))
    if need <= 0 or have >= need:
        return None
    after = f"after {stall_s:.0f} s without results (--stall-timeout-s)" if stall_s else "only when stopped"
    return (f"the inference actors ask for {need:g} GPU each and the cluster has {have:g} GPU(s) now: they wait "
            f"for a node with GPUs to join (an autoscaler adds one); without one the run fails {after}")


def run_pass(cfg: PipelineConfig, refs: Sequence[FileRef], tasks: Sequence[Any], buffer: CommitBuffer, *,
             isolate: bool) -> tuple[list[str], str, Resources]:
    """One pass of the Ray Data graph over ``refs``; returns (file ids not completed, stats, the
    resources it planned)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipelines.infer import SalmonnPredictor

    ctx = DataContext.get_current()
    # Ray restarts dead actors and retries their tasks without limit; the attempt ledger bounds
    # that per file and per window (a poison input becomes a worker_crash row). A block whose UDF
    # raises anyway is dropped rather than failing the run: its files come back as missing and are
    # retried in an isolating pass.
    ctx.max_errored_blocks = -1
    # A model load that fails once (a storage hiccup) is retried in the actor, then with a fresh
    # actor; a load that fails every time (a missing weight file) still ends the run, with its error.
    ctx.actor_init_retry_on_errors = True
    ctx.actor_init_max_retries = 2
    ctx.max_consecutive_actor_init_deaths = 2
    ctx.enable_progress_bars = bool(cfg.progress and sys.stderr.isatty())
    plan = plan_resources(cfg)
    batch_size = 1 if isolate else plan.batch_size
    # Backpressure: decoding may run only a few inference batches ahead. Without a bound Ray Data
    # lets an operator fill its share of the object store (a 30% of RAM default): a decode actor
    # ran ~1,000 windows (1.9 GB) ahead of a CPU inference actor on one long file. The bound is
    # object-store bytes: the batches decode may have ready (prefetch) plus the ones each inference
    # actor holds in flight (Ray Data submits 2 per actor), doubled because Ray Data reserves about
    # half of the budget per operator and shares the rest.
    ahead = (cfg.prefetch_batches + INFER_TASKS_IN_FLIGHT) * batch_size * plan.infer_actors
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_OBJECT_STORE_BUDGET, 2 * ahead * cfg.decode.window_samples * 4))
    log.info("pass over %d files: %d decode actors, %d inference actors (%.2f GPU each), batch %d, "
             "decode at most ~%d windows ahead", len(refs), plan.decode_actors, plan.infer_actors,
             plan.gpus_per_infer_actor, batch_size, ahead)
    stall_s = stall_timeout_s(cfg, tasks, batch_size, plan)
    shortfall = gpu_shortfall(plan, ray.cluster_resources(), stall_s)
    if shortfall:
        log.warning("%s", shortfall)

    ledger = start_ledger()
    # The pipeline's own switches (the test fault hook) reach the workers of this run only.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("SALMONN_PIPELINE_")}
    stage_env = {"env_vars": env_vars} if env_vars else None
    # One input block per file (up to 10,000 blocks), typed from the start (schemas.stage).
    refs_tbl = refs_table(refs)
    per_block = -(-len(refs) // 10_000)
    ds = ray.data.from_arrow([refs_tbl.slice(i, per_block) for i in range(0, len(refs), per_block)])
    # Ray warns that these actors have "constructor arguments in the object store and max_restarts
    # > 0". Not silenced, and harmless here: the arguments are the driver's own ray.put objects (the
    # stage callable with its settings, the DataContext), held by the operator for the whole run,
    # primary copy on the driver's node, so a restarted actor always finds them; only the driver's
    # death loses them, and that ends the run anyway. Silencing needs a process-wide C++ log level.
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={"options": cfg.decode, "storage_options": dict(cfg.storage_options),
                               "windows_per_batch": cfg.windows_per_batch,
                               "ledger": ledger, "max_attempts": cfg.crash_attempts,
                               "speech_gate": cfg.speech_gate, "cut_at_pauses": cfg.cut_at_pauses},
        batch_size=1,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ActorPoolStrategy(min_size=1, max_size=plan.decode_actors),
        num_cpus=plan.cpus_per_decode_actor,
        runtime_env=stage_env,
    )
    ds = ds.map_batches(
        SalmonnPredictor,
        fn_constructor_kwargs={"model": cfg.model, "tasks": list(tasks), "model_options": dict(cfg.model_options),
                               "ledger": ledger, "max_attempts": cfg.crash_attempts,
                               "speech_threshold": cfg.speech_threshold if cfg.speech_gate else None},
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ActorPoolStrategy(size=plan.infer_actors),
        num_gpus=plan.gpus_per_infer_actor,
        num_cpus=plan.cpus_per_infer_actor,
        runtime_env=stage_env,
    )
    assembler = ResultAssembler([t.name for t in tasks])
    # No result for the stall timeout (a restarted actor with nowhere to run) raises StallError.
    for batch in watch_dataset(ds, ds.iter_batches(batch_size=None, batch_format="pyarrow"),
                               stall_s):
        done, failed = assembler.add(batch)
        buffer.add(done)
        buffer.add_failed(failed)
        buffer.progress.tick()
    buffer.flush()
    try:   # Ray Data's structured per-operator stats (a private accessor: informational only)
        times = stage_times.to_record(stage_times.from_ray_summary(ds._get_stats_summary()))
    except Exception as e:  # noqa: BLE001
        log.info("no stage times for this pass (%s)", one_line(e))
        times = []
    done = buffer.committed_ids
    missing = [r.file_id for r in refs if r.file_id not in done]
    return missing, times, plan


class RunFailed(RuntimeError):
    """The run itself could not complete; its run record says ``failed`` with ``message``."""

    def __init__(self, run_id: str, message: str):
        super().__init__(f"run {run_id} failed: {message}")
        self.run_id = run_id
        self.message = message


def one_line(e: BaseException) -> str:
    """``ExceptionType: first line of the message`` (at most 500 characters)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__


def _try(fn: Any, *args: Any) -> None:
    """Best-effort bookkeeping while a run is already failing: log, never raise."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        log.error("could not record the run's state (%s)", one_line(e))


def run_pipeline(cfg: PipelineConfig) -> RunSummary:
    """Run (or resume) the pipeline described by ``cfg``; returns the run's summary.

    Bad input never raises (it becomes error rows). A failure of the run itself raises
    :class:`RunFailed` after writing ``failed`` and the one-line reason into the run record."""
    t0 = time.monotonic()
    tasks = resolve_tasks(cfg.tasks)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique: {names}")
    out_so = cfg.out_storage_options if cfg.out_storage_options is not None else cfg.storage_options
    out_so = storage.with_defaults(cfg.out, out_so)
    check_output(cfg, out_so)   # --out is not a regular file; --resume names a run that exists
    in_so = storage.with_defaults(cfg.input, cfg.storage_options)
    cfg = dataclasses.replace(cfg, storage_options=in_so)
    store = cm.OutputStore(cfg.out, out_so)
    chash = config_hash_of(cfg)
    model_id = model_id_for(cfg.model)

    phases: dict[str, float] = {}     # driver wall time by phase, in the run record (counts.phases_s)
    t_phase = time.monotonic()
    refs = list_inputs(cfg.input, dict(cfg.storage_options), extensions=cfg.extensions)
    phases["list"] = time.monotonic() - t_phase
    t_phase = time.monotonic()
    run_id, resumed_rec = choose_run(store, cfg, chash)
    started = resumed_rec["started_at"] if resumed_rec else cm.utcnow().isoformat()
    resumes = list(resumed_rec.get("resumes", [])) if resumed_rec else []
    if resumed_rec is not None:
        resumes.append(cm.utcnow().isoformat())
        log.warning("resuming run %s (%d commits so far)", run_id, store.committed_seq(run_id))

    todo = store.pending(refs, chash)   # cm.is_done for every file, against the files table
    skipped = len(refs) - len(todo)
    by_id = {r.file_id: r for r in refs}
    store.write_run(_run_record(cfg, run_id, chash, cm.RUN_RUNNING, started_at=started, resumes=resumes,
                                n_inputs=len(refs), n_todo=len(todo), skipped=skipped))
    committer = cm.Committer(store, run_id)
    committer.settle_in_flight(r.file_id for r in todo)
    phases["ledger"] = time.monotonic() - t_phase
    progress = Progress(len(todo), cfg.progress)
    buffer = CommitBuffer(committer, by_id, progress, run_id=run_id, model_id=model_id, chash=chash,
                          flush_files=cfg.flush_files, flush_seconds=cfg.flush_seconds)
    times: list[dict[str, Any]] = list(resumed_rec.get(stage_times.RECORD_KEY, [])) if resumed_rec else []
    status = cm.RUN_FAILED
    error: str | None = None
    resources: dict[str, Any] | None = None    # what the first pass planned (None: no Ray needed)
    stop = lifecycle.StopSignals()
    try:
        stop.__enter__()   # SIGTERM / SIGINT -> Interrupted (restored in the finally below)
        if todo:
            t_init = time.monotonic()
            with ray_session(cfg):
                stop.install()   # ray.init replaced the SIGTERM handler with its own
                phases["ray_init"] = time.monotonic() - t_init
                t_phase = time.monotonic()
                pending = todo
                for pass_no in range(max(1, cfg.max_passes)):
                    missing, pass_times, plan = run_pass(cfg, pending, tasks, buffer, isolate=pass_no > 0)
                    times.extend(pass_times)
                    resources = resources or dataclasses.asdict(plan)
                    if not missing:
                        break
                    log.warning("%d files did not complete in pass %d (a worker died); retrying them in isolation",
                                len(missing), pass_no + 1)
                    pending = [by_id[m] for m in missing]
                else:
                    buffer.add([error_file(by_id[m], PIPELINE_ERROR,
                                           "no result came back for this file in any pass (see the Ray "
                                           "Data logs of this run for the failing task)")
                                for m in missing])
                buffer.flush()
                phases["graph"] = time.monotonic() - t_phase
        t_phase = time.monotonic()
        committer.finish()   # compaction and checkpoints of the tables this run wrote to
        phases["finish"] = time.monotonic() - t_phase
        status = cm.RUN_COMPLETED
    except (lifecycle.Interrupted, KeyboardInterrupt) as e:
        # Stopped by a signal (a pod eviction, `ray job stop`, Ctrl-C): the graph is shut down
        # (Ray too, when this run started it); the files already complete are committed, the rest
        # are redone when the same command resumes the run.
        status = RUN_INTERRUPTED
        error = str(e) if isinstance(e, lifecycle.Interrupted) else "interrupted (KeyboardInterrupt)"
        _try(buffer.flush)
        log.warning("run %s %s: %d files committed; the same command resumes it", run_id, error,
                    len(buffer.committed_ids))
        raise
    except Exception as e:
        # A failure of the run itself (output not writable, cluster gone, a bug): the run record
        # says so in one line, the traceback goes next to it, and the caller gets RunFailed.
        status = cm.RUN_FAILED
        error = one_line(e)
        log.debug("run %s failed", run_id, exc_info=True)
        if isinstance(e, StallError):
            _try(buffer.flush)   # files that did complete before the stall are kept

        _try(store.write_bytes, store.path(cm.RUNS_DIR, run_id, "error.txt"),
             "".join(traceback.format_exception(e)).encode())
        raise RunFailed(run_id, error) from e
    finally:
        wall = time.monotonic() - t0
        progress.tick(force=True)
        totals = {
            "n_inputs": len(refs), "skipped": skipped, "processed": progress.done,
            "ok": progress.status[schemas.STATUS_OK], "partial": progress.status[schemas.STATUS_PARTIAL],
            "error": progress.status[schemas.STATUS_ERROR], "error_types": dict(progress.error_types),
            "audio_hours": progress.audio_s / 3600, "wall_s": wall,
        }
        # phases_s: list (inputs), ledger (pending files, run record, in-flight commit), ray_init,
        # graph (the Ray Data passes, driver commits included: commit_s of it), finish (compaction
        # and checkpoints)
        counts = {**totals, "n_todo": len(todo), "commit_s": round(buffer.commit_s, 3),
                  "ray_init_s": round(phases.get("ray_init", 0.0), 3),
                  "phases_s": {k: round(v, 3) for k, v in phases.items()}}
        _try(store.write_run, _run_record(cfg, run_id, chash, status, started_at=started, resumes=resumes,
                                          finished_at=cm.utcnow().isoformat(), counts=counts,
                                          resources=resources, error=error, **{stage_times.RECORD_KEY: times},
                                          n_commits_this_attempt=committer.n_commits, n_inputs=len(refs)))
        stop.__exit__(None, None, None)   # the previous handlers, once the record says how the run ended
    return RunSummary(run_id=run_id, out=cfg.out, resumed=resumed_rec is not None,
                      n_commits=committer.n_commits, status=status, **totals)
