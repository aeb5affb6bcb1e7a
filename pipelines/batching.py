"""Shared by the Ray-free stage adapters: the attempt ledger protocol."""

from __future__ import annotations

from typing import Protocol


class AttemptLedger(Protocol):
    """Counts attempts at a unit of work across worker processes (a Ray actor in a run).

    ``begin(key)`` returns the attempt number (1 on the first try); ``end(key)`` forgets the key
    once the work is done. A key whose count keeps rising is work that kills its worker.
    """

    def begin(self, key: str) -> int: ...

    def end(self, key: str) -> None: ...
