"""Commit protocol on Delta Lake tables (deltalake / delta-rs): exactly-once, resumable, incremental.

Layout under the output URI ``OUT`` (local path or object-store URL)::

    OUT/files/                  Delta table: one row per input file, its latest result
    OUT/segments/               Delta table: one row per (file, segment, task) of each file's latest result
    OUT/_runs/<RUN>/run.json    run record (config, status, counts)

One driver commit (a batch of complete files) is two Delta commits, ``segments`` first, then
``files``. Each is an overwrite with the predicate ``file_id IN (<the batch's files>)``: the
batch's files' earlier rows are removed and its new rows added in one atomic table version, so a
reprocessed file's new result replaces the old one and an error result removes the old segments.
Each carries an application transaction (app id = run id, version = commit seq) and commit
metadata (``run_id``, ``seq``, ``file_ids``). Earlier results stay reachable through Delta's time
travel until ``vacuum`` removes their data files.

* A commit is complete when ``files`` has it. The incremental ledger is a column scan of
  ``files`` (uri, version, config_hash, status, error_type): its cost depends on the number of
  files in the table, not on how many commits or runs wrote them.
* Resume: ``files``' transaction version for the run id is the last complete seq; the next commit
  continues after it. A crash between the two table commits leaves ``segments`` one seq ahead:
  those files are not in ``files``, so they are processed again, and the redo's predicate
  replaces the segment rows the interrupted commit wrote (never duplicates them).
* Concurrent writers (two runs on one OUT): Delta's optimistic concurrency rejects a commit when a
  concurrent commit added rows its predicate covers (``CommitFailedError``); the commit is
  retried on the new table version, where the predicate now removes the other run's rows. So
  each file's rows are in each table exactly once.
* Data files are Parquet (zstd); their ``file_id`` column carries the field metadata
  ``salmonn_pipeline.schema_version`` (delta-rs writes field metadata of the table schema into
  every data file's footer, but not schema-level metadata), and the table configuration carries
  the same key (``DeltaTable.metadata().configuration``).

An output written by the earlier layout (Parquet parts + JSON commit records, schema v1/v2) is
converted once by :func:`migrate` (``salmonn-pipeline migrate OUT``); reading it unconverted raises
:class:`OldLayoutError`, which says so.

No Ray here: the driver calls this module; tests use it directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import posixpath
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

import schemas
from pipelines import storage
from schemas import vocabulary

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
RUN_RECORD = "run.json"
TABLE_NAMES = ("segments", "files")     # the order of a driver commit: files last
LEGACY_DIR = "_legacy"                  # where `migrate` keeps the earlier layout's parts
COMMITS_DIR = "commits"                 # the earlier layout's commit records (_runs/<run>/commits/)

# Run states and the error types the next run tries again (schemas.vocabulary: transient by
# nature); every other committed file is skipped while its (uri, version, config_hash) is unchanged.
RUN_RUNNING, RUN_COMPLETED, RUN_FAILED = vocabulary.RUN_RUNNING, vocabulary.RUN_COMPLETED, vocabulary.RUN_FAILED
RETRYABLE_ERRORS = vocabulary.RETRYABLE_ERRORS

# Compaction bin-packs data files smaller than this into files of about this size (Delta's own
# default is 100 MiB; object stores read 64-256 MiB files at full speed).
TARGET_FILE_SIZE = 128 * 2**20
# Attempts of one table commit that keeps losing to concurrent writers.
COMMIT_ATTEMPTS = 60
# Column statistics kept in the Delta log (min/max/null count per data file): the columns queries
# filter on. Free-text columns (text, prompt, error_message) would only make the log bigger.
STATS_COLUMNS = {
    "files": "file_id,uri,run_id,status,error_type,config_hash,processed_at",
    "segments": "file_id,uri,run_id,task,segment_index,label",
}
# The files columns the incremental ledger reads.
LEDGER_COLUMNS = ["file_id", "uri", "version", "etag", "size_bytes", "mtime", "config_hash", "status",
                  "error_type", "run_id"]
MIGRATE_APP_ID = "salmonn-pipeline-migrate"
# One process at a time compacts an OUT. delta-rs 1.6 lets two concurrent compactions of the same
# data files both commit (its conflict checker passes removes marked dataChange=false, which is
# what a compaction's are), and each adds its own rewritten copy of the rows: every row of those
# files twice. Two runs finishing together did exactly that. The lease is a row in a small Delta
# table of its own, taken with an overwrite on a predicate, which Delta's conflict checker does
# serialize: of two processes taking it at once, one commit fails. A crashed holder's lease ends
# after LEASE_S.
LEASE_TABLE = "_maintenance"
LEASE_NAME = "compaction"
LEASE_S = 3600.0
_LEASE_SCHEMA = pa.schema([pa.field("name", pa.string(), nullable=False), pa.field("holder", pa.string()),
                           pa.field("until", pa.timestamp("us", tz="UTC"))])
SCHEMA_VERSION_KEY = schemas.METADATA_KEY.decode()

WRITER_PROPERTIES = WriterProperties(compression="ZSTD")

# Storage-option keys whose values are secrets: never written to run records or logs.
_SECRET_HINTS = ("secret", "key", "token", "password", "credential", "session", "auth")
_PUBLIC_KEYS = frozenset({"endpoint_url", "anon", "region_name", "profile", "use_ssl", "block_size"})


class MaintenanceBusy(RuntimeError):
    """Another process holds this output's compaction lease."""


def _holder(what: str) -> str:
    """Who takes a lease: what, on which host and process."""
    import socket

    return f"{what} on {socket.gethostname()} (pid {os.getpid()})"


