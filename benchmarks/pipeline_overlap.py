"""Stage overlap: end-to-end wall time of the pipeline vs its slowest stage run alone.

A streaming pipeline should take about as long as its slowest stage: decode (CPU actors) and
SALMONN inference (the inference actor) run at the same time on different blocks. This runs, on a
local Ray and the same ``--files`` short clips (tiny random model, the three default tasks):

* **decode alone**: ``DecodeStage`` as a Ray Data job with the pool ``run_pipeline`` would use
  (``pipelines.run.plan_resources``), output materialised in the object store;
* **inference alone**: ``SalmonnPredictor`` as a Ray Data job with the pipeline's pool and batch
  size, over those pre-decoded windows (model load in the actor included, as in a run);
* **end to end**: ``run_pipeline(PipelineConfig(...))`` (listing, both stages, commit), in the same
  Ray session.

``ray.init`` is timed separately and is in none of the three. ``--alone local`` runs the two
stages in this process instead (no Ray; the model load is reported apart and the torch threads
are those of one inference actor) — the fast path ``--smoke`` uses.

    python benchmarks/pipeline_overlap.py [--files 200] [--repeats 1] [--num-cpus N] [--alone ray|local]
    python benchmarks/pipeline_overlap.py --smoke        # 3 files, stages alone in-process (a test)

The last line is slowest-stage-alone / end-to-end; the goal is >= 0.8.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL = 0.8
# (format, input rate, channels) cycled over the clips; lengths cycle over 4..28 s (one window each)
FORMATS = (("mp3", 16000, 1), ("m4a", 44100, 2), ("flac", 22050, 1), ("wav", 16000, 1), ("opus", 48000, 2))
SECONDS = (4.0, 10.0, 16.0, 22.0, 28.0, 7.0, 13.0, 19.0, 25.0)


def make_clips(directory: Path, n: int) -> float:
    """``n`` short speech-like clips in mixed formats (cached); returns their total seconds."""
    import numpy as np

    from pipelines import synth as samples

    directory.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for i in range(n):
        fmt, rate, channels = FORMATS[i % len(FORMATS)]
        seconds = SECONDS[i % len(SECONDS)]
        path = directory / f"clip{i:04d}{samples.suffix(fmt)}"
        if not path.exists():
            signal = np.repeat(samples.speech_like(seconds, rate, seed=i), channels, axis=0)
            tmp = path.with_name(".part-" + path.name)
            samples.write_audio(tmp, signal, rate, fmt)
            tmp.rename(path)
        total += seconds
    for extra in directory.iterdir():   # a smaller --files than a previous run: keep the first n
        if extra.name.startswith("clip") and int(extra.stem[4:]) >= n:
            extra.unlink()
    return total


# --- the stages alone ----------------------------------------------------------------------------

def _decode_kwargs(cfg) -> dict:
    """The decode stage as run_pipeline builds it (the speech gate's VAD included when on)."""
    return {"options": cfg.decode, "speech_gate": cfg.speech_gate, "cut_at_pauses": cfg.cut_at_pauses}


def _predictor_kwargs(cfg, tasks) -> dict:
    return {"model": cfg.model, "tasks": list(tasks),
            "speech_threshold": cfg.speech_threshold if cfg.speech_gate else None}


def alone_ray(refs, tasks, cfg) -> dict[str, float]:
    """Each stage as its own Ray Data job with the pool run_pipeline uses."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipelines.graph import plan_resources
    from pipelines.infer import SalmonnPredictor
    from pipelines.stages import DecodeStage, refs_table

    DataContext.get_current().enable_progress_bars = False
    plan = plan_resources(cfg)
    t0 = time.perf_counter()
    table = refs_table(refs)
    ds = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
    ds = ds.map_batches(DecodeStage, fn_constructor_kwargs=_decode_kwargs(cfg), batch_size=1,
                        batch_format="pyarrow", zero_copy_batch=True,
                        compute=ActorPoolStrategy(min_size=1, max_size=plan.decode_actors), num_cpus=1)
    decoded = ds.materialize()
    decode_s = time.perf_counter() - t0
    n_rows = decoded.count()

    t0 = time.perf_counter()
    ds = decoded.map_batches(SalmonnPredictor, fn_constructor_kwargs=_predictor_kwargs(cfg, tasks),
                             batch_size=plan.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                             compute=ActorPoolStrategy(size=plan.infer_actors),
                             num_gpus=plan.gpus_per_infer_actor, num_cpus=plan.cpus_per_infer_actor)
    results = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    infer_s = time.perf_counter() - t0
    return {"decode_s": decode_s, "infer_s": infer_s, "decode_rows": n_rows, "result_rows": results,
            "pool": f"{plan.decode_actors} decode actor(s), {plan.infer_actors} inference actor(s) x "
                    f"{plan.cpus_per_infer_actor:g} CPU"}


def alone_local(refs, tasks, cfg) -> dict[str, float]:
    """Both stages in this process, one after the other (torch on one thread, as in an actor)."""
    import torch

    from pipelines.infer import SalmonnPredictor
    from pipelines.stages import DecodeStage
    from schemas import stage as cols

    stage = DecodeStage(**_decode_kwargs(cfg))
    t0 = time.perf_counter()
    rows = [row for ref in refs for row in stage.file_rows(ref)]
    decode_s = time.perf_counter() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        predictor = SalmonnPredictor(**_predictor_kwargs(cfg, tasks))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = 0
        for i in range(0, len(rows), cfg.batch_size):
            chunk = rows[i:i + cfg.batch_size]
            results += predictor(cols.build(chunk, cols.WINDOWS, "benchmark")).num_rows
        infer_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"decode_s": decode_s, "infer_s": infer_s, "decode_rows": len(rows), "result_rows": results,
            "model_load_s": load_s, "pool": "in-process, torch on 1 thread"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="best of N for each measurement")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alone", choices=("ray", "local"), default="ray")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "salmonn-overlap-bench")
    parser.add_argument("--smoke", action="store_true", help="3 files, stages alone in-process")
    args = parser.parse_args()
    if args.smoke:
        args.files, args.alone = 3, "local"
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import salmonn
    from pipelines.decode import DecodeOptions
    from pipelines.run import PipelineConfig, run_pipeline
    from pipelines.sources import list_inputs

    audio = args.dir / f"audio-{args.files}"
    audio_s = make_clips(audio, args.files)
    tasks = tuple(salmonn.default_tasks())
    refs = list_inputs(str(audio))
    assert len(refs) == args.files, (len(refs), args.files)

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        out_root = Path(tempfile.mkdtemp(prefix="overlap-out-", dir=args.dir))
        cfg = PipelineConfig(input=str(audio), out=str(out_root / "out"), tasks=tasks, model="tiny",
                             decode=DecodeOptions(), batch_size=args.batch_size, progress=False, fresh=True)
        best: dict[str, float] = {}
        info: dict = {}
        for rep in range(args.repeats):
            alone = (alone_ray if args.alone == "ray" else alone_local)(refs, tasks, cfg)
            info = alone
            shutil.rmtree(out_root / "out", ignore_errors=True)
            t0 = time.perf_counter()
            summary = run_pipeline(cfg)
            e2e = time.perf_counter() - t0
            assert summary.ok == args.files, summary.format()
            for key, value in (("decode_s", alone["decode_s"]), ("infer_s", alone["infer_s"]), ("e2e_s", e2e)):
                best[key] = min(best.get(key, float("inf")), value)
            print(f"  repeat {rep + 1}: decode alone {alone['decode_s']:.1f} s, inference alone "
                  f"{alone['infer_s']:.1f} s, end to end {e2e:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        shutil.rmtree(out_root, ignore_errors=True)
        cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        ray.shutdown()

    n_results = info["result_rows"]
    print(f"\n{args.files} clips, {audio_s / 60:.1f} audio-min, tiny random model, tasks "
          f"{','.join(t.name for t in tasks)}, batch {args.batch_size}; local Ray with {cluster_cpus} CPUs "
          f"on a {os.cpu_count()}-core machine (load {os.getloadavg()[0]:.1f}); best of {args.repeats}")
    print(f"stages alone: {args.alone} ({info['pool']}); {info['decode_rows']} decode rows, "
          f"{n_results} result rows")
    print(f"ray.init (not counted below)    {ray_init_s:7.2f} s")
    if "model_load_s" in info:
        print(f"model load (not counted below) {info['model_load_s']:7.2f} s")
    for label, key in (("decode alone", "decode_s"), ("inference alone", "infer_s"), ("end to end", "e2e_s")):
        print(f"{label:30} {best[key]:7.2f} s   {audio_s / best[key]:7.1f} audio-s/s")
    slowest = max(("decode", best["decode_s"]), ("inference", best["infer_s"]), key=lambda kv: kv[1])
    ratio = slowest[1] / best["e2e_s"]
    print(f"sum of the stages alone / end to end = {(best['decode_s'] + best['infer_s']) / best['e2e_s']:.2f}")
    print()
    print(f"pipeline_overlap: slowest stage alone ({slowest[0]}) / end-to-end = {ratio:.2f} "
          f"({slowest[1]:.1f} s / {best['e2e_s']:.1f} s) (goal >= {GOAL})")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
