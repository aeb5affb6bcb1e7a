"""Full-text search over an output's text: "where in the archive did someone say X", ranked (BM25),
to the second, kept current by every run.

An embedded tantivy index beside the tables (``OUT/_search/``; on object storage a local copy
published there as write-once segment files plus ``meta.json`` last), one document per
``segments`` row with text. The parts: :mod:`.schema` (fields and analyzers), :mod:`.index`
(:func:`update_index`: incremental update, full rebuild, the reserved state document),
:mod:`.sync` (the local copy, publish and pull, cleaning), :mod:`.query` (:func:`search`,
:class:`Hit`, the JSON form).

    from pipelines.search import search
    for hit in search("OUT", '"quantum computing"', task="transcribe", limit=5):
        print(hit.uri, hit.start_s, hit.end_s, hit.snippet_marked)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pipelines.output.store import OutputStore
from pipelines.search.index import IndexState, IndexUpdate, read_state, table_heads, update_index
from pipelines.search.query import JSON_FORMAT, Hit, NoIndex, SearchError, hits_json, open_for_search, search
from pipelines.search.schema import open_index
from pipelines.search.sync import CLEAN_AFTER_S, IndexBusy, clean_dir

__all__ = ["JSON_FORMAT", "Hit", "IndexBusy", "IndexState", "IndexStatus", "IndexUpdate", "NoIndex", "SearchError",
           "clean_index", "hits_json", "index_status", "open_index", "read_state", "search", "update_index"]


def clean_index(store: OutputStore, *, older_than_s: float = CLEAN_AFTER_S) -> int:
    """Delete the index files of ``OUT/_search`` that no index version needs (older than
    ``older_than_s``: a publish in progress keeps its files); for ``maintain``. Returns how many."""
    return clean_dir(store, older_than_s)


@dataclasses.dataclass(frozen=True)
class IndexStatus:
    """Which table versions the published index reflects, and whether they are the latest."""

    exists: bool
    versions: dict[str, int | None] | None     # reflected by the index
    tables: dict[str, int | None]              # the tables now
    windows: int
    files: int
    reason: str | None = None                  # why the index cannot be trusted (it would be rebuilt)

    @property
    def current(self) -> bool:
        return self.exists and self.reason is None and self.versions == self.tables

    def to_dict(self) -> dict[str, Any]:
        return {"exists": self.exists, "versions": self.versions, "tables": self.tables, "current": self.current,
                "windows": self.windows, "files": self.files}


def index_status(out: str, storage_options: Mapping[str, Any] | None = None) -> IndexStatus:
    store = OutputStore(out, storage_options)
    tables = {name: (h or {}).get("version") for name, h in table_heads(store).items()}
    try:
        index = open_for_search(out, storage_options)
    except NoIndex:
        return IndexStatus(False, None, tables, 0, 0)
    state, why = read_state(index)
    if state is None:
        return IndexStatus(True, None, tables, 0, 0, why)
    return IndexStatus(True, state.versions, tables, state.windows, len(state.files))
