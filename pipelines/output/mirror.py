"""The tables mirror the archive: which indexed files a run removes, and which files it fills by
copying the results of the same content instead of processing them.

* **Removals.** A file of the ``files`` table inside the run's input scope (``scope.contains``,
  :class:`pipelines.sources.Scope`) that the listing no longer returns has left the archive: its
  rows are deleted from both tables (a Delta delete: earlier versions keep them for time travel).
  Rows outside the scope (another archive written into the same OUT) are never touched. A run
  that would remove more than ``max_removed`` of the indexed files in its scope stops first
  (:class:`TooManyRemovals`): an empty or partial listing must not wipe an index.
* **Reuse.** A listed file that needs processing (new or changed) and whose content key (see
  ``pipelines.sources``) equals, with an equal size, the ``content_hash`` of a ``files`` row under
  another URI takes that row's results: its segment rows are copied under its own
  ``file_id``/``uri``. Only rows the incremental ledger would skip are sources: the same config
  hash, status ``ok`` or ``partial``, and no error type the next run retries; and only with their
  segment rows complete (one per window and task, all written by the run that wrote the
  ``files`` row). So a reused file gets exactly the rows processing it would have kept skipping.

No Ray and no listing here: the scope is anything with ``contains(uri)``, the listed files are
``FileRef``-like (``uri``, ``file_id``, ``size_bytes``, ``content_key``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.output.ledger import RETRYABLE_ERRORS
from pipelines.output.store import OutputStore
from schemas.vocabulary import STATUS_OK, STATUS_PARTIAL

log = logging.getLogger(__name__)

REUSABLE_STATUSES = (STATUS_OK, STATUS_PARTIAL)


class ScopeLike(Protocol):
    def contains(self, uri: str) -> bool: ...


# ---------------------------------------------------------------------------------------------
# Removals
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Removals:
    """The indexed files of a run's scope that the listing no longer returns."""

    file_ids: tuple[str, ...]
    uris: tuple[str, ...]
    indexed: int              # files of the files table inside the scope (listed or not)

    @property
    def share(self) -> float:
        return len(self.file_ids) / self.indexed if self.indexed else 0.0

    def __len__(self) -> int:
        return len(self.file_ids)

    def refused_by(self, max_share: float, max_files: int) -> bool:
        """Whether the removal guard stops the run: more than ``max_share`` of the indexed files in
        scope *and* more than ``max_files`` files."""
        return bool(self.file_ids) and self.share > max_share and len(self.file_ids) > max_files


NO_REMOVALS = Removals((), (), 0)


class TooManyRemovals(RuntimeError):
    """The run would remove more of its scope's indexed files than ``--max-removed`` allows."""


def find_removals(store: OutputStore, scope: ScopeLike, refs: Iterable[Any], *,
                  files: pa.Table | None = None) -> Removals:
    """The files of ``files`` inside ``scope`` that are not among the listed ``refs``: one scan of
    the ``file_id``/``uri`` columns (or ``files``: those columns as the caller already read them)."""
    t = files if files is not None else store.read_table("files", columns=["file_id", "uri"])
    if t.num_rows == 0:
        return NO_REMOVALS
    listed = {r.uri for r in refs}
    ids, uris, indexed = [], [], 0
    for fid, uri in zip(t["file_id"].to_pylist(), t["uri"].to_pylist()):
        if not scope.contains(uri):
            continue
        indexed += 1
        if uri not in listed:
            ids.append(fid)
            uris.append(uri)
    order = sorted(range(len(ids)), key=uris.__getitem__)
    return Removals(tuple(ids[i] for i in order), tuple(uris[i] for i in order), indexed)


def check_removals(removals: Removals, max_removed: float, max_removed_files: int = 3) -> None:
    """Raise :class:`TooManyRemovals` (a one-line reason naming the numbers and the flags) when the
    removals exceed both ``max_removed`` of the indexed files in scope and ``max_removed_files``
    files. A bad listing loses most of the scope; one episode deleted from an archive of seven files
    is 14% of it, and must not fail a correct nightly job, hence the count as well as the share."""
    if removals.refused_by(max_removed, max_removed_files):
        raise TooManyRemovals(
            f"the listing no longer returns {len(removals)} of the {removals.indexed} indexed files in the "
            f"input's scope ({removals.share:.0%} > --max-removed {max_removed:g}, and {len(removals)} > "
            f"--max-removed-files {max_removed_files}); nothing was changed. A wrong prefix, credentials that "
            f"see nothing or an unmounted volume look like this: check the input, then allow the removal with "
            f"--max-removed {_enough(removals.share)} (or keep the rows with --keep-removed)")


