"""Generation engines on the same requests: HF static batches (baseline) vs vLLM continuous batching.

Everything up to the LLM is the pipeline's own and the same for both: each window is encoded
once, and the three built-in tasks' prompts are put around its speech embeddings. Only the engine
that generates the answers differs, each driven the way the inference actor drives it:

* **hf** (baseline): ``salmonn.engines.HfEngine``, one Ray Data batch of ``--batch`` windows at a
  time: per task group one static, left-padded batch (windows x tasks rows), which runs until its
  longest answer while the short ones wait as padding.
* **vllm**: ``salmonn.engines.VllmEngine`` with two batches in flight (two threads, as the actor
  runs them with ``max_concurrent_calls_per_actor=2``): each thread encodes its batch and hands
  its windows x tasks requests to the one running engine, so the next batch is encoded while the
  engine generates and its requests join the running batch.

Answers have realistic, varied lengths, drawn once (seeded) per window and task and fixed in
advance so that both engines generate exactly the same tokens count (``Request.exact_new_tokens``:
EOS never emitted): emotion 1-3 tokens, caption 20-60, transcribe 40 to ``--max-new`` (200, the
pipeline's default cap). Reported per engine: generated tokens/s, audio-seconds per second
(windows x window length / wall time, encoding included), and vLLM's busy fraction (time with a
request in flight / wall time). The last line is vLLM / HF in generated tokens per second.

Models: ``tiny`` (random; on CPU: vLLM's CPU build, ``.venv-vllm``), or ``salmonn-13b`` /
``salmonn-7b`` on a GPU with random bf16 weights (HF: ``gpu_throughput.materialise_random``;
vLLM: the same architecture, ``load_format="dummy"``: random weights, nothing downloaded).
Without vLLM installed the vLLM half says so and the run ends with a "skipped" line.

    python benchmarks/engine_throughput.py [--model tiny] [--windows 48] [--batch 8] [--max-new 200]
    python benchmarks/engine_throughput.py --model salmonn-13b --windows 256 --batch 32      # a GPU
    python benchmarks/engine_throughput.py --smoke                                           # a test

GPU goal: vLLM >= 3x the HF engine at 13B, batch 32 windows x 3 tasks, greedy. On CPU, with the
tiny model, there is no goal: vLLM's per-step overhead dominates so small a model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, speech_windows  # noqa: E402

GOAL_13B = 3.0
WINDOW_S = 30.0
RATE = 16_000
# (task, shortest, longest answer in tokens); transcribe's longest is --max-new
LENGTHS = {"caption": (20, 60), "transcribe": (40, None), "emotion": (1, 3)}


@dataclass
class Result:
    engine: str
    seconds: float
    tokens: int
    windows: int
    busy: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def audio_x(self) -> float:
        return self.windows * WINDOW_S / self.seconds

    def line(self) -> str:
        busy = f", engine busy {self.busy:.0%}" if self.busy is not None else ""
        return (f"{self.engine:>5}: {self.tokens} tokens in {self.seconds:.1f} s = {self.tokens_per_s:,.0f} tokens/s, "
                f"{self.audio_x:,.1f} audio-s per s{busy}")


def answer_lengths(n_windows: int, max_new: int, seed: int = 0) -> dict[str, list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for task, (lo, hi) in LENGTHS.items():
        hi = max_new if hi is None else min(hi, max_new)
        out[task] = [int(x) for x in rng.integers(min(lo, hi), hi + 1, n_windows)]
    return out


def requests_for(embeds, first: int, tasks, lengths):
    """The (window, task) requests of a batch whose first window is ``first``, task-major (as the
    predictor builds them)."""
    from salmonn.engines import Request

    return [Request(embeds[j], t.prompt, t.settings, exact_new_tokens=lengths[t.name][first + j])
            for t in tasks for j in range(embeds.shape[0])]


def encode(model, waves, device):
    import torch

    with torch.inference_mode():
        return model.encode(torch.from_numpy(waves).to(device))


def run_hf(model, waves, tasks, lengths, batch: int, device) -> Result:
    from salmonn.engines import HfEngine

    engine = HfEngine(model)
    n = len(waves)
    _sync(device)
    t0 = time.perf_counter()
    tokens = 0
    for first in range(0, n, batch):
        embeds = encode(model, waves[first:first + batch], device)
        tokens += sum(g.n_tokens for g in engine.generate(requests_for(embeds, first, tasks, lengths)))
    _sync(device)
    return Result("hf", time.perf_counter() - t0, tokens, n)


def run_vllm(engine, model, waves, tasks, lengths, batch: int, device, in_flight: int = 2) -> Result:
    n = len(waves)
    starts = list(range(0, n, batch))
    lock = threading.Lock()
    tokens = [0]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while True:
                with lock:
                    if not starts:
                        return
                    first = starts.pop(0)
                embeds = encode(model, waves[first:first + batch], device)
                got = sum(g.n_tokens for g in engine.generate(requests_for(embeds, first, tasks, lengths)))
                with lock:
                    tokens[0] += got
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    _sync(device)
    t_first = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _sync(device)
    if errors:
        raise errors[0]
    return Result("vllm", time.perf_counter() - t_first, tokens[0], n, busy=engine.busy_fraction)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build(model_name: str, device):
    import salmonn

    if model_name == "tiny":
        return salmonn.build_tiny(seed=0, device=device)
    from gpu_throughput import materialise_random

    return materialise_random(salmonn.SalmonnConfig.from_name(model_name), device)


def vllm_engine(model, model_name: str, work: str):
    """A VllmEngine for ``model``: the tiny model's own weights (saved for vLLM), or for a full-size
    architecture random weights of vLLM's own (``load_format="dummy"``) from its config alone."""
    from salmonn.checkpoint import save_llm
    from salmonn.engines import VllmEngine

    scales = [4.0]
    if model_name == "tiny":
        return VllmEngine(model, lora_scales=scales, llm_path=save_llm(model, Path(work) / "llm"),
                          enforce_eager=True)
    llm_dir = Path(work) / "llm-config"
    model.llm.config.save_pretrained(llm_dir)
    model.tokenizer.save_pretrained(llm_dir)
    return VllmEngine(model, lora_scales=scales, llm_path=llm_dir, engine_args={"load_format": "dummy"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny | salmonn-13b | salmonn-7b")
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="windows per Ray Data batch (GPU: 32)")
    parser.add_argument("--max-new", type=int, default=200, help="the longest answer (transcribe's cap)")
    parser.add_argument("--smoke", action="store_true", help="tiny, few windows, short answers (a test)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.windows, args.batch, args.max_new = "tiny", 6, 3, 12
    import torch

    import salmonn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model != "tiny" and device == "cpu":
        print(f"engine_throughput: skipped, {args.model} needs a GPU (use --model tiny on CPU)")
        return 0
    print(machine_line())
    waves = speech_windows(args.windows, WINDOW_S, RATE)
    tasks = salmonn.default_tasks()   # greedy, LoRA 4.0 (the lengths are set per request)
    lengths = answer_lengths(args.windows, args.max_new)
    total = sum(sum(v) for v in lengths.values())
    spans = ", ".join(f"{t} {min(v)}-{max(v)}" for t, v in lengths.items())
    print(f"{args.model} on {device}: {args.windows} windows x {len(tasks)} tasks, batch {args.batch}, "
          f"{total} tokens to generate (tokens per answer: {spans})")
    model = build(args.model, device)
    # warm-up: one batch through the HF engine (allocator, kernels), not timed
    run_hf(model, waves[: args.batch], tasks, lengths, args.batch, device)
    hf = run_hf(model, waves, tasks, lengths, args.batch, device)
    print(hf.line())
    assert hf.tokens == total, (hf.tokens, total)
    where = "" if device == "cuda" else "CPU, tiny random model: no goal; "
    if importlib.util.find_spec("vllm") is None:
        print(f"engine_throughput: skipped, vLLM is not installed here ({where}hf {hf.tokens_per_s:,.0f} tokens/s; "
              f"on CPU: bash scripts/make_vllm_venv.sh, then .venv-vllm/bin/python)")
        return 0
    if device == "cpu":   # vLLM's memory share is the engine's own default (salmonn.engines.memory)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory(prefix="engine-throughput-") as work:
        engine = vllm_engine(model, args.model, work)
        try:
            print(f"vLLM engine ready in {engine.startup_s:.1f} s")
            run_vllm(engine, model, waves[: args.batch], tasks, lengths, args.batch, device)   # warm-up
            engine.reset_figures()
            vl = run_vllm(engine, model, waves, tasks, lengths, args.batch, device)
        finally:
            engine.close()
    print(vl.line())
    assert vl.tokens == total, (vl.tokens, total)
    ratio = vl.tokens_per_s / hf.tokens_per_s
    goal = f" (goal >= {GOAL_13B:g}x at 13B, batch 32)" if args.model == "salmonn-13b" else ""
    print(f"engine_throughput: {where}{args.model}, batch {args.batch} x {len(tasks)} tasks: vllm / hf = "
          f"{ratio:.2f}x generated tokens/s ({vl.tokens_per_s:,.0f} / {hf.tokens_per_s:,.0f}), "
          f"vllm busy {vl.busy:.0%}{goal}")
    return 0


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
