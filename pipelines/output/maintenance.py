"""Housekeeping of an output's tables: compaction, checkpoints and vacuum (:func:`maintain`, and
the end of every run that committed something), one process at a time under the compaction lease.

One process at a time compacts an OUT. delta-rs 1.6 lets two concurrent compactions of the same
data files both commit (its conflict checker passes removes marked dataChange=false, which is
what a compaction's are), and each adds its own rewritten copy of the rows: every row of those
files twice. Two runs finishing together did exactly that. The lease is a row in a small Delta
table of its own (``OUT/_maintenance``), taken with an overwrite on a predicate, which Delta's
conflict checker does serialize: of two processes taking it at once, one commit fails. A crashed
holder's lease ends after ``LEASE_S``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from pipelines.output.store import TABLE_NAMES, OutputStore, utcnow
from pipelines.output.tables import WRITER_PROPERTIES, TableDamaged, retry_conflicts, scan, sql_str

log = logging.getLogger(__name__)

# Compaction bin-packs data files smaller than this into files of about this size (Delta's own
# default is 100 MiB; object stores read 64-256 MiB files at full speed).
TARGET_FILE_SIZE = 128 * 2**20
# The lease (see the module docstring): a row of this table, good until ``until``.
LEASE_TABLE = "_maintenance"
LEASE_NAME = "compaction"
LEASE_S = 3600.0
LEASE_SCHEMA = pa.schema([pa.field("name", pa.string(), nullable=False), pa.field("holder", pa.string()),
                          pa.field("until", pa.timestamp("us", tz="UTC"))])


class MaintenanceBusy(RuntimeError):
    """Another process holds this output's compaction lease."""


def lease_holder(what: str) -> str:
    """Who takes a lease: what, on which host and process."""
    import socket

    return f"{what} on {socket.gethostname()} (pid {os.getpid()})"


def maintain(store: OutputStore, *, vacuum_hours: float | None = None,
             target_size: int = TARGET_FILE_SIZE) -> dict[str, Any]:
    """Compact both tables (small data files into files of ``target_size``), write a
    checkpoint, and with ``vacuum_hours`` delete data files no version newer than that needs
    (time travel before it ends there) and untracked files older than that. A table that lost
    data files raises ``TableDamaged`` (``maintain --repair`` repairs it first)."""
    tables = {name: dt_ for name in TABLE_NAMES if (dt_ := store.table(name)) is not None}
    if not tables:
        return {}
    # a table that lost data files cannot be compacted (its rows cannot be read): say so, and how
    # to repair it (pipelines.output.health), before taking the lease
    damages = [d for name, dt_ in tables.items() if (d := store.check_table(name, dt_)) is not None and d.damaged]
    if damages:
        raise TableDamaged(store.out, damages, store.repair_command())
    report, busy = compact_under_lease(store, tables, lease_holder("maintain"), vacuum_hours=vacuum_hours,
                                       target_size=target_size)
    if busy is not None and not report:
        raise MaintenanceBusy(f"{busy} is compacting {store.out}; try again when it is done (a lease left "
                              f"by a process that died ends by itself)")
    if busy is not None:
        left = [name for name in tables if name not in report]
        raise MaintenanceBusy(f"the lease ran out during the compaction of {list(report)[-1]} and {busy} took "
                              f"it; {', '.join(left)} was not compacted")
    return report


def compact_under_lease(store: OutputStore, tables: Mapping[str, DeltaTable], holder: str, *,
                        vacuum_hours: float | None = None, target_size: int = TARGET_FILE_SIZE,
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
                busy = claim_maintenance(store, holder)
            except Exception as e:  # noqa: BLE001 - lenient: without the lease, no compaction
                if not lenient:
                    raise
                busy = f"nobody known (the lease could not be read: {type(e).__name__}: {e})"
            if busy is not None:
                return report, busy
            dt_.update_incremental()
            report[name] = maintain_table(dt_, name, vacuum_hours=vacuum_hours, target_size=target_size)
        return report, None
    finally:
        release_maintenance(store, holder)     # only if held by ``holder``


def claim_maintenance(store: OutputStore, holder: str, *, lease_s: float = LEASE_S) -> str | None:
    """Take the compaction lease of ``store`` for ``holder`` (for ``lease_s`` seconds): None
    when taken, else who holds it and until when."""
    dt_ = _lease_table(store)
    held = _lease(dt_)
    now = utcnow()
    if held is not None and held["holder"] not in (None, holder) and held["until"] > now:
        return f"{held['holder']} (lease until {held['until'].isoformat(timespec='seconds')})"
    row = pa.Table.from_pylist([{"name": LEASE_NAME, "holder": holder,
                                 "until": now + dt.timedelta(seconds=lease_s)}], schema=LEASE_SCHEMA)
    try:
        write_deltalake(dt_, row, mode="overwrite", predicate=f"name = {sql_str(LEASE_NAME)}")
    except CommitFailedError:      # another process took it at the same moment
        dt_.update_incremental()
        held = _lease(dt_)
        return f"{held['holder'] if held else 'another process'} (taken at the same moment)"
    return None


def release_maintenance(store: OutputStore, holder: str) -> None:
    """End ``holder``'s lease (best effort: an unreleased lease ends by itself)."""
    try:
        dt_ = _lease_table(store)
        held = _lease(dt_)
        if held is None or held["holder"] != holder:
            return
        row = pa.Table.from_pylist([{"name": LEASE_NAME, "holder": None, "until": utcnow()}],
                                   schema=LEASE_SCHEMA)
        write_deltalake(dt_, row, mode="overwrite", predicate=f"name = {sql_str(LEASE_NAME)}")
        if dt_.version() % 50 == 0:    # two versions a run: keep its log and data files few
            dt_.create_checkpoint()
            dt_.cleanup_metadata()
            dt_.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
    except Exception as e:  # noqa: BLE001 - the lease expires anyway
        log.warning("could not release the compaction lease of %s (%s); it ends by itself", store.out, e)


def maintain_table(dt_: DeltaTable, name: str, *, vacuum_hours: float | None, target_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    props = CommitProperties(custom_metadata={"salmonn_pipeline.operation": "maintain"})
    try:
        metrics = retry_conflicts(f"compact {name}", lambda: dt_.optimize.compact(
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


def _lease_table(store: OutputStore) -> DeltaTable:
    uri, options = store.table_uri(LEASE_TABLE), dict(store.delta_options)
    try:
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        try:
            return DeltaTable.create(uri, LEASE_SCHEMA, mode="ignore", name=LEASE_TABLE,
                                     description="salmonn-pipeline: who is compacting this output",
                                     storage_options=options, raise_if_key_not_exists=False)
        except CommitFailedError:  # created by another process at the same moment
            return DeltaTable(uri, storage_options=options)


def _lease(dt_: DeltaTable) -> dict[str, Any] | None:
    rows = [r for r in scan(dt_, None).to_pylist() if r["name"] == LEASE_NAME]
    return rows[0] if rows else None
