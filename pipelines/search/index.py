"""Building the search index and keeping it current (:func:`update_index`).

**What the index reflects.** A reserved document (``kind = state``) holds, as zlib-compressed
JSON, the Delta table versions (and table ids) the index reflects, each indexed file's key
(``run_id`` and ``processed_at`` of its ``files`` row) and the number of window documents. It is
replaced in the same tantivy commit as the documents it describes (the Python bindings do not
expose tantivy's commit payload), so a reader sees the data and the versions of one commit, and
an update killed at any point leaves the previous commit: the previous index, whole.

**Incremental update.** Nothing to do when the tables' versions are those recorded. Otherwise one
column scan of ``files`` (file_id, run_id, processed_at) at its current version
is compared with the recorded keys: files that are new or whose key changed (reprocessed, reused
from another uri) have their documents deleted by ``file_id`` and their current ``segments`` rows
added; files no longer in ``files`` (removed from the archive: the mirror semantics) are deleted.
``files`` is read before ``segments`` (a driver commit writes ``segments`` first), so a file's
rows are never older than its recorded key; a run committing meanwhile is picked up by the next
update.

**Full rebuild.** When the index cannot be trusted it is built again from the tables: no index,
no state document, another :data:`~pipelines.search.schema.FORMAT`, a document count that
disagrees with the state, a table recreated (another table id) or older than the recorded
version, or ``rebuild=True``. An index of the right format is rebuilt in place (all documents
deleted and added again in one commit); one that cannot be opened is built in a new folder and
installed by replacing ``meta.json`` (:func:`pipelines.search.sync.install`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import tantivy

import pipelines.search.schema as sch
import pipelines.search.sync as sync
from pipelines.output.store import OutputStore
from pipelines.output.tables import scan

log = logging.getLogger(__name__)

# Rows of segments read (and documents added) per chunk of files: bounds the indexer's memory.
CHUNK_ROWS = 200_000
WRITER_HEAP = 256 * 2**20
SEGMENT_COLUMNS = ["file_id", "uri", "segment_index", "start_s", "end_s", "task", "text", "run_id"]
OPTIONAL_COLUMNS = ["language", "words"]     # schema v5: read where the table has them


@dataclasses.dataclass(frozen=True)
class IndexUpdate:
    """What :func:`update_index` did."""

    out: str
    rebuilt: bool
    reason: str                 # why it rebuilt, "incremental", or "current" (nothing to do)
    files_added: int
    files_reindexed: int        # already indexed, rows changed (reprocessed)
    files_removed: int
    documents_added: int
    documents: int              # window documents in the index after the update
    files: int                  # files the index reflects
    versions: dict[str, int | None]             # the table versions the index now reflects
    previous_versions: dict[str, int | None] | None
    published_files: int = 0    # object storage: files uploaded (meta.json included)
    published_bytes: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.rebuilt or bool(self.files_added or self.files_reindexed or self.files_removed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        v = self.versions
        what = (f"rebuilt ({self.reason})" if self.rebuilt else
                "already current" if self.reason == "current" else "updated")
        line = (f"search index of {self.out}: {what} in {self.seconds:.1f} s: {self.files_added} file(s) added, "
                f"{self.files_reindexed} re-indexed, {self.files_removed} removed ({self.documents_added} "
                f"window(s) written); {self.documents} windows of {self.files} files; reflects files "
                f"v{v.get('files')}, segments v{v.get('segments')}")
        if self.published_files:
            line += f"; published {self.published_files} file(s), {self.published_bytes / 2**20:.1f} MiB"
        return line


@dataclasses.dataclass(frozen=True)
class IndexState:
    """The reserved document's content."""

    tables: dict[str, dict[str, Any] | None]    # name -> {"version", "id"} (None: no table)
    files: dict[str, str]                       # file_id -> key (run_id|processed_at)
    windows: int
    updated_at: str
    format: int = sch.FORMAT

    @property
    def versions(self) -> dict[str, int | None]:
        return {name: (t or {}).get("version") for name, t in self.tables.items()}

    def encode(self) -> bytes:
        return zlib.compress(json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode(), 6)

    @classmethod
    def decode(cls, data: bytes) -> IndexState:
        d = json.loads(zlib.decompress(data))
        return cls(tables=d["tables"], files=d["files"], windows=int(d["windows"]), updated_at=d["updated_at"],
                   format=int(d["format"]))


