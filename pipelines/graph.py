"""The Ray parts of a run: the session, the attempt ledger, the resources a pass plans from the
cluster, the stage specs of the graph and the pass loop.

    list inputs (driver) -> decode + window (CPU actor pool) -> SALMONN (GPU actor pool)
        -> result rows streamed back to the driver -> ResultAssembler -> CommitBuffer

The graph is data: :func:`stage_specs` returns each stage as its callable, constructor arguments
and ``map_batches`` arguments (the shape of Ray's own ``ray.data.llm`` processors), and
:func:`run_pass` applies them in a loop. Heavy data (audio) never passes through the driver; text
results do, which keeps the commit simple and exactly-once (``pipelines.output``). Ray is imported
here and in ``jobs/`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pipelines import stage_times
from pipelines.config import PipelineConfig, resolve_engine
from pipelines.driver import CommitBuffer
from pipelines.sources import FileRef
from pipelines.stages import DecodeStage, ResultAssembler, refs_table
from pipelines.watchdog import stall_timeout_s, watch_dataset

log = logging.getLogger(__name__)


def one_line(e: BaseException) -> str:
    """``ExceptionType: first line of the message`` (at most 500 characters)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__


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
    return RayAttemptLedger(AttemptCounter.options(scheduling_strategy=driver_node).remote())  # type: ignore[attr-defined]


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


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of the graph: its callable class, the arguments its actors are built with and
    the ``map_batches`` arguments (batch size, actor pool, resources)."""

    fn: type
    constructor_kwargs: dict[str, Any]
    map_kwargs: dict[str, Any]


def configure_data_context(cfg: PipelineConfig) -> Any:
    """Ray Data's settings for a run's passes (the current ``DataContext``)."""
    from ray.data import DataContext

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
    return ctx


def stage_specs(cfg: PipelineConfig, tasks: Sequence[Any], plan: Resources, batch_size: int,
                ledger: Any) -> list[StageSpec]:
    """The graph after the listing: decode + window on CPU actors, then SALMONN on the inference
    actors."""
    from ray.data import ActorPoolStrategy

    from pipelines.infer import CONCURRENT_BATCHES, SalmonnPredictor

    # The pipeline's own switches (the test fault hook) reach the workers of this run only ...
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("SALMONN_PIPELINE_")}
    stage_env = {"env_vars": env_vars} if env_vars else None
    # ... and vLLM's own settings (VLLM_CPU_KVCACHE_SPACE, VLLM_ENABLE_V1_MULTIPROCESSING, ...) the
    # inference actors that run it.
    infer_vars = {**env_vars, **{k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}
    infer_env = {"env_vars": infer_vars} if infer_vars else None
    concurrent = CONCURRENT_BATCHES[plan.engine]   # batches one inference actor runs at once
    # Ray warns that these actors have "constructor arguments in the object store and max_restarts
    # > 0". Not silenced, and harmless here: the arguments are the driver's own ray.put objects (the
    # stage callable with its settings, the DataContext), held by the operator for the whole run,
    # primary copy on the driver's node, so a restarted actor always finds them; only the driver's
    # death loses them, and that ends the run anyway. Silencing needs a process-wide C++ log level.
    decode = StageSpec(
        DecodeStage,
        {"options": cfg.decode, "storage_options": dict(cfg.storage_options),
         "windows_per_batch": cfg.windows_per_batch, "ledger": ledger, "max_attempts": cfg.crash_attempts,
         "speech_gate": cfg.speech_gate, "cut_at_pauses": cfg.cut_at_pauses},
        {"batch_size": 1, "compute": ActorPoolStrategy(min_size=1, max_size=plan.decode_actors),
         "num_cpus": plan.cpus_per_decode_actor, "runtime_env": stage_env},
    )
    infer = StageSpec(
        SalmonnPredictor,
        {"model": cfg.model, "tasks": list(tasks), "model_options": dict(cfg.model_options),
         "ledger": ledger, "max_attempts": cfg.crash_attempts,
         "speech_threshold": cfg.speech_threshold if cfg.speech_gate else None,
         "engine": plan.engine, "engine_options": engine_options(plan), "timed_text": cfg.timed_text},
        # With vLLM two batches run at once in each actor (threads): the next one is encoded while
        # the engine generates the answers of the one before, and its requests join the running
        # engine, which never idles between Ray Data batches (pipelines.infer).
        {"batch_size": batch_size,
         "compute": ActorPoolStrategy(size=plan.infer_actors, max_concurrent_calls_per_actor=concurrent,
                                      enable_true_multi_threading=concurrent > 1),
         "num_gpus": plan.gpus_per_infer_actor, "num_cpus": plan.cpus_per_infer_actor, "runtime_env": infer_env},
    )
    return [decode, infer]


def run_pass(cfg: PipelineConfig, refs: Sequence[FileRef], tasks: Sequence[Any], buffer: CommitBuffer, *,
             isolate: bool) -> tuple[list[str], list[dict[str, Any]], Resources]:
    """One pass of the Ray Data graph over ``refs``; returns (file ids not completed, stage times,
    the resources it planned)."""
    import ray

    from pipelines.infer import CONCURRENT_BATCHES

    ctx = configure_data_context(cfg)
    plan = plan_resources(cfg)
    batch_size = 1 if isolate else plan.batch_size
    # Backpressure: decoding may run only a few inference batches ahead. Without a bound Ray Data
    # lets an operator fill its share of the object store (a 30% of RAM default): a decode actor
    # ran ~1,000 windows (1.9 GB) ahead of a CPU inference actor on one long file. The bound is
    # object-store bytes: the batches decode may have ready (prefetch) plus the ones each inference
    # actor holds in flight (Ray Data submits 2 per actor), doubled because Ray Data reserves about
    # half of the budget per operator and shares the rest.
    concurrent = CONCURRENT_BATCHES[plan.engine]
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

    # One input block per file (up to 10,000 blocks), typed from the start (schemas.stage).
    refs_tbl = refs_table(refs)
    per_block = -(-len(refs) // 10_000)
    ds: Any = ray.data.from_arrow([refs_tbl.slice(i, per_block) for i in range(0, len(refs), per_block)])
    for spec in stage_specs(cfg, tasks, plan, batch_size, start_ledger()):
        ds = ds.map_batches(spec.fn, fn_constructor_kwargs=spec.constructor_kwargs, batch_format="pyarrow",
                            zero_copy_batch=True, **spec.map_kwargs)
    assembler = ResultAssembler([t.name for t in tasks])
    # No result for the stall timeout (a restarted actor with nowhere to run) raises StallError.
    for batch in watch_dataset(ds, ds.iter_batches(batch_size=None, batch_format="pyarrow"), stall_s):
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
    committed = buffer.committed_ids
    missing = [r.file_id for r in refs if r.file_id not in committed]
    return missing, times, plan


def run_passes(cfg: PipelineConfig, refs: Sequence[FileRef], tasks: Sequence[Any],
               buffer: CommitBuffer) -> tuple[list[str], list[dict[str, Any]], Resources | None]:
    """Up to ``cfg.max_passes`` passes: the first over ``refs``, each next one over the files the
    one before did not complete (a worker died under them), one window per batch to isolate the
    culprit. Returns (file ids no pass completed, stage times, the first pass's resources)."""
    by_id = {r.file_id: r for r in refs}
    times: list[dict[str, Any]] = []
    first: Resources | None = None
    pass_refs = list(refs)
    missing: list[str] = []
    for pass_no in range(max(1, cfg.max_passes)):
        missing, pass_times, plan = run_pass(cfg, pass_refs, tasks, buffer, isolate=pass_no > 0)
        times.extend(pass_times)
        first = first or plan
        if not missing:
            break
        log.warning("%d files did not complete in pass %d (a worker died); retrying them in isolation",
                    len(missing), pass_no + 1)
        pass_refs = [by_id[m] for m in missing]
    return missing, times, first
