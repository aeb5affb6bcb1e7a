"""Fixtures for the salmonn/ tests, loaded as a pytest plugin (``pytest_plugins`` in conftest.py).

Expensive objects are built once per process (functools.cache), so every test module that uses
these fixtures shares one tiny model and one set of part files.
"""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

SR = 16_000
# six windows of different lengths: full 30 s, partial, shorter than 1 s, exactly 1 s
CLIP_SECONDS = (30.0, 7.3, 0.5, 18.75, 1.0, 3.1)


def make_clip(seconds: float, seed: int) -> torch.Tensor:
    """Deterministic audio-like test signal: a few tones plus noise, float32 in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * SR))
    t = torch.arange(n, dtype=torch.float64) / SR
    freqs = 100 + 900 * torch.rand(3, generator=g, dtype=torch.float64)
    x = sum(0.2 * torch.sin(2 * math.pi * f * t) for f in freqs)
    x = x + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(torch.float32)


def pad_batch(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, N) batch and its lengths (B,)."""
    lengths = torch.tensor([c.numel() for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : c.numel()] = c
    return batch, lengths


@functools.cache
def _tiny_model():
    from salmonn import build_tiny

    return build_tiny(seed=0)


@functools.cache
def _tiny_parts() -> tuple[Path, object]:
    from salmonn import write_tiny_parts

    directory = Path(tempfile.mkdtemp(prefix="salmonn-tiny-parts-"))
    atexit.register(shutil.rmtree, directory, True)
    return directory, write_tiny_parts(directory / "parts", seed=0)


def clip_list() -> list[torch.Tensor]:
    return [make_clip(s, seed=i) for i, s in enumerate(CLIP_SECONDS)]


@functools.cache
def _clip_embeds() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Embeddings of the six clips encoded as one batch, and each encoded alone."""
    model, clips = _tiny_model(), clip_list()
    batch = model.encode(*pad_batch(clips))
    return batch, tuple(model.encode(c[None]) for c in clips)


@pytest.fixture
def tiny_model():
    """The seed-0 tiny model (shared: tests that change it must restore it)."""
    return _tiny_model()


@pytest.fixture
def tiny_parts():
    """(directory, SalmonnConfig) of the seed-0 tiny model written as official part files."""
    return _tiny_parts()


@pytest.fixture
def clips() -> list[torch.Tensor]:
    return clip_list()


@pytest.fixture
def embeds() -> torch.Tensor:
    """(6, 88, D) speech embeddings of `clips`, encoded as one batch by the tiny model."""
    return _clip_embeds()[0]


@pytest.fixture
def single_embeds() -> tuple[torch.Tensor, ...]:
    """Each clip of `clips` encoded alone: six (1, 88, D) tensors."""
    return _clip_embeds()[1]