def read_state(index: tantivy.Index) -> tuple[IndexState | None, str | None]:
    """(state, None) of an index, or (None, why it cannot be trusted)."""
    index.reload()
    searcher = index.searcher()
    found = searcher.search(tantivy.Query.term_query(index.schema, "kind", sch.KIND_STATE), 2).hits
    if len(found) != 1:
        return None, "no state document" if not found else "two state documents"
    try:
        state = IndexState.decode(searcher.doc(found[0][1])["state"][0])
    except (KeyError, IndexError, ValueError, zlib.error) as e:
        return None, f"unreadable state document ({e})"
    if state.format != sch.FORMAT:
        return None, f"index format {state.format}, this is {sch.FORMAT}"
    if searcher.num_docs != state.windows + 1:
        return None, f"{searcher.num_docs - 1} window documents where the state says {state.windows}"
    return state, None


def table_heads(store: OutputStore) -> dict[str, dict[str, Any] | None]:
    """{"files", "segments"} -> {"version", "id"} of the tables now, ``files`` read first."""
    heads: dict[str, dict[str, Any] | None] = {}
    for name in ("files", "segments"):
        dt_ = store.table(name)
        heads[name] = None if dt_ is None else {"version": dt_.version(), "id": dt_.metadata().id}
    return heads


def _distrust(state: IndexState, heads: Mapping[str, dict[str, Any] | None]) -> str | None:
    for name, now in heads.items():
        was = state.tables.get(name)
        if was is None:
            continue
        if now is None:
            return f"table {name} is gone"
        if was.get("id") != now["id"]:
            return f"table {name} was recreated"
        if was["version"] > now["version"]:
            return f"table {name} is at version {now['version']}, older than the index's {was['version']}"
    return None