class OldLayoutError(RuntimeError):
    """OUT holds the earlier layout (Parquet parts + commit records): `salmonn-pipeline migrate OUT`."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options safe to record: secret-looking values are replaced by '***'."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact(v)
        elif k in _PUBLIC_KEYS or not any(h in k.lower() for h in _SECRET_HINTS):
            out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(type(v).__name__)
        else:
            out[k] = "***"
    return out


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or utcnow()
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class CommittedFile(NamedTuple):
    """What the ledger says about one committed file (enough to decide skips). A named tuple:
    the ledger makes one per file in the table."""

    file_id: str
    uri: str
    version: str
    config_hash: str
    status: str
    error_type: str | None
    run_id: str
    seq: int          # the driver commit that wrote it; 0 where read back from the table


@dataclasses.dataclass(frozen=True)
class Commit:
    """One driver commit, as :meth:`Committer.commit` made it."""

    run_id: str
    seq: int
    n_files: int
    n_segments: int
    versions: dict[str, int]   # table name -> the Delta table version this commit created


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """A commit record of the earlier layout (``_runs/<run>/commits/<seq>.json``); read by
    :func:`migrate`."""

    run_id: str
    seq: int
    files_part: str        # path relative to OUT
    segments_part: str     # path relative to OUT
    n_files: int
    n_segments: int
    committed_at: str
    files: tuple[CommittedFile, ...]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["files"] = [f._asdict() for f in self.files]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CommitRecord:
        d = json.loads(text)
        d["files"] = tuple(CommittedFile(**f) for f in d["files"])
        return cls(**d)


def scan(dt_: DeltaTable, local_root: str | None, *, columns: Sequence[str] | None = None,
         filter: pc.Expression | None = None) -> pa.Table:
    """Read a Delta table's rows (``columns`` present in the table, rows matching ``filter``) so
    that no Arrow thread is left holding a Python object when the scan returns.

    ``DeltaTable.to_pyarrow_dataset()`` reads through delta-rs' Python file handler
    (``PyFileSystem(DeltaStorageHandler)``) with Parquet pre-buffering on: the scan issues
    coalesced reads ahead on Arrow's I/O threads, and reads nobody waits for complete after
    ``to_table`` has returned. The buffer such a read fills is a Python object; when the last one
    is released on the I/O thread after the interpreter started finalising, that thread cannot take
    the GIL, Python ends it with ``pthread_exit``, the unwind crosses a ``noexcept`` C++
    destructor and the process aborts ("terminate called without an active exception", exit 134)
    after its work was done. Seen in ``gdb`` (``arrow::py::PyBuffer::~PyBuffer`` <-
    ``ReadRangeCache::LazyImpl::~LazyImpl`` on an Arrow I/O thread while the main thread ran
    ``Py_FinalizeEx``), 13 of 40 runs of ``benchmarks/commit_scale.py --smoke`` beside a CPU hog.

    So a local table (``local_root``: its directory) is read with Arrow's own local file system,
    whose reads hold no Python object; any other store through delta-rs' handler with
    pre-buffering off, so every read belongs to the scan and is over when it returns.
    """
    from pyarrow import fs as pa_fs
    from pyarrow.dataset import ParquetFragmentScanOptions

    if local_root is not None:
        ds = dt_.to_pyarrow_dataset(filesystem=pa_fs.SubTreeFileSystem(local_root, pa_fs.LocalFileSystem()))
        options = None
    else:
        ds = dt_.to_pyarrow_dataset()
        options = ParquetFragmentScanOptions(pre_buffer=False)
    have = set(ds.schema.names)
    cols = [c for c in columns if c in have] if columns is not None else None
    return ds.to_table(columns=cols, filter=filter, fragment_scan_options=options)


# ---------------------------------------------------------------------------------------------
# The output location
# ---------------------------------------------------------------------------------------------

class OutputStore:
    """One output location ``OUT``: the Delta tables (delta-rs) and the run records (fsspec)."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None = None):
        self.out = out.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.out, **self.storage_options)
        self.root = root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs) or "local" in _protocols(self.fs)
        self.delta_options = storage.delta_options(self.out, self.storage_options)

    # -- paths -------------------------------------------------------------------------------
    def path(self, *rel: str) -> str:
        return posixpath.join(self.root, *rel)

    def run_dir(self, run_id: str) -> str:
        return self.path(RUNS_DIR, run_id)

    def uri(self, rel: str) -> str:
        """A user-facing URI for a path relative to OUT (for messages and queries)."""
        return f"{self.out}/{rel}"

    def table_uri(self, name: str) -> str:
        """The URI delta-rs opens for table ``name`` (an absolute path for local outputs)."""
        if self.is_local:
            return self.path(name)
        scheme, rest = self.out.split("://", 1)
        scheme = {"s3a": "s3", "gcs": "gs"}.get(scheme, scheme)
        return f"{scheme}://{rest}/{name}"

    # -- small objects (run records) ---------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        parent = posixpath.dirname(path)
        if self.is_local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.fs.mv(tmp, path)
        else:
            # Object stores make an object visible only once its upload completes.
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, sort_keys=True, indent=1, default=str) + "\n").encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    # -- runs --------------------------------------------------------------------------------
    def list_runs(self) -> list[str]:
        base = self.path(RUNS_DIR)
        self.fs.invalidate_cache(base)  # s3fs caches listings; other writers may have added runs
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        runs = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(r for r in runs if not r.startswith((".", "_")))

    def read_run(self, run_id: str) -> dict[str, Any] | None:
        p = posixpath.join(self.run_dir(run_id), RUN_RECORD)
        try:
            return self.read_json(p)
        except FileNotFoundError:
            return None

    def write_run(self, record: Mapping[str, Any]) -> None:
        self.write_json(posixpath.join(self.run_dir(record["run_id"]), RUN_RECORD), dict(record))

    # -- tables ------------------------------------------------------------------------------
    def table(self, name: str, version: int | None = None) -> DeltaTable | None:
        """Table ``name`` ('files' or 'segments') at its latest (or ``version``), None if absent.

        Raises :class:`OldLayoutError` when OUT holds the earlier layout instead."""
        try:
            return DeltaTable(self.table_uri(name), version=version, storage_options=self.delta_options)
        except TableNotFoundError:
            self.check_not_legacy()
            return None

    def check_not_legacy(self) -> None:
        """Raise :class:`OldLayoutError` if OUT holds the earlier layout (parts + commit records)."""
        if self.legacy_parts() or any(self._legacy_record_names(r) for r in self.list_runs()):
            raise OldLayoutError(
                f"{self.out} was written by an earlier salmonn-pipeline (Parquet parts + commit records, "
                f"schema version 1/2), not as Delta tables; convert it once with "
                f"`salmonn-pipeline migrate {self.out}` (latest rows into Delta tables, history kept in "
                f"_runs/<run>/run.json and the old parts under {LEGACY_DIR}/)")

    def open_for_write(self, name: str, *, migrating: bool = False) -> DeltaTable:
        """Table ``name``, created if absent, with this pipeline's columns (added if missing).
        (``migrating``: the earlier layout's parts may still be there.)"""
        dt_ = _quiet_table(self, name) if migrating else self.table(name)
        if dt_ is None:
            dt_ = _create_table(self.table_uri(name), name, self.delta_options)
        _evolve(dt_, name)
        return dt_

    def read_table(self, name: str, *, run_id: str | None = None, latest: bool = True,
                   columns: Sequence[str] | None = None, file_ids: Iterable[str] | None = None,
                   version: int | None = None) -> pa.Table:
        """Rows of table ``name``: each file's latest result (``latest`` is always true: the
        tables hold nothing else), conformed to this pipeline's schema.

        ``run_id`` keeps the rows that run wrote; ``file_ids`` keeps those files; ``columns``
        reads only those columns; ``version`` reads an earlier table version (time travel)."""
        del latest
        schema = schemas.TABLES[name]
        want = list(columns) if columns is not None else schema.names
        sub = pa.schema([schema.field(c) for c in want], metadata=schema.metadata)
        dt_ = self.table(name, version)
        if dt_ is None:
            return sub.empty_table()
        expr = None
        if run_id is not None:
            expr = pc.field("run_id") == run_id
        if file_ids is not None:
            ids = pc.field("file_id").isin(pa.array(sorted(set(file_ids)), pa.string()))
            expr = ids if expr is None else expr & ids
        table = scan(dt_, self.path(name) if self.is_local else None, columns=want, filter=expr)
        return schemas.conform(table, sub)

    def read_run_rows(self, name: str, run_id: str) -> pa.Table:
        """The rows ``run_id`` wrote, as of its last commit (Delta time travel), including rows a
        later run has since replaced. Falls back to the rows still in the latest table version
        where that version is no longer readable (vacuumed) or not found."""
        version = self.run_version(name, run_id)
        if version is not None:
            try:
                return self.read_table(name, run_id=run_id, version=version)
            except (OSError, ValueError, DeltaError) as e:   # that version's files vacuumed away
                log.warning("table %s at version %d (run %s) is no longer readable (%s); using the "
                            "latest version's rows of that run", name, version, run_id, e)
        return self.read_table(name, run_id=run_id)

    def run_version(self, name: str, run_id: str) -> int | None:
        """The table version of ``run_id``'s last commit to table ``name`` (from the commit
        metadata, newest first), or None."""
        for version, info in self.commit_infos(name):
            if info.get("run_id") == run_id:
                return version
        return None

    def commit_infos(self, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """(version, commitInfo) of table ``name``'s commits, newest first, as long as the log
        keeps them. Reads one log object per version: the Delta log's JSON-lines commit files
        hold one ``commitInfo`` action each. (``DeltaTable.history`` reads the same, but holds
        Python's GIL while it waits for the store, which stalls an S3 server running in this
        process, as the tests' is.)"""
        dt_ = self.table(name)
        if dt_ is None:
            return
        for version in range(dt_.version(), -1, -1):
            path = self.path(name, "_delta_log", f"{version:020d}.json")
            try:
                lines = self.fs.cat_file(path).decode().splitlines()
            except FileNotFoundError:   # removed by log cleanup (older than the log retention)
                return
            for line in lines:
                action = json.loads(line) if line.strip() else {}
                if "commitInfo" in action:
                    yield version, action["commitInfo"]
                    break

    def committed_seq(self, run_id: str) -> int:
        """The last complete commit seq of ``run_id`` (0: none)."""
        dt_ = self.table("files")
        return (dt_.transaction_version(run_id) or 0) if dt_ is not None else 0

    def ledger(self) -> dict[str, CommittedFile]:
        """uri -> what ``files`` holds for it: a scan of a few columns of one table."""
        t = self.read_table("files", columns=LEDGER_COLUMNS)
        cols = {c: t[c].to_pylist() for c in LEDGER_COLUMNS}
        out: dict[str, CommittedFile] = {}
        for i, uri in enumerate(cols["uri"]):
            version = cols["version"][i]
            if version is None:  # rows written without the column: the listing's own rule
                version = _version_of(cols["etag"][i], cols["size_bytes"][i], cols["mtime"][i])
            out[uri] = CommittedFile(file_id=cols["file_id"][i], uri=uri, version=version,
                                     config_hash=cols["config_hash"][i], status=cols["status"][i],
                                     error_type=cols["error_type"][i], run_id=cols["run_id"][i], seq=0)
        return out

    def pending(self, refs: Sequence[Any], cfg_hash: str) -> list[Any]:
        """The listed files (``FileRef``-like: uri, version) that need processing under config
        ``cfg_hash``: :func:`is_done` for every file, decided in one Arrow join of the listing
        with the ledger columns of ``files`` (no Python object per table row)."""
        refs = list(refs)
        t = self.read_table("files", columns=["uri", "version", "etag", "size_bytes", "mtime", "config_hash",
                                              "error_type"])
        if t.num_rows == 0 or not refs:
            return refs
        if t["version"].null_count:  # rows written without the column: the listing's own rule
            versions = [v if v is not None else _version_of(e, s, m) for v, e, s, m in zip(
                *(t[c].to_pylist() for c in ("version", "etag", "size_bytes", "mtime")))]
            t = t.set_column(t.schema.get_field_index("version"), "version", pa.array(versions, pa.string()))
        listed = pa.table({"uri": pa.array([r.uri for r in refs], pa.string()),
                           "listed_version": pa.array([r.version for r in refs], pa.string()),
                           "i": pa.array(range(len(refs)), pa.int64())})
        joined = listed.join(t.select(["uri", "version", "config_hash", "error_type"]), "uri", join_type="inner")
        done = pc.and_(pc.and_(pc.equal(joined["version"], joined["listed_version"]),
                               pc.equal(joined["config_hash"], pa.scalar(cfg_hash, pa.string()))),
                       pc.invert(pc.is_in(joined["error_type"], pa.array(sorted(RETRYABLE_ERRORS), pa.string()))))
        done_rows = set(joined.filter(pc.fill_null(done, False))["i"].to_pylist())
        return [r for i, r in enumerate(refs) if i not in done_rows]

    def data_files(self, name: str) -> list[str]:
        """fsspec paths of the data files of table ``name``'s latest version."""
        dt_ = self.table(name)
        if dt_ is None:
            return []
        return [self.path(name, rel) for rel in pa.table(dt_.get_add_actions(flatten=True))["path"].to_pylist()]

    def untracked_files(self, name: str) -> list[str]:
        """Parquet files in table ``name``'s directory that no table version ever listed: debris
        of a write interrupted before its commit (or a concurrent write still in progress).
        ``maintain --vacuum-hours H`` removes those older than H hours. (Files of earlier
        versions, kept for time travel, are not counted.)"""
        dt_ = self.table(name)
        if dt_ is None:
            return []
        every = set(dt_.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False, full=True))
        removed = set(dt_.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False))
        return sorted(self.path(name, rel) for rel in every - removed
                      if rel.endswith(".parquet") and not rel.startswith(("_", ".")))

    # -- housekeeping ------------------------------------------------------------------------
    def maintain(self, *, vacuum_hours: float | None = None, target_size: int = TARGET_FILE_SIZE) -> dict[str, Any]:
        """Compact both tables (small data files into files of ``target_size``), write a
        checkpoint, and with ``vacuum_hours`` delete data files no version newer than that needs
        (time travel before it ends there) and untracked files older than that."""
        tables = {name: dt_ for name in TABLE_NAMES if (dt_ := self.table(name)) is not None}
        if not tables:
            return {}
        report, busy = self.compact_under_lease(tables, _holder("maintain"), vacuum_hours=vacuum_hours,
                                                target_size=target_size)
        if busy is not None and not report:
            raise MaintenanceBusy(f"{busy} is compacting {self.out}; try again when it is done (a lease left "
                                  f"by a process that died ends by itself)")
        if busy is not None:
            left = [name for name in tables if name not in report]
            raise MaintenanceBusy(f"the lease ran out during the compaction of {list(report)[-1]} and {busy} took "
                                  f"it; {', '.join(left)} was not compacted")
        return report

    def compact_under_lease(self, tables: Mapping[str, DeltaTable], holder: str, *, vacuum_hours: float | None = None,
                            target_size: int = TARGET_FILE_SIZE,
                            lenient: bool = False) -> tuple[dict[str, Any], str | None]:
        """Compact (and with ``vacuum_hours`` vacuum) ``tables`` in order while ``holder`` holds
        the compaction lease, taken again before each table (a long compaction is not joined by
        another). Returns the reports of the tables compacted and, when the lease could not be had
        or was lost on the way, who held it (the tables after that are left as they are).
        ``lenient``: a lease that cannot be read counts as held by somebody else, not an error."""
        report: dict[str, Any] = {}
        try:
            for name, dt_ in tables.items():
                try:
                    busy = self.claim_maintenance(holder)
                except Exception as e:  # noqa: BLE001 - lenient: without the lease, no compaction
                    if not lenient:
                        raise
                    busy = f"nobody known (the lease could not be read: {type(e).__name__}: {e})"
                if busy is not None:
                    return report, busy
                dt_.update_incremental()
                report[name] = _maintain_table(dt_, name, vacuum_hours=vacuum_hours, target_size=target_size)
            return report, None
        finally:
            self.release_maintenance(holder)     # only if held by ``holder``

    def claim_maintenance(self, holder: str, *, lease_s: float = LEASE_S) -> str | None:
        """Take the compaction lease of this OUT for ``holder`` (for ``lease_s`` seconds): None
        when taken, else who holds it and until when."""
        dt_ = self._lease_table()
        held = self._lease(dt_)
        now = utcnow()
        if held is not None and held["holder"] not in (None, holder) and held["until"] > now:
            return f"{held['holder']} (lease until {held['until'].isoformat(timespec='seconds')})"
        row = pa.Table.from_pylist([{"name": LEASE_NAME, "holder": holder,
                                     "until": now + dt.timedelta(seconds=lease_s)}], schema=_LEASE_SCHEMA)
        try:
            write_deltalake(dt_, row, mode="overwrite", predicate=f"name = {_sql_str(LEASE_NAME)}")
        except CommitFailedError:      # another process took it at the same moment
            dt_.update_incremental()
            held = self._lease(dt_)
            return f"{held['holder'] if held else 'another process'} (taken at the same moment)"
        return None

    def release_maintenance(self, holder: str) -> None:
        """End ``holder``'s lease (best effort: an unreleased lease ends by itself)."""
        try:
            dt_ = self._lease_table()
            held = self._lease(dt_)
            if held is None or held["holder"] != holder:
                return
            row = pa.Table.from_pylist([{"name": LEASE_NAME, "holder": None, "until": utcnow()}],
                                       schema=_LEASE_SCHEMA)
            write_deltalake(dt_, row, mode="overwrite", predicate=f"name = {_sql_str(LEASE_NAME)}")
            if dt_.version() % 50 == 0:    # two versions a run: keep its log and data files few
                dt_.create_checkpoint()
                dt_.cleanup_metadata()
                dt_.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
        except Exception as e:  # noqa: BLE001 - the lease expires anyway
            log.warning("could not release the compaction lease of %s (%s); it ends by itself", self.out, e)

    def _lease_table(self) -> DeltaTable:
        uri, options = self.table_uri(LEASE_TABLE), dict(self.delta_options)
        try:
            return DeltaTable(uri, storage_options=options)
        except TableNotFoundError:
            try:
                return DeltaTable.create(uri, _LEASE_SCHEMA, mode="ignore", name=LEASE_TABLE,
                                         description="salmonn-pipeline: who is compacting this output",
                                         storage_options=options, raise_if_key_not_exists=False)
            except CommitFailedError:  # created by another process at the same moment
                return DeltaTable(uri, storage_options=options)

    @staticmethod
    def _lease(dt_: DeltaTable) -> dict[str, Any] | None:
        rows = [r for r in scan(dt_, None).to_pylist() if r["name"] == LEASE_NAME]
        return rows[0] if rows else None

    # -- the earlier layout (read by migrate) -----------------------------------------------
    def legacy_parts(self) -> list[str]:
        """Part directories of the earlier layout still in place (``OUT/<table>/run_id=<RUN>``)."""
        found = []
        for name in ("files", "segments"):
            base = self.path(name)
            self.fs.invalidate_cache(base)
            try:
                entries = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                continue
            found.extend(e for e in entries if posixpath.basename(e.rstrip("/")).startswith("run_id="))
        return sorted(found)

    def _legacy_record_names(self, run_id: str) -> list[str]:
        base = posixpath.join(self.run_dir(run_id), COMMITS_DIR)
        self.fs.invalidate_cache(base)
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".json") and not posixpath.basename(n).startswith("."))

    def legacy_commits(self, run_id: str | None = None) -> list[CommitRecord]:
        """The earlier layout's commit records (of ``run_id``, or of every run), oldest first."""
        records = []
        for run in [run_id] if run_id else self.list_runs():
            for name in self._legacy_record_names(run):
                with self.fs.open(name, "rb") as f:
                    records.append(CommitRecord.from_json(f.read().decode()))
        return sorted(records, key=lambda r: (r.run_id, r.seq))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _version_of(etag: str | None, size: int | None, mtime: dt.datetime | None) -> str:
    """FileRef.version from the listing columns (for rows written without ``version``)."""
    if etag:
        return etag
    if size is None and mtime is None:
        return "unknown"
    return f"{size}-{mtime.isoformat() if mtime else None}"


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _id_predicate(ids: Iterable[str]) -> str:
    return "file_id IN (" + ",".join(_sql_str(i) for i in ids) + ")"


