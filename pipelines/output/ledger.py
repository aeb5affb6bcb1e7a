"""The incremental ledger: what the ``files`` table says is already done, and which listed files
a run still has to process.

A commit is complete when ``files`` has it (:mod:`.commit` writes ``segments`` first, ``files``
last). The ledger is a column scan of ``files`` (uri, version, config_hash, status, error_type):
its cost depends on the number of files in the table, not on how many commits or runs wrote them.
What a run does with each listed file is decided from it once, by ``pipelines.planning`` (the
skip rule: a file is skipped while its (uri, version, config_hash) is committed, unless its error
is one the next run tries again: ``schemas.vocabulary``, transient by nature).
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import pyarrow as pa

from pipelines.output.store import OutputStore
from schemas import vocabulary

# The error types the next run tries again (schemas.vocabulary: transient by nature); every other
# committed file is skipped while its (uri, version, config_hash) is unchanged.
RETRYABLE_ERRORS = vocabulary.RETRYABLE_ERRORS
# The files columns the incremental ledger reads.
LEDGER_COLUMNS = ["file_id", "uri", "version", "etag", "size_bytes", "mtime", "config_hash", "status",
                  "error_type", "run_id"]


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


def committed_ledger(store: OutputStore) -> dict[str, CommittedFile]:
    """uri -> what ``files`` holds for it: a scan of a few columns of one table."""
    t = store.read_table("files", columns=LEDGER_COLUMNS)
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


def with_versions(files: pa.Table) -> pa.Table:
    """``files`` (with its listing columns) whose null ``version`` cells (rows written before the
    column existed) are filled by the listing's own rule."""
    if files.num_rows == 0 or not files["version"].null_count:
        return files
    versions = [v if v is not None else _version_of(e, s, m) for v, e, s, m in zip(
        *(files[c].to_pylist() for c in ("version", "etag", "size_bytes", "mtime")))]
    return files.set_column(files.schema.get_field_index("version"), "version", pa.array(versions, pa.string()))


def committed_seq(store: OutputStore, run_id: str) -> int:
    """The last complete commit seq of ``run_id`` (0: none): ``files``' application transaction
    version for the run id."""
    dt_ = store.table("files")
    return (dt_.transaction_version(run_id) or 0) if dt_ is not None else 0


def _version_of(etag: str | None, size: int | None, mtime: dt.datetime | None) -> str:
    """FileRef.version from the listing columns (for rows written without ``version``)."""
    if etag:
        return etag
    if size is None and mtime is None:
        return "unknown"
    return f"{size}-{mtime.isoformat() if mtime else None}"
