"""Generation engines: the LLM half of SALMONN behind one interface (see `base`).

`HfEngine` needs only transformers; `VllmEngine` (and the rest of `salmonn.engines.vllm`)
imports vLLM, so it is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from .base import Engine, Request, task_requests
from .hf import HfEngine

__all__ = ["Engine", "HfEngine", "Request", "VllmEngine", "task_requests"]


def __getattr__(name: str) -> Any:
    if name == "VllmEngine":
        from .vllm import VllmEngine

        return VllmEngine
    raise AttributeError(f"module 'salmonn.engines' has no attribute {name!r}")