def _file_keys(store: OutputStore, version: int | None) -> pa.Table:
    """file_id and key of every files row at ``version``."""
    if version is None:
        return pa.table({"file_id": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    dt_ = store.table("files", version)
    assert dt_ is not None
    t = scan(dt_, store.path("files") if store.is_local else None,
             columns=["file_id", "run_id", "processed_at"])
    at = pc.fill_null(pc.cast(t["processed_at"], pa.string()), "")
    key = pc.binary_join_element_wise(t["run_id"], at, "|")
    return pa.table({"file_id": t["file_id"], "key": key})


class _SegmentReader:
    """Reads the ``segments`` rows with text of given files at one table version, data file by
    data file (the tables have no deletion vectors, so a version's rows are its data files'
    rows), touching only the data files that hold those files.

    Each data file is read with a filter of its own column types: the files a Delta delete (a
    removal) rewrites store the string columns as ``string_view`` (deltalake 1.6.6), and Arrow
    (pyarrow 26) can neither test their statistics against a ``string`` value set (one
    ``file_id`` filter over the whole table fails once a file was removed:
    ``ArrowNotImplementedError: greater_equal (string, string_view)``) nor run ``is_in`` or
    ``filter`` on them: such a data file is read, cast, then filtered."""

    def __init__(self, store: OutputStore, version: int):
        from pyarrow import dataset as pads
        from pyarrow import fs as pa_fs

        dt_ = store.table("segments", version)
        assert dt_ is not None
        schema = dt_.to_pyarrow_dataset().schema
        self.columns = SEGMENT_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in schema.names]
        self.schema = pa.schema([schema.field(c) for c in self.columns])
        rel = pa.table(dt_.get_add_actions(flatten=True))["path"].to_pylist()
        self.paths = [store.path("segments", r) for r in rel]
        if store.is_local:
            self.fs: pa_fs.FileSystem = pa_fs.LocalFileSystem()
        else:
            store.fs.invalidate_cache(store.path("segments"))
            self.fs = pa_fs.PyFileSystem(pa_fs.FSSpecHandler(store.fs))
        self.options = pads.ParquetFragmentScanOptions(pre_buffer=False)

    def _dataset(self, path: str) -> Any:
        from pyarrow import dataset as pads

        return pads.dataset(path, format="parquet", filesystem=self.fs)

    def plan(self, file_ids: Sequence[str], per_chunk: int) -> Iterator[tuple[list[str], list[str]]]:
        """(file ids, the data files holding their rows) in chunks of about ``per_chunk`` rows,
        files in the order of the data files (so a chunk reads few of them). One read of the
        ``file_id`` column of each data file."""
        wanted = set(file_ids)
        holders: dict[str, list[str]] = {}
        order: list[tuple[str, int]] = []
        for path in self.paths:
            ids = self._dataset(path).to_table(columns=["file_id"], fragment_scan_options=self.options)["file_id"]
            counts = pc.value_counts(ids.cast(pa.string()))
            for fid, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
                if fid in wanted:
                    if fid not in holders:
                        order.append((fid, n))
                    holders.setdefault(fid, []).append(path)
        chunk: list[str] = []
        rows = 0
        for fid, n in order:
            chunk.append(fid)
            rows += n
            if rows >= per_chunk:
                yield chunk, sorted({p for f in chunk for p in holders[f]})
                chunk, rows = [], 0
        if chunk:
            yield chunk, sorted({p for f in chunk for p in holders[f]})

    def read(self, file_ids: Sequence[str], paths: Sequence[str]) -> pa.Table:
        ids = pa.array(list(file_ids), pa.string())
        where = pc.field("file_id").isin(ids) & pc.invert(pc.is_null(pc.field("text")))
        parts = []
        for path in paths:
            ds = self._dataset(path)
            have = [c for c in self.columns if c in ds.schema.names]
            views = any(ds.schema.field(c).type == pa.string_view() for c in have)
            t = ds.to_table(columns=have, filter=None if views else where, fragment_scan_options=self.options)
            t = pa.table([t[c].cast(self.schema.field(c).type) if c in have
                          else pa.nulls(t.num_rows, self.schema.field(c).type) for c in self.columns],
                         schema=self.schema)
            parts.append(t.filter(where) if views else t)
        return pa.concat_tables(parts) if parts else self.schema.empty_table()


def documents(rows: pa.Table) -> Iterator[tantivy.Document]:
    """The documents of segments ``rows`` (whole files): rows with text, each with its next
    window (same file and task, the next segment index) for the phrase field."""
    rows = rows.sort_by([("file_id", "ascending"), ("task", "ascending"), ("segment_index", "ascending")])
    cols = {name: rows[name].to_pylist() for name in rows.column_names}
    n = rows.num_rows
    keep = [i for i in range(n) if (cols["text"][i] or "").strip()]
    records = [{name: cols[name][i] for name in cols} for i in keep]
    for j, row in enumerate(records):
        nxt = records[j + 1] if j + 1 < len(records) else None
        if nxt is not None and not (nxt["file_id"] == row["file_id"] and nxt["task"] == row["task"]
                                    and nxt["segment_index"] == row["segment_index"] + 1):
            nxt = None
        yield sch.window_document(row, nxt)


def _state_document(state: IndexState) -> tantivy.Document:
    doc = tantivy.Document(kind=sch.KIND_STATE, file_id="__state__")
    doc.add_bytes("state", state.encode())
    return doc


def _new_index(path: Path) -> tantivy.Index:
    path.mkdir(parents=True, exist_ok=True)
    return sch.register(tantivy.Index(sch.build_schema(), path=str(path), reuse=False))


def _writer(index: tantivy.Index) -> tantivy.IndexWriter:
    threads = max(1, min(4, os.cpu_count() or 1))
    try:
        return index.writer(heap_size=WRITER_HEAP, num_threads=threads)
    except ValueError as e:
        if "LockBusy" in str(e):
            raise sync.IndexBusy(f"another process holds the search index's writer lock: {e}") from None
        raise


def update_index(store: OutputStore, *, rebuild: bool = False) -> IndexUpdate:
    """Bring ``store``'s search index up to its tables' latest versions (see the module
    docstring); ``rebuild`` builds it again from the tables. For an ``OUT`` on object storage the
    local working copy is first made equal to the published index, and the result is published."""
    t0 = time.monotonic()
    work = sync.local_copy(store, "work")
    with sync.locked(work):
        if not store.is_local:
            try:
                sync.pull(store, work)
            except FileNotFoundError as e:     # the published index lacks files it names: rebuild it
                log.warning("%s; building the search index again", e)
                (work / sync.META).unlink(missing_ok=True)
        update = _update(store, work, rebuild)
        if not store.is_local and (update.changed or not _published(store)):
            n, size = sync.publish(store, work)
            update = dataclasses.replace(update, published_files=n, published_bytes=size)
    update = dataclasses.replace(update, seconds=time.monotonic() - t0)
    log.info("%s", update.format())
    return update


def _published(store: OutputStore) -> bool:
    return bool(store.fs.exists(store.path(sync.INDEX_DIR, sync.META)))


def _update(store: OutputStore, work: Path, rebuild: bool) -> IndexUpdate:
    from pipelines import faults

    heads = table_heads(store)
    versions = {name: (h or {}).get("version") for name, h in heads.items()}
    index: tantivy.Index | None = None
    state: IndexState | None = None
    reason: str | None = "asked" if rebuild else None
    why: str | None = None
    fresh = False
    try:
        index = sch.open_index(work)
        if json.loads((work / sync.META).read_bytes()).get("schema") != _schema_json():
            why, fresh = "the index's fields differ from this version's", True
        else:
            state, why = read_state(index)
    except FileNotFoundError:
        why, fresh = "no index yet", True
    except ValueError as e:        # tantivy cannot open it (corrupt meta.json, another schema)
        why, fresh = f"unreadable index ({' '.join(str(e).split())[:200]})", True
    if state is None:
        reason = reason or why
        fresh = fresh or (why or "").startswith("index format")
    elif reason is None:
        reason = _distrust(state, heads)
    previous = state.versions if state is not None else None
    if reason is None and state is not None and state.tables == heads:
        return IndexUpdate(store.out, False, "current", 0, 0, 0, 0, state.windows, len(state.files), versions,
                           previous)

    keys = _file_keys(store, versions["files"])
    now_keys = dict(zip(keys["file_id"].to_pylist(), keys["key"].to_pylist()))
    old_keys = state.files if (state is not None and reason is None) else {}
    added = sorted(f for f in now_keys if f not in old_keys)
    changed = sorted(f for f in now_keys if f in old_keys and old_keys[f] != now_keys[f])
    removed = sorted(f for f in old_keys if f not in now_keys)

    build_dir: Path | None = None
    if fresh:
        if store.is_local:
            build_dir = work.parent / f"{sync.INDEX_DIR}.build-{uuid.uuid4().hex[:12]}"
        else:
            for entry in work.iterdir():              # the working copy: nothing in it is needed
                if entry.name != sync.LOCK:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            build_dir = work
        index = _new_index(build_dir)
    assert index is not None
    log.info("search index of %s: %s; %d file(s) to add, %d to re-index, %d to remove", store.out,
             reason or "incremental", len(added), len(changed), len(removed))
    writer = _writer(index)
    try:
        if reason is not None and not fresh:
            writer.delete_all_documents()
        for fid in removed + changed:
            writer.delete_documents_by_term("file_id", fid)
        writer.delete_documents_by_term("kind", sch.KIND_STATE)
        windows = 0 if reason is not None else (state.windows if state is not None else 0)
        added_docs = 0
        todo = sorted(added + changed)
        if todo and versions["segments"] is not None:
            reader = _SegmentReader(store, versions["segments"])
            for chunk, paths in reader.plan(todo, CHUNK_ROWS):
                for doc in documents(reader.read(chunk, paths)):
                    writer.add_document(doc)
                    added_docs += 1
        if reason is None and (removed or changed):
            windows -= _count_windows(index, removed + changed)
        windows += added_docs
        new_state = IndexState(tables=heads, files=now_keys, windows=windows,
                               updated_at=dt.datetime.now(dt.UTC).isoformat())
        writer.add_document(_state_document(new_state))
        log.info("search index of %s: committing %d new window document(s)", store.out, added_docs)
        faults.maybe_crash("search-commit", store.out)   # test hook: die (or wait) before the commit point
        writer.commit()
        writer.wait_merging_threads()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.rollback()
        raise
    finally:
        del writer
    if build_dir is not None and store.is_local:
        sync.install(build_dir, work)
        shutil.rmtree(build_dir, ignore_errors=True)
    check, bad = read_state(sch.open_index(work))
    if check is None:
        raise RuntimeError(f"the search index just written does not check out: {bad}")
    return IndexUpdate(store.out, reason is not None, reason or "incremental", len(added) if reason is None else
                       len(now_keys), len(changed), len(removed), added_docs, check.windows, len(check.files),
                       versions, previous)


@functools.cache
def _schema_json() -> list[Any]:
    """The ``schema`` entry of ``meta.json`` of an index of this version's fields."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tantivy.Index(sch.build_schema(), path=tmp)
        return json.loads((Path(tmp) / sync.META).read_bytes())["schema"]


def _count_windows(index: tantivy.Index, file_ids: Sequence[str]) -> int:
    """Window documents of ``file_ids`` in the index's last commit."""
    index.reload()
    searcher = index.searcher()
    total = 0
    for start in range(0, len(file_ids), 1000):
        q = tantivy.Query.term_set_query(index.schema, "file_id", list(file_ids[start:start + 1000]))
        total += searcher.search(q, 1, count=True).count  # type: ignore[attr-defined]
    return total
