"""Cluster faults (issue 16): the progress watchdog, the headroom rule, the pinned attempt ledger,
and runs that lose a node of a simulated multi-node Ray cluster.

The cluster is ``ray.cluster_utils.Cluster`` on this machine: a head with 0 CPUs (it runs the
driver, as a KubeRay head does), a CPU worker node and a "GPU" worker node (``num_gpus=1``
declared; the tiny model runs on its CPU), each with 1 CPU, a custom resource naming it and a
200 MB object store. The run is the real CLI with ``--address``; a node is killed abruptly
(``remove_node(allow_graceful=False)``) once the run has committed its first file, and a
replacement node of the same kind is added or not. Each run must end by itself or be failed by
the watchdog, and the same command again must leave every (file, segment, task) exactly once.

The test process never connects to the cluster (other tests share a local Ray in this process);
it reads actor placement from the cluster's GCS through ``Cluster.global_state``.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import watchdog
from pipelines.config import PipelineConfig
from pipelines.output import OutputStore
from pipelines.synth import noise, speech_like, tone, write_audio
from schemas.vocabulary import RUN_COMPLETED, RUN_FAILED
from tests.driver_kill import CLI

OBJECT_STORE = 200 * 2**20
N_CLIPS, CLIP_S, WINDOW_S = 6, 4.0, 2.0      # 2 windows per clip
N_TASKS = 3
STALL_S = 60          # the runs' stall timeout: above an actor's restart and model load on a loaded machine
RUN_LIMIT_S = 420     # a run neither finished nor failed by then hangs (a missing watchdog)
NODE_KINDS = {
    "cpu": {"num_cpus": 1, "resources": {"test_cpu_node": 1}},
    "gpu": {"num_cpus": 1, "num_gpus": 1, "resources": {"test_gpu_node": 1}},
}
STAGES = {"decode": "DecodeStage", "infer": "SalmonnPredictor", "ledger": "AttemptCounter"}
# A node is declared dead after 5 missed health checks: 1 s apart here (3 s by default), so a loss
# costs the tests 5 s of detection instead of 15.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
# Decoding the second half of the clips takes a while, so the decode actor is still at work when
# the first file is committed (decode otherwise finishes long before inference).
SLOW_DECODE = [{"stage": "decode", "uri_contains": f"clip{i:02d}", "sleep_s": 8.0} for i in range(N_CLIPS // 2, N_CLIPS)]


# ---------------------------------------------------------------------------------------------
# The watchdog on plain iterators (no Ray)
# ---------------------------------------------------------------------------------------------

def _feeder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "salmonn-pipeline-results"]


def test_watchdog_fires_on_a_stalled_iterator_and_stops_it():
    release = threading.Event()
    stopped = []

    def stalls():
        yield 1
        yield 2
        release.wait()        # blocks like a Ray Data iterator whose next block never comes
        yield 3

    def stop(error):
        stopped.append(error)
        release.set()

    got = []
    t0 = time.monotonic()
    with pytest.raises(watchdog.StallError) as info:
        for item in watchdog.watch(stalls(), 1.0, describe=lambda waited: f"stuck after {waited:.0f} s",
                                   stop=stop):
            got.append(item)
    assert got == [1, 2]
    assert str(info.value) == "stuck after 1 s" and info.value.timeout_s == 1.0
    assert 1.0 <= time.monotonic() - t0 < 30
    assert stopped == [info.value], "the stalled iteration is stopped with the error"
    assert not _feeder_threads(), "the feeder thread ends once stopped"


def test_watchdog_does_not_fire_while_results_keep_coming():
    def slow():
        for i in range(5):
            time.sleep(0.5)   # each gap well inside the timeout, the whole run far beyond it
            yield i

    assert list(watchdog.watch(slow(), 4.0)) == list(range(5))
    # the driver's own time on an item (committing) does not count: only its waits do
    items = []
    for item in watchdog.watch(iter(range(3)), 0.5):
        time.sleep(1.0)
        items.append(item)
    assert items == [0, 1, 2]
    assert not _feeder_threads()


def test_watchdog_passes_errors_and_stops_an_abandoned_iteration():
    def fails():
        yield 1
        raise ValueError("decode exploded")

    with pytest.raises(ValueError, match="decode exploded"):
        list(watchdog.watch(fails(), 5.0))

    release = threading.Event()
    stopped = []

    def endless():
        yield 1
        release.wait()
        yield 2

    def stop(error):
        stopped.append(error)
        release.set()

    for _ in watchdog.watch(endless(), 30.0, stop=stop):
        break          # the driver gives up early (its own error): the feeder must not linger
    assert stopped == [None]
    assert not _feeder_threads()


def test_default_stall_timeout_formula():
    import salmonn

    tasks = salmonn.default_tasks()
    tokens = sum(t.settings.max_new_tokens * t.settings.num_beams for t in tasks)
    gpu_13b = watchdog.default_stall_timeout_s(model="salmonn-13b", tasks=tasks, batch_size=32, on_gpu=True)
    assert gpu_13b == pytest.approx(watchdog.STALL_BASE_S + 32 * tokens * 0.01)
    cpu_tiny = watchdog.default_stall_timeout_s(model="tiny", tasks=tasks, batch_size=8, on_gpu=False)
    assert watchdog.STALL_BASE_S < cpu_tiny < gpu_13b
    assert watchdog.default_stall_timeout_s(model="/models/x", tasks=tasks, batch_size=32, on_gpu=True) == gpu_13b
    cfg = PipelineConfig(input="x", out="y", stall_timeout_s=42.0)
    assert watchdog.stall_timeout_s(cfg, tasks, 32, None) == 42.0


# ---------------------------------------------------------------------------------------------
# The watchdog on a real Ray Data execution, and the headroom rule
# ---------------------------------------------------------------------------------------------

class _Echo:
    def __call__(self, batch):
        return batch


@pytest.mark.slow
def test_watchdog_names_the_operator_that_cannot_be_placed(ray_local):
    """An actor pool whose actor asks for a resource no node has: Ray Data waits without end; the
    watchdog names the operator and its pending actor, and shuts the execution down."""
    import ray

    ds = ray.data.from_items(list(range(8))).map_batches(
        _Echo, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, resources={"no_such_node": 1})
    t0 = time.monotonic()
    with pytest.raises(watchdog.StallError) as info:
        for _ in watchdog.watch_dataset(ds, ds.iter_batches(batch_size=None), 10.0):
            pass
    reason = str(info.value)
    assert "\n" not in reason
    assert "stalled operator: MapBatches(_Echo)" in reason, reason
    assert "1 pending" in reason and "cluster free: CPU" in reason, reason
    assert time.monotonic() - t0 < 120
    assert not _feeder_threads()
    # the execution is shut down: the pool's pending actor is gone, the cluster's CPUs are free
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_headroom_rule():
    from pipelines.graph import plan_resources

    cfg = PipelineConfig(input="x", out="y")
    # nodes of many CPUs: one CPU per actor, as without the rule
    big = plan_resources(cfg, {"CPU": 40.0, "GPU": 1.0}, [{"CPU": 16.0}, {"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}, {}])
    assert (big.cpus_per_infer_actor, big.cpus_per_decode_actor, big.decode_actors) == (1.0, 1.0, 39)
    # two 1-CPU workers (this module's cluster): inference + one decode actor fit on either alone
    small = plan_resources(cfg, {"CPU": 2.0, "GPU": 1.0}, [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {}])
    assert small.cpus_per_infer_actor + small.cpus_per_decode_actor <= 1.0
    assert (small.infer_actors, small.decode_actors) == (1, 1)
    # what is left of it after losing a node, and a 1-CPU machine: the plan still fits
    for left in ({"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}):
        plan = plan_resources(cfg, left, [left, {}])
        assert plan.cpus_per_infer_actor + plan.decode_actors * plan.cpus_per_decode_actor <= 1.0


# ---------------------------------------------------------------------------------------------
# Node loss on a simulated cluster
# ---------------------------------------------------------------------------------------------

class SimCluster:
    """A head (0 CPUs, the driver's node) plus one worker node of each kind in NODE_KINDS."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE,
                                               "_system_config": HEALTH_CHECKS})
        self.nodes: dict[str, object] = {}
        self.restore()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, kind: str) -> None:
        self.nodes[kind] = self.cluster.add_node(object_store_memory=OBJECT_STORE, **NODE_KINDS[kind])

    def remove(self, kind: str) -> None:
        self.cluster.remove_node(self.nodes.pop(kind), allow_graceful=False)

    def restore(self) -> None:
        """Every kind of worker node present (a previous test may have removed one)."""
        for kind in NODE_KINDS:
            if kind not in self.nodes:
                self.add(kind)

    def kind_of(self, node_id: str) -> str:
        if node_id == self.cluster.head_node.node_id:
            return "head"
        return next((k for k, n in self.nodes.items() if n.node_id == node_id), f"gone:{node_id[:8]}")

    def placements(self) -> dict[str, str]:
        """stage (decode / infer / ledger) -> the kind of node its alive actor is on."""
        out = {}
        for a in self.cluster.global_state.actor_table(None).values():
            if a["State"] != "ALIVE":
                continue
            for stage, cls in STAGES.items():
                if cls in a["ActorClassName"]:
                    out[stage] = self.kind_of(a["Address"]["NodeID"])
        return out

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def sim():
    c = SimCluster()
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cluster-audio")
    for i in range(N_CLIPS):
        sig = [tone(200.0 + 30 * i, CLIP_S, 16000), noise(CLIP_S, 16000), speech_like(CLIP_S, 16000, seed=i)][i % 3]
        write_audio(d / f"clip{i:02d}.flac", sig, 16000, "flac")
    return d


