"""Helpers shared by the model benchmarks (not a benchmark itself)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine_line() -> str:
    """CPU count, load average and torch threads (and the GPU when there is one)."""
    import torch

    line = (f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
            f"torch {torch.__version__} on {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


@contextlib.contextmanager
def fixed_length(model, cache_implementation: str | None = None) -> Iterator[None]:
    """Every answer is exactly ``max_new_tokens`` long: EOS is suppressed until then
    (``min_new_tokens``), so runs with different prompts or models do the same work per row.
    ``cache_implementation`` (e.g. "static") is passed to transformers' generate as well."""
    original = model._generation_config

    def config(settings):
        cfg = original(settings)
        cfg.min_new_tokens = settings.max_new_tokens
        if cache_implementation is not None:
            cfg.cache_implementation = cache_implementation
        return cfg

    model._generation_config = config   # the instance attribute shadows the method
    try:
        yield
    finally:
        del model._generation_config


def speech_windows(n: int, seconds: float = 30.0, rate: int = 16_000):
    """(n, seconds * rate) float32 speech-like windows, one seed each."""
    import numpy as np

    from pipelines.synth import speech_like

    return np.stack([speech_like(seconds, rate, seed=i)[0] for i in range(n)])


class Timer:
    """Wall time of a block, with CUDA synchronised at both ends when a device is given."""

    def __init__(self, device=None):
        self.device = device
        self.s = 0.0

    def _sync(self) -> None:
        import torch

        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.s = time.perf_counter() - self._t0
