"""The transformers engine: `Salmonn.generate_requests` on the model's own peft LLM."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..model import Generation, Salmonn
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
        with self._lock:
            out = self.model.generate_requests(requests)
            self.generated_tokens += sum(g.n_tokens for g in out)
        return out