def _table_schema(name: str) -> pa.Schema:
    """The Delta table schema of ``name``: the pipeline's columns, with the schema version as
    field metadata of ``file_id`` (delta-rs keeps field metadata in every data file's footer)."""
    schema = schemas.TABLES[name]
    fields = [f.with_metadata({SCHEMA_VERSION_KEY: schemas.SCHEMA_VERSION}) if f.name == "file_id" else f
              for f in schema]
    return pa.schema(fields)


def _create_table(uri: str, name: str, options: Mapping[str, str]) -> DeltaTable:
    config = {SCHEMA_VERSION_KEY: schemas.SCHEMA_VERSION, "delta.dataSkippingStatsColumns": STATS_COLUMNS[name]}
    try:
        return DeltaTable.create(uri, _table_schema(name), mode="ignore", name=name,
                                 description=f"salmonn-pipeline {name} (schema version {schemas.SCHEMA_VERSION})",
                                 configuration=config, storage_options=dict(options),
                                 raise_if_key_not_exists=False)
    except CommitFailedError:  # another writer created it at the same moment
        return DeltaTable(uri, storage_options=dict(options))


def _evolve(dt_: DeltaTable, name: str) -> None:
    """Bring an existing table to this pipeline's schema: add missing (nullable) columns and
    record the schema version. A table with columns this pipeline does not know was written by a
    newer one: refuse to write to it."""
    from deltalake import Field

    have = {f.name for f in dt_.schema().fields}
    want = _table_schema(name)
    unknown = have - set(want.names)
    if unknown:
        raise schemas.SchemaError(
            f"table {name} has columns {sorted(unknown)} this pipeline does not know (schema version "
            f"{dt_.metadata().configuration.get(SCHEMA_VERSION_KEY)}; this is {schemas.SCHEMA_VERSION}): "
            f"use the salmonn-pipeline that wrote it")
    missing = [f for f in want if f.name not in have]
    recorded = dt_.metadata().configuration.get(SCHEMA_VERSION_KEY)
    if not missing and recorded == schemas.SCHEMA_VERSION:
        return
    props = CommitProperties(custom_metadata={"salmonn_pipeline.operation": f"schema version {schemas.SCHEMA_VERSION}"})
    if missing:
        log.info("table %s: adding columns %s (schema version %s)", name, [f.name for f in missing],
                 schemas.SCHEMA_VERSION)
        dt_.alter.add_columns([Field.from_arrow(f.with_nullable(True)) for f in missing], commit_properties=props)
    dt_.alter.set_column_metadata("file_id", {SCHEMA_VERSION_KEY: schemas.SCHEMA_VERSION}, commit_properties=props)
    dt_.alter.set_table_properties({SCHEMA_VERSION_KEY: schemas.SCHEMA_VERSION}, raise_if_not_exists=False,
                                   commit_properties=props)


