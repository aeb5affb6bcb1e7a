"""Generation engines: the LLM half of SALMONN behind one interface (see `base`).

    engine = build_engine("vllm", model, tasks)    # or "hf"; options go to the engine
    answers = engine.generate_tasks(model.encode(waveforms, lengths), tasks)
    engine.close()

`HfEngine` needs only transformers; `VllmEngine` (and the rest of `salmonn.engines.vllm`)
imports vLLM, so it is loaded on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..prompts import Task
from .base import Engine, Request, runs_on_hf, task_requests
from .hf import HfEngine

if TYPE_CHECKING:
    from ..model import Salmonn

__all__ = ["ENGINES", "Engine", "HfEngine", "Request", "VllmEngine", "build_engine", "llm_weights", "runs_on_hf",
           "task_requests"]

ENGINES = ("hf", "vllm")


def __getattr__(name: str) -> Any:
    if name == "VllmEngine":
        from .vllm import VllmEngine

        return VllmEngine
    raise AttributeError(f"module 'salmonn.engines' has no attribute {name!r}")


def llm_weights(engine: str, tasks: Sequence[Task]) -> str:
    """What of its LLM the torch model loads for `engine` to run `tasks` (`salmonn.load_model`'s
    ``llm``): with vLLM generating, "embeddings" only (the prompt's input rows; a 13B LLM is not
    held twice on the GPU), unless a task may run on the HF engine inside `VllmEngine`
    (`runs_on_hf`, asked before the engine exists: a repetition penalty counts); else "full"."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "vllm" and not any(runs_on_hf(t.settings) for t in tasks):
        return "embeddings"
    return "full"


def build_engine(name: str, model: Salmonn, tasks: Sequence[Task] = (), **options: Any) -> Engine:
    """The engine `name` ("hf" | "vllm") for `model`, ready to run `tasks`.

    hf: `HfEngine(model)`; takes no options.
    vllm: `VllmEngine(model, lora_scales=<every scale of tasks>, **options)` (options:
        tensor_parallel_size, engine_args, max_model_len, ... as VllmEngine takes them; without
        tasks, or with lora_scales in options, those scales). A model built in memory (the tiny
        preset) has its LLM saved for vLLM into a directory that `close` removes. Off CUDA, vLLM's
        engine core runs in this process unless VLLM_ENABLE_V1_MULTIPROCESSING says otherwise:
        it starts in ~4 s instead of ~20 s, an error keeps its message, and no worker process is
        spawned from inside a Ray actor.
    """
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
    if name == "hf":
        if options:
            raise TypeError(f"the hf engine takes no options, got {sorted(options)}")
        return HfEngine(model)
    if model.device.type != "cuda":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # set before vLLM is imported
    from .vllm import VllmEngine

    if tasks and "lora_scales" not in options:
        options["lora_scales"] = sorted({float(t.settings.lora_scale) for t in tasks})
    return VllmEngine(model, **options)
