"""The transformers engine: `Salmonn.generate` on the model's own peft LLM, exactly as before."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..model import Generation, Salmonn
from ..prompts import Task
from .base import Engine, Request


class HfEngine(Engine):
    """transformers `generate` from `inputs_embeds`: requests with equal settings (and speech
    length) share one left-padded static batch, in order of first appearance; peft's LoRA scale is
    set for each batch. The exact reference, and the only engine for beam search.

    One peft model holds one LoRA scale at a time, so calls from several threads run one after
    the other (a lock), never interleaved.
    """

    def __init__(self, model: Salmonn):
        self.model = model
        self._lock = threading.Lock()
        self.generated_tokens = 0  # tokens of all answers so far (without EOS)

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.settings, tuple(r.speech.shape), r.exact_new_tokens is None), []).append(i)
        out: list[Generation | None] = [None] * len(requests)
        with self._lock:
            for (settings, _, free), rows in groups.items():
                speech = torch.stack([requests[i].speech for i in rows])  # (R, W*Q, D)
                exact = None if free else [int(requests[i].exact_new_tokens or 0) for i in rows]
                generations = self.model.generate(speech, [requests[i].prompt for i in rows], settings,
                                                  exact_new_tokens=exact)
                for i, g in zip(rows, generations, strict=True):
                    out[i] = g
            self.generated_tokens += sum(g.n_tokens for g in out if g is not None)
        return [g for g in out if g is not None]

    def generate_tasks(self, speech_embeds: torch.Tensor, tasks: Sequence[Task]) -> dict[str, list[Generation]]:
        """`Salmonn.generate_tasks`: tasks with equal settings share one batched call."""
        with self._lock:
            out = self.model.generate_tasks(speech_embeds, tasks)
            self.generated_tokens += sum(g.n_tokens for gens in out.values() for g in gens)
        return out