def table_schema_version(dt_: DeltaTable) -> str | None:
    """The schema version a Delta table records in its configuration."""
    return dt_.metadata().configuration.get(SCHEMA_VERSION_KEY)


def data_file_schema_version(parquet_schema: pa.Schema) -> str | None:
    """The schema version a Parquet data file carries: the ``file_id`` field's metadata (Delta
    tables), or the schema metadata (the earlier layout's parts)."""
    version = schemas.schema_version(parquet_schema)
    if version is not None or "file_id" not in parquet_schema.names:
        return version
    meta = parquet_schema.field("file_id").metadata or {}
    value = meta.get(schemas.METADATA_KEY)
    return value.decode() if value is not None else None


def _retry_conflicts(what: str, fn: Callable[[], Any], refresh: Callable[[], None], attempts: int) -> Any:
    """``fn()``, retried on ``CommitFailedError`` (a concurrent writer won the version) after
    ``refresh()`` and a randomized backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CommitFailedError as e:
            if attempt == attempts:
                raise
            delay = min(5.0, 0.05 * 2 ** min(attempt, 7)) * (0.5 + random.random())
            log.info("%s: a concurrent commit conflicts (%s); retrying on the new version in %.2f s (attempt %d)",
                     what, str(e).splitlines()[0][:120], delay, attempt + 1)
            time.sleep(delay)
            refresh()
    raise AssertionError("unreachable")


def _maintain_table(dt_: DeltaTable, name: str, *, vacuum_hours: float | None, target_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    props = CommitProperties(custom_metadata={"salmonn_pipeline.operation": "maintain"})
    try:
        metrics = _retry_conflicts(f"compact {name}", lambda: dt_.optimize.compact(
            target_size=target_size, writer_properties=WRITER_PROPERTIES, commit_properties=props),
            dt_.update_incremental, attempts=5)
        out["files_removed"], out["files_added"] = metrics.get("numFilesRemoved", 0), metrics.get("numFilesAdded", 0)
    except CommitFailedError as e:  # busy concurrent writers: the next maintenance compacts
        log.warning("compaction of %s skipped: concurrent writers kept conflicting (%s)", name, e)
        out["files_removed"] = out["files_added"] = 0
    dt_.update_incremental()
    dt_.create_checkpoint()
    out["version"] = dt_.version()
    if vacuum_hours is not None:
        removed = dt_.vacuum(retention_hours=int(vacuum_hours), dry_run=False, enforce_retention_duration=False,
                             full=True, commit_properties=props)
        out["vacuumed"] = len(removed)
    return out


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------

def committed_ledger(store: OutputStore) -> dict[str, CommittedFile]:
    """uri -> the committed entry for that uri (see :meth:`OutputStore.ledger`)."""
    return store.ledger()


def is_done(entry: CommittedFile | None, version: str, cfg_hash: str) -> bool:
    """Whether a file at ``version`` under config ``cfg_hash`` needs no processing."""
    if entry is None:
        return False
    if entry.version != version or entry.config_hash != cfg_hash:
        return False
    # a transient failure (whole file, or some windows of a partial one) is tried again
    return entry.error_type not in RETRYABLE_ERRORS


# ---------------------------------------------------------------------------------------------
# Committing
# ---------------------------------------------------------------------------------------------

def _with_ledger_columns(files: pa.Table, entries: Sequence[CommittedFile]) -> pa.Table:
    """``files`` with ``version`` (and a missing ``config_hash``) from the ledger entries."""
    by_id = {e.file_id: e for e in entries}
    ids = files["file_id"].to_pylist()
    if set(ids) != set(by_id) or len(ids) != len(set(ids)):
        raise ValueError("a commit needs exactly one files row and one ledger entry per file")
    version = pa.array([by_id[i].version for i in ids], pa.string())
    files = files.set_column(files.schema.get_field_index("version"), files.schema.field("version"), version)
    chash = pa.array([c if c is not None else by_id[i].config_hash
                      for i, c in zip(ids, files["config_hash"].to_pylist())], pa.string())
    return files.set_column(files.schema.get_field_index("config_hash"), files.schema.field("config_hash"), chash)


class Committer:
    """Writes the commits of one run: ``segments`` then ``files``, each replacing the batch's
    files' earlier rows, each with the application transaction (run id, seq)."""

    def __init__(self, store: OutputStore, run_id: str, *, start_seq: int | None = None):
        self.store = store
        self.run_id = run_id
        self.tables = {name: store.open_for_write(name) for name in TABLE_NAMES}
        done = self.tables["files"].transaction_version(run_id) or 0
        written = self.tables["segments"].transaction_version(run_id) or 0
        # a segments commit whose files commit never landed: its files are not done, so they are
        # processed again and the redo replaces these segment rows
        self.in_flight_seq = written if written > done else None
        self.next_seq = start_seq if start_seq is not None else max(done, written) + 1
        self.n_commits = 0

    def in_flight_file_ids(self) -> list[str]:
        """The files of the interrupted commit (segments written, files not), from its metadata."""
        if self.in_flight_seq is None:
            return []
        for _, info in self.store.commit_infos("segments"):
            if info.get("run_id") == self.run_id and str(info.get("seq")) == str(self.in_flight_seq):
                return [i for i in str(info.get("file_ids", "")).split(",") if i]
        return []

    def settle_in_flight(self, redo_ids: Iterable[str]) -> list[str]:
        """After a crash between the two table commits: remove the interrupted commit's segment
        rows of files this attempt will not process again (their input vanished or another run
        committed them); the others are replaced when their redo commits. Returns the ids removed."""
        stale = sorted(set(self.in_flight_file_ids()) - set(redo_ids))
        if stale:
            pred = f"run_id = {_sql_str(self.run_id)} AND {_id_predicate(stale)}"
            props = CommitProperties(custom_metadata={"run_id": self.run_id, "seq": str(self.in_flight_seq),
                                                      "salmonn_pipeline.operation": "settle interrupted commit"},
                                     app_transactions=[Transaction(self.run_id, self.in_flight_seq)])
            dt_ = self.tables["segments"]
            _retry_conflicts("settle segments", lambda: dt_.delete(pred, commit_properties=props),
                             dt_.update_incremental, COMMIT_ATTEMPTS)
            log.info("removed the segment rows of %d file(s) of interrupted commit %d", len(stale), self.in_flight_seq)
        return stale

    def commit(self, files: pa.Table, segments: pa.Table, entries: Iterable[CommittedFile]) -> Commit:
        entries = list(entries)
        files = _with_ledger_columns(schemas.conform(files, schemas.FILES), entries)
        segments = schemas.conform(segments, schemas.SEGMENTS)
        schemas.check_values("files", files)
        schemas.check_values("segments", segments)
        ids = sorted(files["file_id"].to_pylist())
        stray = set(segments["file_id"].to_pylist()) - set(ids)
        if stray:
            raise ValueError(f"segments rows of files not in this commit: {sorted(stray)[:5]}")
        # rows in URI order: data files cover narrow URI ranges, which the Delta log's statistics
        # let readers skip
        files = files.sort_by([("uri", "ascending")])
        segments = segments.sort_by([("uri", "ascending"), ("segment_index", "ascending"), ("task", "ascending")])
        seq = self.next_seq
        versions = {}
        for name, data in (("segments", segments), ("files", files)):
            versions[name] = self._write(name, data, ids, seq)
        self.next_seq += 1
        self.n_commits += 1
        log.debug("committed seq %d: %d files, %d segment rows (versions %s)", seq, files.num_rows,
                  segments.num_rows, versions)
        return Commit(self.run_id, seq, files.num_rows, segments.num_rows, versions)

    def _write(self, name: str, data: pa.Table, ids: Sequence[str], seq: int) -> int:
        dt_ = self.tables[name]
        props = CommitProperties(
            custom_metadata={"run_id": self.run_id, "seq": str(seq), "file_ids": ",".join(ids)},
            app_transactions=[Transaction(self.run_id, seq)])
        data = data.cast(_table_schema(name))

        def write() -> int:
            write_deltalake(dt_, data, mode="overwrite", predicate=_id_predicate(ids),
                            writer_properties=WRITER_PROPERTIES, commit_properties=props)
            return dt_.version()

        return _retry_conflicts(f"commit {seq} to {name}", write, dt_.update_incremental, COMMIT_ATTEMPTS)

    def finish(self) -> dict[str, Any]:
        """End of a run that committed something: compact the tables and write checkpoints. When
        another process holds the compaction lease (a concurrent run finishing, ``maintain``),
        this run only writes checkpoints: the next compaction takes its files too."""
        if not self.n_commits:
            return {}
        report, busy = self.store.compact_under_lease(self.tables, _holder(f"run {self.run_id}"), lenient=True)
        if busy is not None:
            log.warning("compaction skipped: %s is compacting this output (the next run or `salmonn-pipeline "
                        "maintain` compacts the files this run wrote)", busy)
            for name, dt_ in self.tables.items():
                if name not in report:
                    dt_.update_incremental()
                    dt_.create_checkpoint()
                    report[name] = {"version": dt_.version(), "skipped": busy}
        return report


