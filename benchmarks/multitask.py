"""Several tasks per window for little more than one: 3 tasks vs 1 task on the same windows.

SALMONN runs both encoders and the Q-Former once per window (``Salmonn.encode``); every task is
then answered from the same speech embeddings, and tasks with equal settings share one batched
``generate`` call (windows x tasks rows, left-padded). So asking caption + transcribe + emotion
should cost far less than three runs. This times, on the tiny random model (CPU by default):

* 1 task  (caption): encode + generate, per batch of windows;
* 3 tasks (caption, transcribe, emotion): the same windows, encode + one generate of 3x the rows.

Answers are a fixed ``--max-new-tokens`` long (EOS suppressed until then), so both runs do the
same work per answer whatever the random model says. Runs alternate; best of ``--repeats``.

    python benchmarks/multitask.py [--windows 16] [--batch 8] [--max-new-tokens 200] [--repeats 3]
    python benchmarks/multitask.py --smoke        # 2 windows, 4 tokens (a test)

The last line is the 3-task time over the 1-task time (goal <= 2.2x) and the encoder's share of
the 1-task time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, fixed_length, machine_line, speech_windows  # noqa: E402

GOAL = 2.2


def run(model, waves, lengths, tasks, batch: int) -> dict[str, float]:
    """encode + generate_tasks over all windows in batches; seconds in each part."""
    enc = gen = 0.0
    rows = tokens = 0
    for i in range(0, waves.shape[0], batch):
        with Timer(model.device) as t:
            embeds = model.encode(waves[i:i + batch], lengths[i:i + batch])
        enc += t.s
        with Timer(model.device) as t:
            answers = model.generate_tasks(embeds, tasks)
        gen += t.s
        rows += sum(len(a) for a in answers.values())
        tokens += sum(g.n_tokens for a in answers.values() for g in a)
    return {"encode_s": enc, "generate_s": gen, "total_s": enc + gen, "rows": rows, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="window length")
    parser.add_argument("--batch", type=int, default=8, help="windows per batch")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--early-stop", action="store_true", help="let answers stop at EOS (random lengths)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="2 windows, batch 2, 4 tokens, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        args.windows, args.batch, args.max_new_tokens, args.repeats = 2, 2, 4, 1

    import torch

    import salmonn

    if args.threads:
        torch.set_num_threads(args.threads)
    model = salmonn.build_tiny(device=args.device)
    settings = salmonn.GenerationSettings(max_new_tokens=args.max_new_tokens)
    three = [salmonn.builtin_task(name, settings) for name in ("caption", "transcribe", "emotion")]
    modes = {"1 task": three[:1], "3 tasks": three}
    waves = torch.from_numpy(speech_windows(args.windows, args.seconds)).to(args.device)  # (N, samples)
    lengths = torch.full((args.windows,), waves.shape[1], dtype=torch.long)

    fixed = contextlib.nullcontext() if args.early_stop else fixed_length(model)
    best: dict[str, dict[str, float]] = {}
    with fixed:
        run(model, waves[:args.batch], lengths[:args.batch], three, args.batch)   # warm-up
        for _ in range(args.repeats):
            for name, tasks in modes.items():
                r = run(model, waves, lengths, tasks, args.batch)
                if name not in best or r["total_s"] < best[name]["total_s"]:
                    best[name] = r

    length = "answers stop at EOS" if args.early_stop else f"{args.max_new_tokens} new tokens per answer"
    print(f"tiny random SALMONN on {args.device}; {args.windows} windows of {args.seconds:g} s, batch "
          f"{args.batch}; {length}; greedy; best of {args.repeats}")
    print(machine_line())
    print(f"{'':8} {'encode s':>9} {'generate s':>10} {'total s':>8} {'answers':>8} {'tokens':>7} {'windows/s':>9}")
    for name, r in best.items():
        print(f"{name:8} {r['encode_s']:9.3f} {r['generate_s']:10.3f} {r['total_s']:8.3f} {r['rows']:8d} "
              f"{r['tokens']:7d} {args.windows / r['total_s']:9.2f}")
    one, many = best["1 task"], best["3 tasks"]
    ratio = many["total_s"] / one["total_s"]
    share = one["encode_s"] / one["total_s"]
    print(f"three separate 1-task runs would take {3 * one['total_s']:.3f} s "
          f"({3 * one['total_s'] / many['total_s']:.2f}x the 3-task run)")
    print()
    print(f"multitask: 3 tasks / 1 task = {ratio:.2f}x the 1-task time (goal <= {GOAL}x); "
          f"encoder share of the 1-task time {share:.0%}")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
