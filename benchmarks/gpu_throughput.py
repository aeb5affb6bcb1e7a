"""GPU throughput of full-size SALMONN (13B, 7B): audio-seconds per GPU-second vs an official-style loop.

Needs a CUDA GPU; without one it says so and exits 0 (its last line says "skipped"). No weights are
downloaded: each architecture is built on the meta device (``salmonn.build_meta``) and materialised
with random weights straight on the GPU in bf16 (the pipeline's GPU numerics), buffers (rotary
frequencies, Q-Former position ids) computed as a normal build computes them.

Workload: 30 s windows of a speech-like signal, the three default tasks (caption, transcribe,
emotion), every answer exactly ``--new-tokens`` long (128; EOS suppressed until then, so no run
stops early). Measured:

* **ours**: the pipeline's inference path, ``encode`` once per window then one batched
  ``generate_tasks`` (windows x 3 rows, left padding, KV cache), for batch sizes 1, 8, 32, 64,
  greedy and 4 beams. A batch that does not fit in GPU memory is reported as OOM.
* **official-style**: the official ``SALMONN.generate`` usage: one window and one prompt at a time
  (batch 1), 4 beams, both encoders and the Q-Former run again for every prompt.

Our runs are repeated with transformers' static KV cache (``cache_implementation="static"``,
preallocated; the default dynamic cache copies the whole cache with ``torch.cat`` every step: at
batch 64 x 3 tasks that is, by estimate, more bytes per step than the 13B weights), to tell whether
the pipeline should switch. Reported per run: seconds for the timed batches and the encoders' share of
them, audio-seconds per GPU-second (= x real time), the speed-up over the official-style loop, and
peak GPU memory (``torch.cuda.max_memory_allocated``; the weights alone are printed first).

    python benchmarks/gpu_throughput.py [--models salmonn-13b,salmonn-7b] [--batch-sizes 1,8,32,64]
        [--beams 1,4] [--new-tokens 128] [--min-windows 8] [--official-windows 2] [--caches dynamic,static]
    python benchmarks/gpu_throughput.py --smoke    # tiny architecture on CPU, same code path (a test)

The last line: the best speed-up over the official-style loop (goal >= 20x) and the best 13B
greedy real-time factor (goal >= 1000x).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, fixed_length, machine_line, speech_windows  # noqa: E402

GOAL_SPEEDUP = 20.0
GOAL_REALTIME_13B = 1000.0
WINDOW_S = 30.0
RATE = 16_000


# --- a full-size model with random weights, without a download and without a CPU copy -----------

def materialise_random(config, device, seed: int = 0):
    """``build_meta(config)`` -> random weights on ``device`` in the dtypes the pipeline uses there.

    Parameters get normal(0, 0.02) weights and zero biases (norms: weight 1, bias 0), allocated
    directly in their final dtype; buffers are recomputed as a normal build computes them. The tiny
    tokenizer stands in for Vicuna's (prompt ids are valid ids of any LLaMA vocabulary).
    """
    import torch
    from torch import nn

    import salmonn
    from salmonn.checkpoint import load_tokenizer
    from salmonn.model import place, resolve_precision
    from salmonn.tiny import tiny_tokenizer_dir

    device = torch.device(device)
    precision = resolve_precision(config.numerics, device)
    model = salmonn.build_meta(config)
    with torch.no_grad():
        for name, param in model.named_parameters():   # meta -> meta: free
            if name.startswith("llama_model."):
                dtype = precision.lora_dtype if ".lora_" in name else precision.llm_dtype
            else:
                dtype = precision.encoder_dtype
            param.data = param.data.to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    param.zero_()
                elif name in ("weight_g", "grep_a"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        _fill_buffers(model, device)
    place(model, device, precision)
    model.tokenizer = load_tokenizer(tiny_tokenizer_dir())
    return model


def _fill_buffers(model, device) -> None:
    """Compute every buffer a normal build computes; refuse a buffer we do not know."""
    import torch

    done = set()
    for name, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if hasattr(module, "inv_freq") and hasattr(module, "config"):   # LLaMA rotary embedding
            fresh = type(module)(module.config)   # tiny: the frequencies only
            for key, buf in fresh.named_buffers(recurse=False):
                own[key].copy_(buf.to(device))
                done.add(f"{name}.{key}")
        if "position_ids" in own:   # Q-Former (unused, kept for the checkpoint)
            own["position_ids"].copy_(torch.arange(own["position_ids"].shape[-1], device=device).expand_as(
                own["position_ids"]))
            done.add(f"{name}.position_ids")
    unknown = sorted(set(n for n, _ in model.named_buffers()) - done)
    if unknown:
        raise RuntimeError(f"materialise_random does not know how to fill buffers {unknown}")


def check_against_build(model) -> None:
    """The materialised model has the structure, dtypes and buffers of a normal build (tiny only)."""
    import torch

    import salmonn

    ref = salmonn.build_tiny(device=model.device)
    got = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    want = {n: (tuple(p.shape), p.dtype) for n, p in ref.named_parameters()}
    assert got == want, "materialised parameters differ from a normal build"
    ref_buffers = dict(ref.named_buffers())
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, ref_buffers[n], msg=f"buffer {n}")
    print("materialised model matches a normal build: parameter names, shapes, dtypes and buffers")


# --- the two ways of running ----------------------------------------------------------------

@dataclass
class Result:
    label: str
    windows: int
    seconds: float
    peak_gib: float
    oom: bool = False
    encode_s: float | None = None   # of `seconds`, in the encoders (ours only)

    @property
    def x_realtime(self) -> float:
        return self.windows * WINDOW_S / self.seconds if self.seconds else 0.0


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def run_ours(model, waves, tasks, batch: int, n_windows: int) -> Result:
    """encode once per window, then all tasks of the batch in one generate; one warm-up batch."""
    import torch

    import salmonn

    device = model.device
    n_batches = max(1, math.ceil(n_windows / batch))
    label = f"ours batch {batch}"
    _reset_peak(device)

    encode_s = [0.0]

    def one(i: int) -> None:
        rows = torch.arange(i * batch, (i + 1) * batch) % waves.shape[0]
        wave = waves[rows]   # (B, N) on the device
        with Timer(device) as t_enc:
            embeds = model.encode(wave, torch.full((batch,), wave.shape[1], device=device))
        encode_s[0] += t_enc.s
        model.generate_tasks(embeds, tasks)

    oom = False
    try:
        one(0)   # warm-up (kernels, allocator)
        encode_s[0] = 0.0
        with Timer(device) as t:
            for i in range(n_batches):
                one(i + 1)
    except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
        if not salmonn.is_out_of_memory(err):
            raise
        oom = True
    if oom:   # outside the except block, so the failed step's tensors are released first
        _reset_peak(device)
        return Result(label, 0, 0.0, 0.0, oom=True)
    return Result(label, n_batches * batch, t.s, _peak_gib(device), encode_s=encode_s[0])


def run_official(model, waves, tasks, n_windows: int, num_beams: int = 4) -> Result:
    """The official loop: per window, per prompt: encode again, generate with beams at batch 1."""
    import dataclasses

    import torch

    device = model.device
    _reset_peak(device)

    def one(i: int) -> None:
        wave = waves[i % waves.shape[0]][None]   # (1, N)
        for task in tasks:
            embeds = model.encode(wave, torch.full((1,), wave.shape[1], device=device))
            model.generate(embeds, [task.prompt], dataclasses.replace(task.settings, num_beams=num_beams))

    one(0)
    with Timer(device) as t:
        for i in range(n_windows):
            one(i + 1)
    return Result(f"official-style (batch 1, {num_beams} beams, encoders per prompt)", n_windows, t.s,
                  _peak_gib(device))


def bench_model(name: str, args, device) -> dict:
    import torch

    import salmonn

    config = salmonn.SalmonnConfig.from_name(name)
    with Timer(device) as t:
        model = materialise_random(config, device)
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if name == "tiny":
        check_against_build(model)
    n_params = sum(p.numel() for p in model.parameters())
    where = f"{weights_gib:.1f} GiB of weights on the GPU" if device.type == "cuda" else f"on {device}"
    print(f"\n== {name}: {n_params / 1e9:.2f} B parameters, random {model.precision.llm_dtype} weights "
          f"materialised in {t.s:.1f} s, {where}", flush=True)
    max_batch = max(args.batch_sizes)
    waves = torch.from_numpy(speech_windows(min(max_batch * 2, 16), WINDOW_S, RATE)).to(device)
    if waves.shape[0] < max_batch * 2:   # more distinct windows than we synthesise: repeat them
        waves = waves.repeat(math.ceil(max_batch * 2 / waves.shape[0]), 1)
    results = {}
    print(f"{'run':58} {'windows':>7} {'s':>8} {'audio-s/s':>10} {'vs official':>11} {'peak GiB':>9} "
          f"{'encode %':>8}")
    with fixed_length(model), torch.inference_mode():
        official = run_official(model, waves, _tasks(args.new_tokens, 1), args.official_windows)
    results["official"] = official
    _print(official, official)
    for cache in args.caches:
        with fixed_length(model, None if cache == "dynamic" else cache), torch.inference_mode():
            for beams in args.beams:
                tasks = _tasks(args.new_tokens, beams)
                for batch in args.batch_sizes:
                    r = run_ours(model, waves, tasks, batch, max(batch, args.min_windows))
                    r.label = (f"ours {'greedy' if beams == 1 else f'{beams} beams'} batch {batch}"
                               f"{'' if cache == 'dynamic' else f', {cache} KV cache'}")
                    results[(beams, batch, cache)] = r
                    _print(r, official)
    del model, waves
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _tasks(new_tokens: int, beams: int):
    import salmonn

    settings = salmonn.GenerationSettings(max_new_tokens=new_tokens, num_beams=beams)
    return salmonn.default_tasks(settings)


def _print(r: Result, official: Result) -> None:
    if r.oom:
        print(f"{r.label:58} {'':>7} {'OOM':>8}", flush=True)
        return
    speedup = r.x_realtime / official.x_realtime
    share = f"{r.encode_s / r.seconds:8.0%}" if r.encode_s is not None else f"{'':8}"
    print(f"{r.label:58} {r.windows:7d} {r.seconds:8.2f} {r.x_realtime:10.1f} {speedup:10.1f}x "
          f"{r.peak_gib:9.1f} {share}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="salmonn-13b,salmonn-7b")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-windows", type=int, default=8, help="timed windows per run, at least one batch")
    parser.add_argument("--official-windows", type=int, default=2)
    parser.add_argument("--caches", default="dynamic,static",
                        help="KV caches for our runs: dynamic (transformers' default, grows by torch.cat "
                             "every step) and/or static (preallocated)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny architecture on CPU through the same code (no GPU needed)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.batch_sizes, args.beams = "tiny", "1,2", "1,2"
        args.new_tokens, args.min_windows, args.official_windows = 4, 2, 1
    args.caches = args.caches.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.beams = [int(b) for b in args.beams.split(",")]

    import torch

    goal = f"(goal >= {GOAL_SPEEDUP:g}x and >= {GOAL_REALTIME_13B:g}x real time for 13B greedy)"
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA GPU here (torch.cuda.is_available() is False): nothing to measure. "
              "Run it on a GPU machine, or with --smoke for the CPU dry run of the same code.")
        print(f"gpu_throughput: skipped, no GPU {goal}")
        return

    print(f"{machine_line()}; device {device}")
    print(f"30 s windows, tasks caption,transcribe,emotion, exactly {args.new_tokens} new tokens per answer")
    all_results = {name: bench_model(name, args, device) for name in args.models.split(",")}

    best_speedup, best_at = 0.0, ""
    realtime_13b = None
    for name, results in all_results.items():
        official = results["official"]
        for key, r in results.items():
            if key == "official" or r.oom:
                continue
            speedup = r.x_realtime / official.x_realtime
            if speedup > best_speedup:
                best_speedup, best_at = speedup, f"{name} {r.label}"
            if name == "salmonn-13b" and key[0] == 1:
                realtime_13b = max(realtime_13b or 0.0, r.x_realtime)
    print()
    tail = (f"13B greedy {realtime_13b:.0f}x real time" if realtime_13b is not None
            else "13B greedy not measured")
    where = "smoke run, tiny model on CPU: not a GPU figure; " if args.smoke else ""
    print(f"gpu_throughput: {where}best / official-style loop = {best_speedup:.1f}x ({best_at}); {tail} {goal}")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
