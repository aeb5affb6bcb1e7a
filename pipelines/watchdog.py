"""Progress watchdog for the driver's result loop: a run that stops producing results fails with
a one-line reason instead of hanging.

Why a run can stop: when a node dies, Ray restarts its actors elsewhere, and a restarted actor
waits until some node has the CPUs and GPUs it asks for. The tasks queued on it wait with it,
and Ray Data waits for those tasks without a limit (it only logs that an operator "is running
but has no outputs"). When no node will ever have room (the lost node was the only GPU node and
no replacement comes), the driver blocks inside ``iter_batches`` for good.

:func:`watch` moves the iteration into a feeder thread that hands items to the driver through a
one-slot queue. The driver waits on the queue with a deadline: when nothing arrives for
``timeout_s`` while it waits, it describes what is stalled, stops the iteration and raises
:class:`StallError`. Time the driver spends on an item (assembling results, committing) does not
count: the clock runs only while the driver waits, and the feeder blocks on the full queue
meanwhile. :func:`watch_dataset` adds the Ray Data side: the reason names the stalled operator
and the cluster's free resources, and stopping shuts the dataset's executor down (which kills
its actors and unblocks the feeder thread).

A stalled run's record says ``failed`` with the reason, the CLI exits 1, and the same command
resumes the run: what was committed before the stall stays committed (each commit is atomic) and
the rest is redone.

:func:`watch` is plain ``threading`` and runs without Ray; Ray is imported only by the functions
that read or stop a Ray Data execution.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# The default stall timeout (``default_stall_timeout_s``) is generous on purpose: it must never fire
# on a healthy run, only turn a hang into a failure. It is a bound, not an estimate:
#
#     timeout = STALL_BASE_S + batch_size * sum over tasks(max_new_tokens * num_beams) * s_per_token
#
# STALL_BASE_S covers starting an actor and loading the model on a fresh node (the first result
# of a pass waits for both) with room to spare; the second term bounds one inference batch, the
# longest legitimate gap between two results: every row of the batch generating every token of
# every task. s_per_token is an upper bound of what one generated token of one batch row costs
# on a GPU actor (batched generation costs far less per row); CPU actors get CPU_SLOWDOWN times it.
STALL_BASE_S = 900.0
SECONDS_PER_ROW_TOKEN: dict[str, float] = {"tiny": 0.0005, "salmonn-7b": 0.005, "salmonn-13b": 0.01}
DEFAULT_SECONDS_PER_ROW_TOKEN = 0.01   # a model directory: priced like the largest preset
CPU_SLOWDOWN = 20.0

_JOIN_S = 30.0   # how long a stopped feeder thread may take to finish


class StallError(RuntimeError):
    """No result reached the driver for ``timeout_s``; the message is one line: the stalled
    operator and the cluster's free resources."""

    def __init__(self, reason: str, timeout_s: float):
        super().__init__(reason)
        self.reason = reason
        self.timeout_s = timeout_s


def default_stall_timeout_s(*, model: str, tasks: Sequence[Any], batch_size: int, on_gpu: bool) -> float:
    """The formula above. ``tasks``: objects with ``settings.max_new_tokens`` and
    ``settings.num_beams`` (``salmonn.Task``)."""
    tokens = sum(int(t.settings.max_new_tokens) * max(1, int(t.settings.num_beams)) for t in tasks)
    per_token = SECONDS_PER_ROW_TOKEN.get(model, DEFAULT_SECONDS_PER_ROW_TOKEN)
    if not on_gpu:
        per_token *= CPU_SLOWDOWN
    return STALL_BASE_S + max(1, batch_size) * tokens * per_token


def stall_timeout_s(cfg: Any, tasks: Sequence[Any], batch_size: int, plan: Any) -> float:
    """The pass's stall timeout: ``cfg.stall_timeout_s`` when set, else the default for this
    model, these tasks, the pass's batch size and whether inference runs on GPUs (``plan``:
    the pass's ``pipelines.run.Resources``)."""
    explicit = getattr(cfg, "stall_timeout_s", None)
    if explicit is not None:
        return float(explicit)
    return default_stall_timeout_s(model=cfg.model, tasks=tasks, batch_size=batch_size,
                                   on_gpu=plan.gpus_per_infer_actor > 0)


# ---------------------------------------------------------------------------------------------
# The watchdog (no Ray)
# ---------------------------------------------------------------------------------------------

_ITEM, _END, _ERROR = "item", "end", "error"