def _enough(share: float) -> str:
    """The smallest --max-removed (2 decimals, rounded up) that allows ``share``."""
    return f"{min(1.0, math.ceil(share * 100) / 100):g}"


# ---------------------------------------------------------------------------------------------
# Reuse
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReuseSource:
    """The results one listed file reuses: the source's files row and its segment rows."""

    file: dict[str, Any]                # the source's files row (every column)
    segments: list[dict[str, Any]]      # its segment rows, ordered by (segment_index, task)


def _candidate_rows(files: pa.Table, chash: str) -> pa.Table:
    """The rows of ``files`` (the files table as planning read it) that may be a source under
    config ``chash``."""
    if files.num_rows == 0:
        return files
    t = files.filter(pc.fill_null(pc.equal(files["config_hash"], pa.scalar(chash, pa.string())), False))
    if t.num_rows == 0:
        return t
    ok = pc.and_(pc.is_valid(t["content_hash"]), pc.is_valid(t["size_bytes"]))
    ok = pc.and_(ok, pc.is_in(t["status"], pa.array(REUSABLE_STATUSES, pa.string())))
    retried = pc.fill_null(pc.is_in(t["error_type"], pa.array(sorted(RETRYABLE_ERRORS), pa.string())), False)
    return t.filter(pc.and_(ok, pc.invert(retried)))


def reusable_sizes(files: pa.Table, chash: str) -> set[int]:
    """The sizes of the files that may be a source under config ``chash``: a listed file of
    another size cannot reuse anything, so its content need not be known to decide."""
    return set(_candidate_rows(files, chash)["size_bytes"].to_pylist())


def find_sources(store: OutputStore, refs: Sequence[Any], chash: str, *, files: pa.Table,
                 n_tasks: int | None = None) -> dict[str, ReuseSource]:
    """file_id of a listed ref -> the results it can reuse (refs without a content key, or whose
    content is indexed under no other URI, are not in it). ``files``: the files table (every
    column) as planning read it.

    Among several sources of the same content: ``ok`` before ``partial``, then the latest
    processed, then the smallest URI. The sources' segment rows are read (one filtered scan of
    ``segments``) and a source whose rows are not complete (``n_tasks`` rows per window, all of
    the run that wrote its files row) is passed over."""
    wanted = [r for r in refs if r.content_key is not None and r.size_bytes is not None]
    if not wanted:
        return {}
    cand = _candidate_rows(files, chash)
    if cand.num_rows == 0:
        return {}
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    keys = {(r.content_key, r.size_bytes) for r in wanted}
    for row in cand.to_pylist():
        if (row["content_hash"], row["size_bytes"]) in keys:
            by_key[(row["content_hash"], row["size_bytes"])].append(row)
    for rows in by_key.values():
        rows.sort(key=_preference)
    choices = {r.file_id: [s for s in by_key.get((r.content_key, r.size_bytes), []) if s["uri"] != r.uri]
               for r in wanted}
    choices = {fid: rows for fid, rows in choices.items() if rows}
    if not choices:
        return {}
    source_ids = {s["file_id"] for rows in choices.values() for s in rows}
    segments = _segments_of(store, source_ids)
    out: dict[str, ReuseSource] = {}
    for fid, rows in choices.items():
        for s in rows:
            segs = [x for x in segments.get(s["file_id"], []) if x["run_id"] == s["run_id"]]
            if _complete(s, segs, n_tasks):
                out[fid] = ReuseSource(s, segs)
                break
            log.info("not reusing the results of %s: its segment rows are not complete (%d rows for %s "
                     "windows)", s["uri"], len(segs), s["n_segments"])
    return out


def _preference(row: dict[str, Any]) -> tuple[bool, float, str]:
    """ok before partial, then the latest processed, then the smallest URI."""
    when = row["processed_at"].timestamp() if row["processed_at"] is not None else 0.0
    return row["status"] != STATUS_OK, -when, row["uri"]


def _segments_of(store: OutputStore, file_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    t = store.read_table("segments", file_ids=file_ids)
    t = t.sort_by([("file_id", "ascending"), ("segment_index", "ascending"), ("task", "ascending")])
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in t.to_pylist():
        out[row["file_id"]].append(row)
    return out


def _complete(source: dict[str, Any], segs: list[dict[str, Any]], n_tasks: int | None) -> bool:
    """One row per (window, task) for every window of the source, no duplicate."""
    n_windows = source["n_segments"] or 0
    cells = {(x["segment_index"], x["task"]) for x in segs}
    if len(cells) != len(segs) or {i for i, _ in cells} != set(range(n_windows)):
        return False
    tasks = collections.Counter(i for i, _ in cells)
    per_window = set(tasks.values())
    return not segs or (len(per_window) == 1 and (n_tasks is None or per_window == {n_tasks}))