def run_command(sim: SimCluster, audio: Path, out: Path) -> list[str]:
    return [*CLI, "run", str(audio), "--out", str(out), "--address", sim.address,
            "--window-s", str(WINDOW_S), "--batch-size", "2", "--flush-files", "1", "--flush-seconds", "0",
            "--speech-gate", "off", "--no-progress", "--stall-timeout-s", str(STALL_S)]


def first_commit_done(out: Path) -> bool:
    # the files table's version 0 creates it; version 1 is the first committed file
    return bool(glob.glob(str(out / "files" / "_delta_log" / f"{1:020d}.json")))


def finish(proc: subprocess.Popen, log: Path, t0: float) -> tuple[int, float, str]:
    try:
        rc = proc.wait(timeout=max(1.0, RUN_LIMIT_S - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the run neither finished nor failed within {RUN_LIMIT_S} s: it hangs\n"
                    + log.read_text()[-3000:])
    return rc, time.monotonic() - t0, log.read_text()


def latest_run(out: Path) -> dict:
    store = OutputStore(str(out))
    return store.read_run(store.list_runs()[-1])


def assert_exactly_once(out: Path) -> None:
    store = OutputStore(str(out))
    files = store.read_table("files").to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in files) == [f"clip{i:02d}.flac" for i in range(N_CLIPS)]
    assert all(r["status"] == "ok" and r["n_segments"] == 2 for r in files), files
    segs = store.read_table("segments", columns=["file_id", "segment_index", "task"]).to_pylist()
    keys = collections.Counter((s["file_id"], s["segment_index"], s["task"]) for s in segs)
    assert max(keys.values()) == 1, "a (file, segment, task) row is duplicated"
    assert len(keys) == N_CLIPS * 2 * N_TASKS, "a (file, segment, task) row is missing"