def watch(items: Iterable[T], timeout_s: float, *, describe: Callable[[float], str] | None = None,
          stop: Callable[[BaseException | None], None] | None = None, poll_s: float = 0.5) -> Iterator[T]:
    """Yield ``items``, raising :class:`StallError` when none arrives for ``timeout_s`` seconds
    of waiting.

    ``items`` is iterated in a daemon thread. ``describe(waited_s)`` builds the one-line reason
    (called before stopping, while the stalled state can still be read). ``stop(error)`` must
    make the blocked iteration return or raise; it is called when the watchdog fires (with the
    StallError) and when the consumer stops early while the feeder is still running (with None).
    An exception raised by ``items`` is re-raised here, in the consumer's thread.
    """
    if not timeout_s > 0:
        raise ValueError(f"stall timeout must be > 0 seconds, got {timeout_s!r}")
    slot: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    halt = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not halt.is_set():
            try:
                slot.put((kind, value), timeout=poll_s)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put(_ITEM, item):
                    break
            else:
                put(_END, None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_ERROR, e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:  # noqa: BLE001 - the iteration is over either way
                    log.debug("closing the watched iterator: %s", e)

    feeder = threading.Thread(target=feed, name="salmonn-pipeline-results", daemon=True)
    feeder.start()
    stall: StallError | None = None
    try:
        while True:
            t0 = time.monotonic()
            try:
                kind, value = slot.get(timeout=timeout_s)
            except queue.Empty:
                waited = time.monotonic() - t0
                reason = _safe(describe, waited) if describe else None
                stall = StallError(reason or f"no result for {waited:.0f} s (stall timeout {timeout_s:g} s)",
                                   timeout_s)
                log.error("stalled: %s", stall.reason)
                raise stall from None
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        halt.set()
        if stall is None:
            feeder.join(timeout=1.0)   # finished, or about to see the halt
        if feeder.is_alive() and stop is not None:
            try:
                stop(stall)
            except Exception as e:  # noqa: BLE001 - the thread is a daemon; report and go on
                log.warning("could not stop the stalled iteration: %s", e)
        feeder.join(timeout=_JOIN_S)
        if feeder.is_alive():
            log.warning("the result thread did not finish within %.0f s of being stopped; leaving it "
                        "(a daemon thread)", _JOIN_S)


def _safe(fn: Callable[[float], str], waited: float) -> str | None:
    try:
        return fn(waited)
    except Exception as e:  # noqa: BLE001 - a failing description must not hide the stall
        log.warning("could not describe the stall: %s", e)
        return None


# ---------------------------------------------------------------------------------------------
# Ray Data: which operator is stalled, what the cluster has free, stopping the execution
# ---------------------------------------------------------------------------------------------

# Executors of the datasets being watched, by dataset id (filled by _ExecutorCapture).
_EXECUTORS: dict[str, Any] = {}
_EXECUTORS_LOCK = threading.Lock()


class _ExecutorCapture:
    """Ray Data execution callback (``DataContext.custom_execution_callback_classes``) that
    remembers each execution's executor by dataset id while it runs: the watchdog reads its
    operators' state and shuts it down. (``Dataset`` keeps its executor only from the first
    output on, and a pass can stall before that.)"""

    def before_execution_starts(self, executor: Any) -> None:
        with _EXECUTORS_LOCK:
            _EXECUTORS[executor._dataset_id] = executor

    def on_execution_step(self, executor: Any) -> None:
        pass

    def after_execution_succeeds(self, executor: Any) -> None:
        self._forget(executor)

    def after_execution_fails(self, executor: Any, error: Exception) -> None:
        self._forget(executor)

    @staticmethod
    def _forget(executor: Any) -> None:
        with _EXECUTORS_LOCK:
            if _EXECUTORS.get(executor._dataset_id) is executor:
                del _EXECUTORS[executor._dataset_id]


def watch_dataset(ds: Any, batches: Iterable[T], timeout_s: float) -> Iterator[T]:
    """:func:`watch` for the batches of a Ray Data dataset ``ds`` (``batches`` =
    ``ds.iter_batches(...)``, not yet started). A stall names the stalled operator and the
    cluster's free resources, and shuts the dataset's execution down."""
    ctx = ds.context
    if _ExecutorCapture not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, _ExecutorCapture]
    # Ray Data's own no-progress guard (30 min by default) would end the run with a less specific
    # error first when this timeout is longer; keep it as a backstop behind the watchdog.
    if 0 < ctx.execution_no_progress_timeout_s < 2 * timeout_s + 60:
        ctx.execution_no_progress_timeout_s = 2 * timeout_s + 60

    def executor() -> Any:
        with _EXECUTORS_LOCK:
            found = _EXECUTORS.get(ds.get_dataset_id())
        return found if found is not None else getattr(ds, "_current_executor", None)

    def describe(waited: float) -> str:
        return describe_stall(executor(), waited, timeout_s, fallback=_stage_names(ds))

    def stop(error: BaseException | None) -> None:
        ex = executor()
        if ex is not None:
            ex.shutdown(force=True, exception=error if isinstance(error, Exception) else None)

    return watch(batches, timeout_s, describe=describe, stop=stop)


