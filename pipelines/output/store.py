"""The output location ``OUT``: where everything lies, the run records, and opening and reading
the tables (:class:`OutputStore`).

Layout under the output URI ``OUT`` (local path or object-store URL)::

    OUT/files/                  Delta table: one row per input file, its latest result
    OUT/segments/               Delta table: one row per (file, segment, task) of each file's latest result
    OUT/_runs/<RUN>/run.json    run record (config, status, counts)
    OUT/_maintenance/           Delta table: the compaction lease (:mod:`.maintenance`)
    OUT/_legacy/                the earlier layout's parts and commit records, kept by :mod:`.migrate`

Tables are read through delta-rs (each file's latest result, or an earlier table version: Delta's
time travel keeps earlier results reachable until ``vacuum`` removes their data files); run
records and other small objects through fsspec.

An output written by the earlier layout (Parquet parts + JSON commit records, schema v1/v2) is
recognised here, so that no reader takes it for an empty output: reading it unconverted raises
:class:`OldLayoutError`, which says to convert it once with ``salmonn-pipeline migrate OUT``
(:mod:`.migrate`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

import schemas
from pipelines import storage
from pipelines.output.runs import RunRecord
from pipelines.output.tables import (
    TableDamage,
    TableDamaged,
    check_data_files,
    create_table,
    evolve,
    open_table,
    scan,
)

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
RUN_RECORD = "run.json"
TABLE_NAMES = ("segments", "files")     # the order of a driver commit: files last
LEGACY_DIR = "_legacy"                  # where `migrate` keeps the earlier layout's parts
COMMITS_DIR = "commits"                 # the earlier layout's commit records (_runs/<run>/commits/)

# Storage-option keys whose values are secrets: never written to run records or logs.
_SECRET_HINTS = ("secret", "key", "token", "password", "credential", "session", "auth")
_PUBLIC_KEYS = frozenset({"endpoint_url", "anon", "region_name", "profile", "use_ssl", "block_size"})


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

    def read_run(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id`` (:class:`pipelines.output.runs.RunRecord`), None when it has none."""
        p = posixpath.join(self.run_dir(run_id), RUN_RECORD)
        try:
            # a record missing its id or status (written by hand, or cut short) still reads
            return RunRecord.from_dict({"run_id": run_id, "status": "unknown", **self.read_json(p)})
        except FileNotFoundError:
            return None

    def write_run(self, record: RunRecord) -> None:
        self.write_json(posixpath.join(self.run_dir(record.run_id), RUN_RECORD), record.to_dict())

    # -- tables ------------------------------------------------------------------------------
    def table(self, name: str, version: int | None = None) -> DeltaTable | None:
        """Table ``name`` ('files' or 'segments') at its latest (or ``version``), None if absent.

        Raises :class:`OldLayoutError` when OUT holds the earlier layout instead."""
        dt_ = open_table(self.table_uri(name), self.delta_options, version)
        if dt_ is None:
            self.check_not_legacy()
        return dt_

    def check_not_legacy(self) -> None:
        """Raise :class:`OldLayoutError` if OUT holds the earlier layout (parts + commit records)."""
        if legacy_parts(self) or any(legacy_record_names(self, r) for r in self.list_runs()):
            raise OldLayoutError(
                f"{self.out} was written by an earlier salmonn-pipeline (Parquet parts + commit records, "
                f"schema version 1/2), not as Delta tables; convert it once with "
                f"`salmonn-pipeline migrate {self.out}` (latest rows into Delta tables, history kept in "
                f"_runs/<run>/run.json and the old parts under {LEGACY_DIR}/)")

    def open_for_write(self, name: str, *, migrating: bool = False) -> DeltaTable:
        """Table ``name``, created if absent, with this pipeline's columns (added if missing).
        (``migrating``: the earlier layout's parts may still be there.)"""
        dt_ = open_table(self.table_uri(name), self.delta_options) if migrating else self.table(name)
        if dt_ is None:
            dt_ = create_table(self.table_uri(name), name, self.delta_options)
        evolve(dt_, name)
        return dt_

    def read_table(self, name: str, *, run_id: str | None = None, latest: bool = True,
                   columns: Sequence[str] | None = None, file_ids: Iterable[str] | None = None,
                   version: int | None = None, where: pc.Expression | None = None) -> pa.Table:
        """Rows of table ``name``: each file's latest result (``latest`` is always true: the
        tables hold nothing else), conformed to this pipeline's schema.

        ``run_id`` keeps the rows that run wrote; ``file_ids`` keeps those files; ``where`` keeps
        the rows matching an Arrow expression of columns the table has; ``columns`` reads only
        those columns; ``version`` reads an earlier table version (time travel)."""
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
        if where is not None:
            expr = where if expr is None else expr & where
        try:
            table = scan(dt_, self.path(name) if self.is_local else None, columns=want, filter=expr)
        except FileNotFoundError as e:
            # a data file the log references is gone: say which table, which file and how to repair
            # it (pipelines.output.health), rather than a traceback of a missing file
            damaged = self.damaged_error(name)
            if damaged is not None:
                raise damaged from e
            raise
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

    def check_table(self, name: str, dt_: DeltaTable | None = None) -> TableDamage | None:
        """The data files table ``name``'s current version references that do not exist (None:
        no such table), from one listing of the table's directory; no data file is opened."""
        dt_ = dt_ if dt_ is not None else self.table(name)
        if dt_ is None:
            return None
        base = self.path(name).rstrip("/")

        def listing(recursive: bool) -> set[str]:
            self.fs.invalidate_cache(base)     # s3fs caches listings; data files come and go
            try:
                entries = self.fs.find(base) if recursive else self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return set()
            return {e[len(base) + 1:] if e.startswith(base + "/") else posixpath.basename(e.rstrip("/"))
                    for e in entries}

        return check_data_files(dt_, name, listing)

    def repair_command(self) -> str:
        """The command that repairs this output's tables (``pipelines.output.health``)."""
        return f"salmonn-pipeline maintain {self.out} --repair" + (" --storage-option ..." if self.storage_options
                                                                    else "")

    def damaged_error(self, name: str) -> TableDamaged | None:
        """After a read of table ``name`` failed on a missing file: :class:`TableDamaged` when the
        table's current version references files that are gone, else None (the caller re-raises
        what it caught: an earlier version vacuumed, a file a concurrent compaction replaced)."""
        try:
            damage = self.check_table(name)
        except Exception as e:  # noqa: BLE001 - the caller has the original error to raise
            log.debug("could not check table %s: %s", name, e)
            return None
        return TableDamaged(self.out, [damage], self.repair_command()) if damage and damage.damaged else None

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


def iter_runs(store: OutputStore) -> Iterator[RunRecord]:
    for run_id in store.list_runs():
        rec = store.read_run(run_id)
        if rec is not None:
            yield rec


# -- the earlier layout, as found in place (read and converted by pipelines.output.migrate) ------

def legacy_parts(store: OutputStore) -> list[str]:
    """Part directories of the earlier layout still in place (``OUT/<table>/run_id=<RUN>``)."""
    found: list[str] = []
    for name in ("files", "segments"):
        base = store.path(name)
        store.fs.invalidate_cache(base)
        try:
            entries = store.fs.ls(base, detail=False)
        except FileNotFoundError:
            continue
        found.extend(e for e in entries if posixpath.basename(e.rstrip("/")).startswith("run_id="))
    return sorted(found)


def legacy_record_names(store: OutputStore, run_id: str) -> list[str]:
    """The paths of ``run_id``'s commit records of the earlier layout (``_runs/<run>/commits/*.json``)."""
    base = posixpath.join(store.run_dir(run_id), COMMITS_DIR)
    store.fs.invalidate_cache(base)
    try:
        names = store.fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and not posixpath.basename(n).startswith("."))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