def lose_node(sim: SimCluster, clips: Path, tmp_path: Path, target: str, replace: bool,
              faults: list[dict] | None = None) -> dict:
    """Run the CLI; once it has committed a file, kill the node hosting ``target``'s actor (if that
    actor sits on the head, the node hosting inference instead), add a replacement or not; then
    run the same command again. Returns what happened, for the assertions and the figures."""
    sim.restore()
    out = tmp_path / "out"
    cmd = run_command(sim, clips, out)
    env = {**os.environ, "SALMONN_PIPELINE_FAULTS": json.dumps(faults)} if faults else None
    log1 = tmp_path / "run1.log"
    t0 = time.monotonic()
    with open(log1, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    placed: dict[str, str] = {}
    while time.monotonic() - t0 < RUN_LIMIT_S:
        placed = sim.placements()
        if first_commit_done(out) and target in placed and "ledger" in placed:
            break
        assert proc.poll() is None, "the run ended before it could lose a node:\n" + log1.read_text()[-3000:]
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"no committed file with the {target} actor alive in {RUN_LIMIT_S} s")
    victim = placed[target] if placed[target] in sim.nodes else placed["infer"]
    sim.remove(victim)
    t_lost = time.monotonic() - t0
    if replace:
        sim.add(victim)
    rc, wall, text = finish(proc, log1, t0)
    first = {"rc": rc, "wall": wall, "lost_at": t_lost, "victim": victim, "placed": placed,
             "record": latest_run(out), "log": text}

    t1 = time.monotonic()
    log2 = tmp_path / "run2.log"
    with open(log2, "w") as f:
        again = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    rc2, wall2, text2 = finish(again, log2, t1)
    print(f"\n[{target} node lost, {'with' if replace else 'no'} replacement] placement {placed}, lost {victim} "
          f"at {t_lost:.1f} s; first run rc {rc} in {wall:.1f} s; again rc {rc2} in {wall2:.1f} s")
    assert rc2 == 0, text2[-3000:]
    assert_exactly_once(out)
    return {"first": first, "again": {"rc": rc2, "wall": wall2, "record": latest_run(out), "log": text2}}