def iter_runs(store: OutputStore) -> Iterator[dict[str, Any]]:
    for run_id in store.list_runs():
        rec = store.read_run(run_id)
        if rec is not None:
            yield rec


# ---------------------------------------------------------------------------------------------
# Migration from the earlier layout
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Migration:
    runs: int
    commits: int
    files: int            # latest rows written to the files table
    segments: int
    parts_moved: int
    already_done: bool

    def format(self, out: str) -> str:
        if self.already_done and not self.parts_moved:
            return f"{out}: already Delta tables, nothing to migrate"
        return (f"{out}: migrated {self.commits} commits of {self.runs} run(s): {self.files} files and "
                f"{self.segments} segment rows (the latest result of each file) into Delta tables; "
                f"{self.parts_moved} old parts kept under {out}/{LEGACY_DIR}/, commit history in each "
                f"run's run.json")


def _latest_commit_of_files(commits: Iterable[CommitRecord]) -> dict[str, tuple[str, int]]:
    """file_id -> (run_id, seq) of the most recent commit that holds it (runs ordered by run id,
    which starts with its UTC start time; commits within a run by seq)."""
    best: dict[str, tuple[str, int]] = {}
    for c in sorted(commits, key=lambda c: (c.run_id, c.seq)):
        for f in c.files:
            best[f.file_id] = (c.run_id, c.seq)
    return best