def describe_stall(executor: Any, waited_s: float, timeout_s: float, *, fallback: Sequence[str] = ()) -> str:
    """One line: how long nothing came, the stalled operator with its actors and tasks, and the
    cluster's free resources."""
    head = f"no result for {waited_s:.0f} s (stall timeout {timeout_s:g} s)"
    try:
        states = operator_states(executor) if executor is not None else []
    except Exception as e:  # noqa: BLE001 - Ray Data internals; the stage names still say enough
        log.warning("could not read Ray Data's operator state: %s", e)
        states = []
    stalled = pick_stalled(states)
    if stalled is not None:
        where = f"stalled operator: {format_operator(stalled)}"
        others = [s["name"] for s in states if s is not stalled and not s["done"]]
        if others:
            where += f" (also running: {', '.join(others)})"
    else:
        names = ", ".join(fallback) or "the pipeline's stages"
        where = f"stalled in one of: {names} (Ray Data's executor state was not readable)"
    line = f"{head}; {where}; {cluster_free()}"
    if stalled is not None and (stalled.get("restarting") or stalled.get("pending")):
        line += "; an actor waits for a node with what it needs: add one, or rerun (planned for the nodes left)"
    return line


def operator_states(executor: Any) -> list[dict[str, Any]]:
    """Per operator of a running Ray Data executor, upstream first: name, done, tasks in flight,
    queued input blocks, outputs taken, and for actor pools the actors alive / restarting /
    pending and what each asks for."""
    out = []
    topology = getattr(executor, "_topology", None) or {}
    for op, state in list(topology.items()):
        if not op.input_dependencies:
            continue  # the input buffer
        s: dict[str, Any] = {
            "name": op.name, "done": bool(op.has_completed()), "active": int(op.num_active_tasks()),
            "queued": int(state.total_enqueued_input_blocks()),
            "outputs": int(getattr(op.metrics, "num_outputs_taken", 0) or 0),
        }
        if op.get_autoscaling_actor_pools():   # an actor pool
            a = op.get_actor_info()
            s.update(alive=a.running, restarting=a.restarting, pending=a.pending)
            need = op.min_scheduling_resources()
            s["needs"] = {"CPU": need.cpu, "GPU": need.gpu}
        out.append(s)
    return out


def pick_stalled(states: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The operator the run waits on: the most downstream unfinished one with actors that wait
    to be placed (restarting or pending) and work queued; else the most downstream one with
    work in flight or queued; else the most downstream unfinished one."""
    running = [s for s in states if not s["done"]]
    waiting = [s for s in running if (s.get("restarting") or s.get("pending")) and (s["active"] or s["queued"])]
    busy = [s for s in running if s["active"] or s["queued"]]
    for group in (waiting, busy, running):
        if group:
            return group[-1]
    return None


def format_operator(s: dict[str, Any]) -> str:
    parts = [f"{s['active']} task(s) in flight", f"{s['queued']} queued"]
    if "alive" in s:
        need = " + ".join(f"{k} {v:g}" for k, v in s["needs"].items() if v) or "nothing"
        parts.append(f"actors {s['alive']} alive/{s['restarting']} restarting/{s['pending']} pending, "
                     f"each needs {need}")
    return f"{s['name']} [{', '.join(parts)}]"


def cluster_free() -> str:
    """``cluster free: CPU a/b, GPU c/d[, custom e/f]; N node(s) alive`` of the connected Ray."""
    try:
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception as e:  # noqa: BLE001 - the cluster itself may be what failed
        return f"cluster resources unavailable ({type(e).__name__}: {e})"
    skip = ("node:", "memory", "object_store_memory", "accelerator_type:")
    keys = ["CPU", "GPU"] + sorted(k for k in total if k not in ("CPU", "GPU") and not k.startswith(skip))
    res = ", ".join(f"{k} {free.get(k, 0.0):g}/{total.get(k, 0.0):g}" for k in keys)
    return f"cluster free: {res}; {alive} node(s) alive"


def _stage_names(ds: Any) -> list[str]:
    """Operator names of ``ds``'s logical plan, upstream first (best effort)."""
    names: list[str] = []
    try:
        op = ds._logical_plan.dag
        while op is not None:
            names.append(op.name)
            deps = op.input_dependencies
            op = deps[0] if deps else None
    except Exception:  # noqa: BLE001 - only for the message
        return []
    return names[::-1]
