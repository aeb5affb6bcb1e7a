"""Helpers shared by the Ray-free stage adapters: batch layout and the attempt ledger protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

# error_type of work that killed its worker process on every attempt
WORKER_CRASH = "worker_crash"


class AttemptLedger(Protocol):
    """Counts attempts at a unit of work across worker processes (a Ray actor in a run).

    ``begin(key)`` returns the attempt number (1 on the first try); ``end(key)`` forgets the key
    once the work is done. A key whose count keeps rising is work that kills its worker.
    """

    def begin(self, key: str) -> int: ...

    def end(self, key: str) -> None: ...


def rows_to_columns(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """list of row dicts -> dict of object arrays (Ray's numpy batch format), fixed column set."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r.get(name) for r in rows]
        out[name] = arr
    return out
