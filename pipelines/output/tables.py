"""The two Delta tables (``files``, ``segments``) as delta-rs holds them: their schema and its
evolution, how they are created, opened and scanned, and how a write retries against concurrent
writers.

* Data files are Parquet (zstd); their ``file_id`` column carries the field metadata
  ``salmonn_pipeline.schema_version`` (delta-rs writes field metadata of the table schema into
  every data file's footer, but not schema-level metadata), and the table configuration carries
  the same key (``DeltaTable.metadata().configuration``).
* A table written by an older pipeline gains the columns it lacks (nullable) before this one
  writes to it; a table with columns this pipeline does not know was written by a newer one and
  is refused.
* A table whose version references data files that no longer exist is a :class:`TableDamage`
  (:func:`check_data_files`: its add actions against one listing), reported as
  :class:`TableDamaged` (one line); ``pipelines.output.health`` repairs it.

The columns themselves are defined in ``schemas`` only; this module adds what Delta needs.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, WriterProperties
from deltalake.exceptions import CommitFailedError, TableNotFoundError

import schemas

log = logging.getLogger(__name__)

# Column statistics kept in the Delta log (min/max/null count per data file): the columns queries
# filter on. Free-text columns (text, prompt, error_message) would only make the log bigger.
STATS_COLUMNS = {
    "files": "file_id,uri,run_id,status,error_type,config_hash,processed_at",
    "segments": "file_id,uri,run_id,task,segment_index,label",
}
SCHEMA_VERSION_KEY = schemas.METADATA_KEY.decode()

WRITER_PROPERTIES = WriterProperties(compression="ZSTD")


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

    A data file the log references that no longer exists raises ``FileNotFoundError`` (a local
    table and object stores alike); ``OutputStore.read_table`` turns it into
    ``pipelines.output.health.TableDamaged`` (the table, the file, the repair command).
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
    try:
        return ds.to_table(columns=cols, filter=filter, fragment_scan_options=options)
    except pa.ArrowNotImplementedError:
        if filter is None:
            raise
    # Data files delta-rs rewrote (a delete, a predicate overwrite that kept rows, a compaction)
    # store strings as string_view, which Arrow's filters cannot compare with the string literals
    # of ``filter`` ("no kernel matching input types (string, string_view)"). Such a fragment is
    # read whole in the table's types (the dataset schema casts it), then filtered; the others as
    # usual.
    parts = []
    for fragment in ds.get_fragments():
        views = any(pa.types.is_string_view(f.type) or pa.types.is_binary_view(f.type)
                    for f in fragment.physical_schema)
        if not views:
            parts.append(fragment.to_table(schema=ds.schema, columns=cols, filter=filter,
                                           fragment_scan_options=options))
            continue
        t = fragment.to_table(schema=ds.schema, fragment_scan_options=options).filter(filter)   # read as string
        parts.append(t.select(cols) if cols is not None else t)
    if not parts:
        return ds.to_table(columns=cols, filter=filter, fragment_scan_options=options)
    return pa.concat_tables(parts)


def open_table(uri: str, options: dict[str, str], version: int | None = None) -> DeltaTable | None:
    """The Delta table at ``uri`` (at its latest, or ``version``), None where there is none."""
    try:
        return DeltaTable(uri, version=version, storage_options=options)
    except TableNotFoundError:
        return None


def table_schema(name: str) -> pa.Schema:
    """The Delta table schema of ``name``: the pipeline's columns, with the schema version as
    field metadata of ``file_id`` (delta-rs keeps field metadata in every data file's footer)."""
    schema = schemas.TABLES[name]
    fields = [f.with_metadata({SCHEMA_VERSION_KEY: schemas.SCHEMA_VERSION}) if f.name == "file_id" else f
              for f in schema]
    return pa.schema(fields)


def create_table(uri: str, name: str, options: Mapping[str, str]) -> DeltaTable:
    config = {SCHEMA_VERSION_KEY: schemas.SCHEMA_VERSION, "delta.dataSkippingStatsColumns": STATS_COLUMNS[name]}
    try:
        return DeltaTable.create(uri, table_schema(name), mode="ignore", name=name,
                                 description=f"salmonn-pipeline {name} (schema version {schemas.SCHEMA_VERSION})",
                                 configuration=config, storage_options=dict(options),
                                 raise_if_key_not_exists=False)
    except CommitFailedError:  # another writer created it at the same moment
        return DeltaTable(uri, storage_options=dict(options))


def evolve(dt_: DeltaTable, name: str) -> None:
    """Bring an existing table to this pipeline's schema: add missing (nullable) columns and
    record the schema version. A table with columns this pipeline does not know was written by a
    newer one: refuse to write to it."""
    from deltalake import Field

    have = {f.name for f in dt_.schema().fields}
    want = table_schema(name)
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


def sql_str(value: str) -> str:
    """``value`` as an SQL string literal, for a Delta predicate."""
    return "'" + value.replace("'", "''") + "'"


def retry_conflicts(what: str, fn: Callable[[], Any], refresh: Callable[[], None], attempts: int) -> Any:
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


# -- a table that lost data files (pipelines.output.health detects, repairs and refills) ----------

@dataclasses.dataclass(frozen=True)
class TableDamage:
    """What one table's current version references that does not exist
    (:func:`check_data_files`)."""

    table: str
    version: int
    referenced: int                        # data files the version references
    missing: tuple[str, ...]               # of them, those that do not exist (paths relative to the table)
    lost_rows: int | None                  # the rows they held (the Delta log's statistics), None if unknown
    id_ranges: tuple[tuple[str | None, str | None], ...]   # (min, max) file_id of each missing file
    seconds: float                         # how long the check took

    @property
    def damaged(self) -> bool:
        return bool(self.missing)

    def describe(self, out: str) -> str:
        """One line: the table, how many data files are missing and the first of them."""
        more = f", and {len(self.missing) - 1} more" if len(self.missing) > 1 else ""
        rows = f" ({self.lost_rows} rows)" if self.lost_rows is not None else ""
        return (f"table {self.table} of {out} (version {self.version}) references {len(self.missing)} of its "
                f"{self.referenced} data files that no longer exist{rows}: {self.missing[0]}{more}")


class TableDamaged(RuntimeError):
    """A table of OUT references data files that no longer exist. ``str()`` is one line naming
    the table(s), the first missing file and ``command`` (the repair); :meth:`lines` gives one
    line per damaged table."""

    def __init__(self, out: str, damages: Sequence[TableDamage], command: str):
        self.out = out
        self.damages = tuple(d for d in damages if d.damaged)
        self.command = command
        super().__init__("; ".join(d.describe(out) for d in self.damages) + self._advice())

    def _advice(self) -> str:
        return f"; repair with `{self.command}`, then run again to refill the lost rows"

    def lines(self) -> list[str]:
        return [d.describe(self.out) + self._advice() for d in self.damages]


def check_data_files(dt_: DeltaTable, name: str, listing: Callable[[bool], set[str]]) -> TableDamage:
    """The data files ``dt_``'s version references that ``listing`` (one listing of the table's
    directory: paths relative to it; its argument: whether to list recursively) does not return.
    No data file is opened."""
    t0 = time.monotonic()
    adds = pa.table(dt_.get_add_actions(flatten=True))
    paths = adds["path"].to_pylist()
    present = listing(any("/" in p for p in paths))
    missing = [i for i, p in enumerate(paths) if p not in present and urllib.parse.unquote(p) not in present]
    lost_rows: int | None = None
    ranges: list[tuple[str | None, str | None]] = []
    if missing:
        if "num_records" in adds.column_names:
            counts = [adds["num_records"][i].as_py() for i in missing]
            lost_rows = None if any(c is None for c in counts) else int(sum(counts))
        if "min.file_id" in adds.column_names and "max.file_id" in adds.column_names:
            ranges = [(adds["min.file_id"][i].as_py(), adds["max.file_id"][i].as_py()) for i in missing]
    return TableDamage(table=name, version=dt_.version(), referenced=len(paths),
                       missing=tuple(sorted(paths[i] for i in missing)), lost_rows=lost_rows,
                       id_ranges=tuple(ranges), seconds=time.monotonic() - t0)
