"""The generation-engine interface: speech embeddings + prompt + settings in, `Generation`s out.

Everything up to the LLM's input embeddings (features, encoders, Q-Former, projection, prompt
assembly) is the torch `Salmonn`'s; an engine runs the LLM half. Two engines stand behind this
interface and give the same tokens in fp32:

    HfEngine    transformers `generate` on the model's own peft LLM (static, left-padded batches)
    VllmEngine  vLLM from prompt embeddings (paged KV cache, continuous batching across callers)

    engine = HfEngine(model)                       # or VllmEngine(model, lora_scales=...)
    embeds = model.encode(waveforms, lengths)      # (B, W*Q, D)
    answers = engine.generate_tasks(embeds, tasks) # {task name: [Generation per window]}
    answers = engine.generate([Request(embeds[0], "Please describe the audio.", settings)])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import GenerationSettings
from ..model import Generation
from ..prompts import Task


@dataclass(frozen=True)
class Request:
    """One answer to generate: a prompt about one window's speech embeddings."""

    speech: torch.Tensor  # (W*Q, D) one window's rows of Salmonn.encode
    prompt: str  # the instruction (the chat template is applied by the engine's model)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    # Benchmarks only: generate exactly this many tokens, EOS never emitted, so that every engine
    # generates the same number of tokens (settings.max_new_tokens is then ignored).
    exact_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.speech.ndim != 2:
            raise ValueError(f"Request.speech must be (W*Q, D), got shape {tuple(self.speech.shape)}")
        if self.exact_new_tokens is not None and self.exact_new_tokens < 1:
            raise ValueError(f"Request.exact_new_tokens must be >= 1, got {self.exact_new_tokens}")


def task_requests(speech_embeds: torch.Tensor, tasks: Sequence[Task]) -> list[Request]:
    """Every task on every row of speech_embeds (B, W*Q, D), task-major: request t*B + i is
    task t on window i."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return [Request(row, task.prompt, task.settings) for task in tasks for row in speech_embeds]


class Engine(ABC):
    """Runs the LLM half of SALMONN. `generate` may be called from several threads at once
    (engines that cannot overlap calls serialise them)."""

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """One `Generation` per request, in request order. A request that cannot run raises for
        this call (other callers' calls are not affected)."""

    def generate_tasks(self, speech_embeds: torch.Tensor, tasks: Sequence[Task]) -> dict[str, list[Generation]]:
        """Run every task on every row of speech_embeds (B, W*Q, D).

        Returns {task name: [Generation per row]} in the order of `tasks`."""
        b = speech_embeds.shape[0]
        generations = self.generate(task_requests(speech_embeds, tasks))
        return {task.name: generations[t * b : (t + 1) * b] for t, task in enumerate(tasks)}

    def close(self) -> None:  # noqa: B027  (a hook: an engine that holds nothing keeps it empty)
        """Release the engine's resources (threads, adapter files). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