def check_outcome(result: dict) -> str:
    """'completed' or 'stalled'; anything else fails. A stall must be the watchdog's, reported in
    one line that names the operator and the free resources, and the run record must say failed."""
    first = result["first"]
    rec = first["record"]
    assert first["placed"]["ledger"] == "head", f"the attempt ledger must sit on the driver's node: {first['placed']}"
    again = result["again"]["record"]
    if first["rc"] == 0:
        assert rec.status == RUN_COMPLETED
        # a restarted actor retries its tasks, so nothing is dropped: no isolating pass (a lost
        # attempt ledger would make every later batch fail and need one)
        assert "did not complete in pass" not in first["log"], first["log"][-3000:]
        # the same command again: a new, incremental run with nothing left to do
        assert again.run_id != rec.run_id and again.counts.processed == 0, again
        return "completed"
    assert first["rc"] == 1, first["log"][-3000:]
    assert rec.status == RUN_FAILED
    assert rec.error.startswith("StallError: no result for"), rec.error
    assert "stalled operator: MapBatches(" in rec.error and "cluster free: CPU" in rec.error, rec.error
    # failed by the watchdog within its limit: the node was lost, then at most the timeout passed
    # since the last result (plus the time to stop and record)
    assert first["wall"] - first["lost_at"] < STALL_S + 120, first["wall"]
    assert again.status == RUN_COMPLETED and again.run_id == rec.run_id and again.resumes
    return "stalled"


@pytest.mark.slow
@pytest.mark.parametrize("replace", [True, False], ids=["replaced", "not-replaced"])
def test_lose_the_inference_node(sim, clips, tmp_path, replace):
    result = lose_node(sim, clips, tmp_path, "infer", replace)
    outcome = check_outcome(result)
    if not replace:
        # the only GPU node is gone: the restarted inference actor can never be placed
        assert outcome == "stalled"
        assert "MapBatches(SalmonnPredictor)" in result["first"]["record"].error


@pytest.mark.slow
@pytest.mark.parametrize("replace", [True, False], ids=["replaced", "not-replaced"])
def test_lose_the_decode_node(sim, clips, tmp_path, replace):
    result = lose_node(sim, clips, tmp_path, "decode", replace, faults=SLOW_DECODE)
    outcome = check_outcome(result)
    if result["first"]["victim"] == "cpu":
        # decode alone was lost: headroom lets its restarted actor run beside inference
        assert outcome == "completed", result["first"]["record"]


LEDGER_PROBE = """
import logging, sys
import ray
from pipelines.graph import start_ledger
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
ledgers = [start_ledger() for _ in range(10)]
for ledger in ledgers:
    assert ledger.begin("probe") == 1
where = lambda counter: ray.get_runtime_context().get_node_id()
print("LEDGER-PROBE", ray.get_runtime_context().get_node_id(), *ray.get([x.handle.__ray_call__.remote(where) for x in ledgers]))
"""


@pytest.mark.slow
def test_the_ledger_lives_on_the_drivers_node(sim):
    """Ten attempt ledgers from a driver on the head: every one on the head (left to default
    placement, a zero-CPU actor lands on any node, a worker about half the time)."""
    sim.restore()
    done = subprocess.run([sys.executable, "-c", LEDGER_PROBE, sim.address], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("LEDGER-PROBE ")]
    driver, *ledgers = line.split()[1:]
    assert driver == sim.cluster.head_node.node_id
    assert [sim.kind_of(n) for n in ledgers] == ["head"] * 10


@pytest.mark.slow
def test_lose_the_node_the_ledger_would_use(sim, clips, tmp_path):
    """Unpinned, the ledger lands on a worker node; losing that node then breaks every later
    ``begin`` and forces an isolating pass. Pinned, it stays on the driver's node: a worker's loss
    costs no second pass."""
    result = lose_node(sim, clips, tmp_path, "ledger", replace=True)
    assert check_outcome(result) == "completed"
    assert "did not complete in pass" not in result["first"]["log"]