def _read_legacy_part(store: OutputStore, rel: str) -> pa.Table:
    for candidate in (rel, posixpath.join(LEGACY_DIR, rel)):
        try:
            with store.fs.open(store.path(candidate), "rb") as f:
                return pq.read_table(f, pre_buffer=False)   # see scan()
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{store.uri(rel)}: a part its commit record lists is missing")


def migrate(out: str, storage_options: Mapping[str, Any] | None = None) -> Migration:
    """Convert an output of the earlier layout into Delta tables, in place.

    1. read every commit record and keep, for each file, the rows of its latest commit (schema
       v1/v2 rows are conformed: missing columns null; ``version`` from the record);
    2. copy each part to ``OUT/_legacy/<table>/run_id=<RUN>/`` (nothing is lost);
    3. write the latest rows as the first version of both tables (application transaction
       ``salmonn-pipeline-migrate``, so a second attempt does not write them again);
    4. record each run's commit history in its run.json (``legacy_commits``);
    5. delete the parts from their old place (Delta would treat them as debris), then move the
       commit records to ``OUT/_legacy/_runs/<RUN>/commits/``.

    Every step can be repeated: an interrupted migration is finished by running it again.
    """
    store = OutputStore(out, storage_options)
    records = store.legacy_commits()
    parts = store.legacy_parts()
    tables = {name: _quiet_table(store, name) for name in TABLE_NAMES}
    files_dt = tables["files"]
    done = files_dt is not None and (files_dt.transaction_version(MIGRATE_APP_ID) or 0) >= 1
    if not records and not parts:
        return Migration(0, 0, 0, 0, 0, already_done=any(t is not None for t in tables.values()))
    if not done:
        for name, table in tables.items():
            if table is not None and table.version() > 0 and (table.transaction_version(MIGRATE_APP_ID) or 0) < 1:
                raise RuntimeError(f"{store.uri(name)} already is a Delta table with data: migrate "
                                   f"converts an output of the earlier layout only")

    best = _latest_commit_of_files(records)
    entries = {f.file_id: f for c in records for f in c.files if best.get(f.file_id) == (c.run_id, c.seq)}
    latest: dict[str, list[pa.Table]] = {"files": [], "segments": []}
    for c in records:
        keep = pa.array(sorted(f for f, (run, seq) in best.items() if (run, seq) == (c.run_id, c.seq)), pa.string())
        for name, rel in (("files", c.files_part), ("segments", c.segments_part)):
            raw = _read_legacy_part(store, rel)
            t = schemas.conform(raw.select([n for n in raw.column_names if n in schemas.TABLES[name].names]),
                                schemas.TABLES[name])
            latest[name].append(t.filter(pc.is_in(t["file_id"], keep)))
    files = pa.concat_tables(latest["files"]) if latest["files"] else schemas.FILES.empty_table()
    segments = pa.concat_tables(latest["segments"]) if latest["segments"] else schemas.SEGMENTS.empty_table()
    if files.num_rows:
        files = _with_ledger_columns(files, [entries[i] for i in files["file_id"].to_pylist()])

    moved = 0
    for c in records:
        for rel in (c.files_part, c.segments_part):
            src, dst = store.path(rel), store.path(LEGACY_DIR, rel)
            if store.fs.exists(src) and not store.fs.exists(dst):
                store.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                store.fs.copy(src, dst)
                moved += 1

    for name, data in (("segments", segments), ("files", files)):
        dt_ = store.open_for_write(name, migrating=True)
        if (dt_.transaction_version(MIGRATE_APP_ID) or 0) < 1:   # not written by an earlier attempt
            meta = {"run_id": MIGRATE_APP_ID, "seq": "1",
                    "salmonn_pipeline.operation": "migrate from parts + commit records"}
            props = CommitProperties(custom_metadata=meta, app_transactions=[Transaction(MIGRATE_APP_ID, 1)])
            write_deltalake(dt_, data.sort_by([("uri", "ascending")]).cast(_table_schema(name)), mode="append",
                            writer_properties=WRITER_PROPERTIES, commit_properties=props)
            dt_.create_checkpoint()

    by_run: dict[str, list[CommitRecord]] = {}
    for c in records:
        by_run.setdefault(c.run_id, []).append(c)
    for run_id, commits in by_run.items():
        rec = store.read_run(run_id) or {"run_id": run_id, "status": "unknown"}
        if "legacy_commits" not in rec:
            rec["legacy_commits"] = [{
                "seq": c.seq, "committed_at": c.committed_at, "n_files": c.n_files, "n_segments": c.n_segments,
                "files_part": posixpath.join(LEGACY_DIR, c.files_part),
                "segments_part": posixpath.join(LEGACY_DIR, c.segments_part),
                "files": [{"uri": f.uri, "version": f.version, "config_hash": f.config_hash, "status": f.status,
                           "error_type": f.error_type} for f in c.files],
            } for c in commits]
            store.write_run(rec)

    for p in store.legacy_parts():
        store.fs.rm(p, recursive=True)
    for run_id in by_run:   # the records last: until then a second attempt can read them
        for name in store._legacy_record_names(run_id):
            dst = store.path(LEGACY_DIR, posixpath.relpath(name, store.root))
            store.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            store.fs.copy(name, dst)
            store.fs.rm(name)
        base = posixpath.join(store.run_dir(run_id), COMMITS_DIR)
        if store.is_local and store.fs.exists(base):
            store.fs.rm(base, recursive=True)   # the empty directory (object stores have none)
    log.info("migrated %s: %d commits, %d files, %d segment rows", out, len(records), files.num_rows,
             segments.num_rows)
    return Migration(runs=len(by_run), commits=len(records), files=files.num_rows, segments=segments.num_rows,
                     parts_moved=moved, already_done=done)


def _quiet_table(store: OutputStore, name: str) -> DeltaTable | None:
    """Table ``name`` or None, without the earlier-layout check (migrate is that layout's reader)."""
    try:
        return DeltaTable(store.table_uri(name), storage_options=store.delta_options)
    except TableNotFoundError:
        return None
