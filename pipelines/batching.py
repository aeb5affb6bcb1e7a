"""Shared by the Ray-free stage adapters: the attempt ledger protocol and its error type."""

from __future__ import annotations

from typing import Protocol

# error types: work that killed its worker process on every attempt; a window whose inference
# raised on every try (retried, then isolated)
from schemas.vocabulary import INFERENCE_ERROR as INFERENCE_ERROR
from schemas.vocabulary import WORKER_CRASH as WORKER_CRASH


class AttemptLedger(Protocol):
    """Counts attempts at a unit of work across worker processes (a Ray actor in a run).

    ``begin(key)`` returns the attempt number (1 on the first try); ``end(key)`` forgets the key
    once the work is done. A key whose count keeps rising is work that kills its worker.
    """

    def begin(self, key: str) -> int: ...

    def end(self, key: str) -> None: ...
