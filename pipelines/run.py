"""Builds the Ray Data graph, runs it and drives the commit.

    list inputs (driver) -> decode + window (CPU actor pool) -> SALMONN (GPU actor pool)
        -> result rows streamed back to the driver -> ResultAssembler -> Committer

Heavy data (audio) never passes through the driver; text results do, which keeps the commit
simple and exactly-once (see ``pipelines.output``). The driver's commit buffer and progress line
are ``pipelines.driver``.

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
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pipelines
import schemas
from pipelines import lifecycle, stage_times, storage
from pipelines.config import (
    PipelineConfig,
    check_output,
    config_hash_of,
    model_id_for,
    resolve_engine,
    resolve_tasks,
)
from pipelines.driver import REUSE_BATCH, CommitBuffer, Progress, error_file, reused_file
from pipelines.output import (
    RUNS_DIR,
    Committer,
    OutputStore,
    ReuseSource,
    check_removals,
    committed_seq,
    find_removals,
    find_sources,
    new_run_id,
    pending,
    redact,
    reusable_sizes,
    utcnow,
)
from pipelines.output.ledger import PENDING_COLUMNS
from pipelines.output.mirror import NO_REMOVALS
from pipelines.sources import ContentHasher, FileRef, KeyedRefs, list_archive
from pipelines.stages import DecodeStage, ResultAssembler, refs_table
from pipelines.watchdog import StallError, stall_timeout_s, watch_dataset
from schemas.vocabulary import PIPELINE_ERROR, RUN_COMPLETED, RUN_FAILED, RUN_INTERRUPTED, RUN_RUNNING

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


def _input_key(cfg: PipelineConfig) -> str:
    return cfg.input if isinstance(cfg.input, str) else "\n".join(cfg.input)


def choose_run(store: OutputStore, cfg: PipelineConfig, chash: str) -> tuple[str, dict | None]:
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
            if rec.get("status") == RUN_COMPLETED:
                break  # the newest run finished: start a new (incremental) run
            if rec.get("config_hash") == chash and rec.get("input") == _input_key(cfg):
                return run_id, rec
    return new_run_id(), None


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
        "storage_options": redact(cfg.storage_options),
        "out_storage_options": redact(cfg.out_storage_options) if cfg.out_storage_options is not None else None,
        "batch_size": cfg.batch_size,
        "engine": cfg.engine,          # as asked; resources.engine: what each pass ran
        "keep_removed": cfg.keep_removed,
        "max_removed": cfg.max_removed,
        **extra,
    }


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
INFER_TASKS_IN_FLIGHT = 2              # Ray Data's default tasks in flight per actor, per concurrent call
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
    engine: str = "hf"           # the generation engine the inference actors run (config.resolve_engine)


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
    engine = resolve_engine(cfg.engine, on_gpu=gpus_per > 0)
    return Resources(n_decode, n_infer, gpus_per, per_actor, batch_size, per_actor, engine)


def engine_options(plan: Resources) -> dict[str, Any]:
    """Settings of the vLLM engine each inference actor builds (``salmonn.engines.VllmEngine``):
    an actor with several GPUs runs one engine over all of them (tensor parallelism, its workers
    in processes of the actor's own, on the GPUs Ray gave it). Nothing for the HF engine."""
    if plan.engine != "vllm":
        return {}
    tp = max(1, int(plan.gpus_per_infer_actor))
    return {"tensor_parallel_size": tp, "engine_args": {"distributed_executor_backend": "mp"} if tp > 1 else None}


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

    from pipelines.infer import CONCURRENT_BATCHES, SalmonnPredictor

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
    concurrent = CONCURRENT_BATCHES[plan.engine]   # batches one inference actor runs at once
    ahead = (cfg.prefetch_batches + INFER_TASKS_IN_FLIGHT * concurrent) * batch_size * plan.infer_actors
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_OBJECT_STORE_BUDGET, 2 * ahead * cfg.decode.window_samples * 4))
    log.info("pass over %d files: %d decode actors, %d inference actors (%.2f GPU each, %s engine), batch %d, "
             "decode at most ~%d windows ahead", len(refs), plan.decode_actors, plan.infer_actors,
             plan.gpus_per_infer_actor, plan.engine, batch_size, ahead)
    stall_s = stall_timeout_s(cfg, tasks, batch_size, plan)
    shortfall = gpu_shortfall(plan, ray.cluster_resources(), stall_s)
    if shortfall:
        log.warning("%s", shortfall)

    ledger = start_ledger()
    # The pipeline's own switches (the test fault hook) reach the workers of this run only.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("SALMONN_PIPELINE_")}
    stage_env = {"env_vars": env_vars} if env_vars else None
    # ... and vLLM's own settings (VLLM_CPU_KVCACHE_SPACE, VLLM_ENABLE_V1_MULTIPROCESSING, ...) the
    # inference actors that run it.
    infer_vars = {**env_vars, **{k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}
    infer_env = {"env_vars": infer_vars} if infer_vars else None
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
                               "speech_threshold": cfg.speech_threshold if cfg.speech_gate else None,
                               "engine": plan.engine, "engine_options": engine_options(plan)},
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        # With vLLM two batches run at once in each actor (threads): the next one is encoded while
        # the engine generates the answers of the one before, and its requests join the running
        # engine, which never idles between Ray Data batches (pipelines.infer).
        compute=ActorPoolStrategy(size=plan.infer_actors, max_concurrent_calls_per_actor=concurrent,
                                  enable_true_multi_threading=concurrent > 1),
        num_gpus=plan.gpus_per_infer_actor,
        num_cpus=plan.cpus_per_infer_actor,
        runtime_env=infer_env,
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

    A run: list the inputs and their scope -> choose (or resume) the run -> the files to process
    (the ledger) -> the indexed files gone from the scope, and the guard against a bad listing
    (``--max-removed``: the run fails here, before anything is written to the tables) -> the
    content keys of the files that may be copies of indexed ones -> the results they reuse (read
    before any commit of this run) -> commit the removals -> commit the reused files -> process
    the rest with Ray (not started when nothing is left). ``pipelines.output.mirror`` has the
    rules.

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
    store = OutputStore(cfg.out, out_so)
    chash = config_hash_of(cfg)
    model_id = model_id_for(cfg.model)

    phases: dict[str, float] = {}     # driver wall time by phase, in the run record (counts.phases_s)
    t_phase = time.monotonic()
    listing = list_archive(cfg.input, dict(cfg.storage_options), extensions=cfg.extensions)
    refs = listing.refs
    phases["list"] = time.monotonic() - t_phase
    t_phase = time.monotonic()
    run_id, resumed_rec = choose_run(store, cfg, chash)
    started = resumed_rec["started_at"] if resumed_rec else utcnow().isoformat()
    resumes = list(resumed_rec.get("resumes", [])) if resumed_rec else []
    if resumed_rec is not None:
        resumes.append(utcnow().isoformat())
        log.warning("resuming run %s (%d commits so far)", run_id, committed_seq(store, run_id))
    earlier = (resumed_rec or {}).get("counts") or {}   # removed / reused count over all attempts

    indexed = store.read_table("files", columns=["file_id", *PENDING_COLUMNS])   # one scan for both:
    todo = pending(store, refs, chash, files=indexed)   # is_done for every file, against the files table
    skipped = len(refs) - len(todo)
    by_id = {r.file_id: r for r in refs}
    removals = NO_REMOVALS if cfg.keep_removed else find_removals(store, listing.scope, refs, files=indexed)
    mirror = {"scope": listing.scope.describe(), "indexed_in_scope": removals.indexed, "to_remove": len(removals)}
    store.write_run(_run_record(cfg, run_id, chash, RUN_RUNNING, started_at=started, resumes=resumes,
                                n_inputs=len(refs), n_todo=len(todo), skipped=skipped, mirror=mirror))
    phases["ledger"] = time.monotonic() - t_phase
    hasher = ContentHasher(max_bytes=cfg.decode.max_bytes)
    keyed = KeyedRefs(by_id, hasher)      # refs with their content keys, as the commits need them
    committer: Committer | None = None
    buffers: list[CommitBuffer] = []      # the reused files' commits, then the processed files'
    progress = Progress(len(todo), cfg.progress)
    reuse_progress = Progress(0, False)
    to_process = list(todo)
    n_removed = 0
    times: list[dict[str, Any]] = list(resumed_rec.get(stage_times.RECORD_KEY, [])) if resumed_rec else []
    status = RUN_FAILED
    error: str | None = None
    resources: dict[str, Any] | None = None    # what the first pass planned (None: no Ray needed)
    stop = lifecycle.StopSignals()

    def counts_so_far() -> dict[str, int]:
        return {"removed": int(earlier.get("removed", 0)) + n_removed,
                "reused": int(earlier.get("reused", 0)) + reuse_progress.done}

    try:
        stop.__enter__()   # SIGTERM / SIGINT -> Interrupted (restored in the finally below)
        check_removals(removals, cfg.max_removed)   # a bad listing fails the run before any commit
        # Content keys: now for the files that may be copies (an indexed file of their size can be
        # a source), to decide; the others' are hashed while Ray processes them, for their rows.
        sizes = reusable_sizes(store, chash) if todo else set()
        maybe_copies = [r for r in todo if r.size_bytes in sizes]
        sources: dict[str, ReuseSource] = {}
        if maybe_copies:
            t_phase = time.monotonic()
            hasher.submit(maybe_copies)
            maybe_copies = [keyed[r.file_id] for r in maybe_copies]
            phases["hash"] = time.monotonic() - t_phase
            t_phase = time.monotonic()
            sources = find_sources(store, maybe_copies, chash, n_tasks=len(tasks))   # before our commits
            phases["reuse"] = time.monotonic() - t_phase
        to_process = [r for r in todo if r.file_id not in sources]
        hasher.submit(to_process)

        committer = Committer(store, run_id)
        # files of an interrupted removal that the listing returns again: processed again
        todo_ids = {r.file_id for r in todo}
        again = [by_id[i] for i in committer.in_flight_removal() if i in by_id and i not in todo_ids]
        to_process += again
        committer.settle_in_flight([*todo_ids, *(r.file_id for r in again)])
        if removals.file_ids:
            t_phase = time.monotonic()
            with lifecycle.critical():   # a stop signal waits until both tables have the removal
                committer.remove(removals.file_ids)
            n_removed = len(removals)
            phases["remove"] = time.monotonic() - t_phase
        if sources:
            t_phase = time.monotonic()
            reuse_progress = Progress(len(sources), False)
            reuse_buffer = CommitBuffer(committer, keyed, reuse_progress, run_id=run_id, model_id=model_id,
                                        chash=chash, flush_files=REUSE_BATCH, flush_seconds=math.inf,
                                        commit_share=None)
            buffers.append(reuse_buffer)
            reused = [r for r in todo if r.file_id in sources]
            for start in range(0, len(reused), REUSE_BATCH):
                reuse_buffer.add([reused_file(keyed[r.file_id], sources[r.file_id])
                                  for r in reused[start:start + REUSE_BATCH]])
            reuse_buffer.flush()
            phases["reuse_commit"] = time.monotonic() - t_phase
            log.info("%d file(s) reuse the results of the same content under another uri", len(reused))
        if n_removed or sources:
            store.write_run(_run_record(cfg, run_id, chash, RUN_RUNNING, started_at=started, resumes=resumes,
                                        n_inputs=len(refs), n_todo=len(todo), skipped=skipped, mirror=mirror,
                                        counts=counts_so_far()))

        progress = Progress(len(to_process), cfg.progress)
        buffer = CommitBuffer(committer, keyed, progress, run_id=run_id, model_id=model_id, chash=chash,
                              flush_files=cfg.flush_files, flush_seconds=cfg.flush_seconds)
        buffers.append(buffer)
        if to_process:
            t_init = time.monotonic()
            with ray_session(cfg):
                stop.install()   # ray.init replaced the SIGTERM handler with its own
                phases["ray_init"] = time.monotonic() - t_init
                t_phase = time.monotonic()
                pass_refs = to_process
                for pass_no in range(max(1, cfg.max_passes)):
                    missing, pass_times, plan = run_pass(cfg, pass_refs, tasks, buffer, isolate=pass_no > 0)
                    times.extend(pass_times)
                    resources = resources or dataclasses.asdict(plan)
                    if not missing:
                        break
                    log.warning("%d files did not complete in pass %d (a worker died); retrying them in isolation",
                                len(missing), pass_no + 1)
                    pass_refs = [by_id[m] for m in missing]
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
        status = RUN_COMPLETED
    except (lifecycle.Interrupted, KeyboardInterrupt) as e:
        # Stopped by a signal (a pod eviction, `ray job stop`, Ctrl-C): the graph is shut down
        # (Ray too, when this run started it); the files already complete are committed, the rest
        # are redone when the same command resumes the run.
        status = RUN_INTERRUPTED
        error = str(e) if isinstance(e, lifecycle.Interrupted) else "interrupted (KeyboardInterrupt)"
        hasher.stop()   # files still being hashed are committed without a content key
        for b in buffers:
            _try(b.flush)
        log.warning("run %s %s: %d files committed; the same command resumes it", run_id, error,
                    sum(len(b.committed_ids) for b in buffers))
        raise
    except Exception as e:
        # A failure of the run itself (output not writable, cluster gone, too many removals, a
        # bug): the run record says so in one line, the traceback goes next to it, and the caller
        # gets RunFailed.
        status = RUN_FAILED
        error = one_line(e)
        log.debug("run %s failed", run_id, exc_info=True)
        if isinstance(e, StallError):
            hasher.stop()
            for b in buffers:
                _try(b.flush)   # files that did complete before the stall are kept

        _try(store.write_bytes, store.path(RUNS_DIR, run_id, "error.txt"),
             "".join(traceback.format_exception(e)).encode())
        raise RunFailed(run_id, error) from e
    finally:
        hasher.stop()
        wall = time.monotonic() - t0
        progress.tick(force=True)
        totals = {
            "n_inputs": len(refs), "skipped": skipped, "processed": progress.done,
            "ok": progress.status[schemas.STATUS_OK], "partial": progress.status[schemas.STATUS_PARTIAL],
            "error": progress.status[schemas.STATUS_ERROR], "error_types": dict(progress.error_types),
            "audio_hours": progress.audio_s / 3600, "wall_s": wall, **counts_so_far(),
        }
        # phases_s: list (inputs), ledger (pending files, removals, run record), hash (content keys
        # of possible copies), reuse (their sources), remove and reuse_commit (those commits),
        # ray_init, graph (the Ray Data passes, driver commits included: commit_s of it), finish
        # (compaction and checkpoints). removed / reused: over all attempts of the run.
        commit_s = sum(b.commit_s for b in buffers)
        counts = {**totals, "n_todo": len(todo), "n_to_process": len(to_process), "commit_s": round(commit_s, 3),
                  "ray_init_s": round(phases.get("ray_init", 0.0), 3),
                  "hashed_files": hasher.files, "hashed_bytes": hasher.bytes, "hash_s": round(hasher.seconds, 3),
                  "phases_s": {k: round(v, 3) for k, v in phases.items()}}
        n_commits = committer.n_commits if committer is not None else 0
        _try(store.write_run, _run_record(cfg, run_id, chash, status, started_at=started, resumes=resumes,
                                          finished_at=utcnow().isoformat(), counts=counts, mirror=mirror,
                                          resources=resources, error=error, **{stage_times.RECORD_KEY: times},
                                          n_commits_this_attempt=n_commits, n_inputs=len(refs)))
        stop.__exit__(None, None, None)   # the previous handlers, once the record says how the run ended
    return RunSummary(run_id=run_id, out=cfg.out, resumed=resumed_rec is not None,
                      n_commits=committer.n_commits if committer is not None else 0, status=status, **totals)
