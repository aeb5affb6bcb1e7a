"""The generation-engine interface: speech embeddings + prompt + settings in, `Generation`s out.

Everything up to the LLM's input embeddings (features, encoders, Q-Former, projection, prompt
assembly) is the torch `Salmonn`'s; an engine runs the LLM half. Two engines stand behind this
interface and give the same tokens in fp32:

    HfEngine    transformers `generate` on the model's own peft LLM (static, left-padded batches)
    VllmEngine  vLLM from prompt embeddings (paged KV cache, continuous batching across callers)

    engine = build_engine("hf", model, tasks)      # or "vllm" (salmonn.engines.build_engine)
    embeds = model.encode(waveforms, lengths)      # (B, W*Q, D)
    answers = engine.generate_tasks(embeds, tasks) # {task name: [Generation per window]}
    answers = engine.generate([Request(embeds[0], "Please describe the audio.", settings)])

Requests come from `salmonn.prompts` (`Request`, `task_requests`: the one place tasks x windows
become requests); `runs_on_hf` is the one rule for what the vLLM engine leaves to HF.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from ..config import GenerationSettings
from ..model import Generation
from ..prompts import Request, Task, answers_by_task, task_requests

__all__ = ["Engine", "Request", "runs_on_hf", "task_requests"]


def runs_on_hf(settings: GenerationSettings, *, penalty_on_vllm: bool = False) -> bool:
    """Whether requests with these settings run on the HF engine when the vLLM engine is asked
    (`VllmEngine` holds an `HfEngine` for them, which needs the model's full LLM):

    * beam search (num_beams > 1): vLLM's beam search takes no prompt embeddings;
    * a repetition penalty != 1 where HF's penalty cannot run inside vLLM (`penalty_on_vllm`
      False: vLLM's V2 model runner, whose logits processors we cannot apply; also the safe
      answer before an engine is built, when the runner is not known yet).
    """
    return settings.num_beams > 1 or (settings.repetition_penalty != 1.0 and not penalty_on_vllm)


class Engine(ABC):
    """Runs the LLM half of SALMONN. `generate` may be called from several threads at once
    (engines that cannot overlap calls serialise them)."""

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """One `Generation` per request, in request order. A request that cannot run raises for
        this call (other callers' calls are not affected)."""

    def generate_tasks(self, speech_embeds: torch.Tensor, tasks: Sequence[Task]) -> dict[str, list[Generation]]:
        """Run every task on every row of speech_embeds (B, W*Q, D) (`task_requests`).

        Returns {task name: [Generation per row]} in the order of `tasks`."""
        requests = task_requests(speech_embeds, tasks)
        return answers_by_task(tasks, requests, self.generate(requests))

    def close(self) -> None:  # noqa: B027  (a hook: an engine that holds nothing keeps it empty)
        """Release the engine's resources (threads, temporary files). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
