"""Batch adapters for the Ray Data graph, usable without Ray.

``DecodeStage`` turns a batch of FileRef rows into window rows plus one file row per file,
yielding output batches as windows fill so a long file never sits in memory whole.
``ResultAssembler`` is the driver's side: it gathers result rows per file and says when a file is
complete (its FileInfo is in and every (window, task) result has arrived).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines import faults
from pipelines.decode import DecodeOptions, FileInfo, Window, decode_file
from pipelines.batching import WORKER_CRASH, AttemptLedger, rows_to_columns
from pipelines.sources import FileRef
from schemas import STATUS_ERROR
from schemas import stage as cols

log = logging.getLogger(__name__)


def ref_to_row(ref: FileRef) -> dict[str, Any]:
    return {
        "uri": ref.uri,
        "size_bytes": ref.size_bytes,
        "etag": ref.etag,
        "mtime": ref.mtime.isoformat() if ref.mtime else None,
        "file_id": ref.file_id,
    }


def ref_from_row(row: Mapping[str, Any]) -> FileRef:
    mtime = row.get("mtime")
    size = row.get("size_bytes")
    return FileRef(
        uri=str(row["uri"]),
        size_bytes=None if size is None or (isinstance(size, float) and np.isnan(size)) else int(size),
        etag=row.get("etag") or None,
        mtime=dt.datetime.fromisoformat(mtime) if mtime else None,
        file_id=str(row["file_id"]),
    )


def info_to_json(info: FileInfo) -> str:
    return json.dumps(dataclasses.asdict(info))


def info_from_json(text: str) -> FileInfo:
    return FileInfo(**json.loads(text))


def error_info(ref: FileRef, error_type: str, message: str) -> FileInfo:
    """The FileInfo of a file that produced no audio at all (an error row)."""
    return FileInfo(file_id=ref.file_id, uri=ref.uri, status=STATUS_ERROR, error_type=error_type,
                    error_message=message, container=None, codec=None, sample_rate_in=None,
                    channels_in=None, duration_s=None, n_segments=0)


def crash_info(ref: FileRef, attempts: int) -> FileInfo:
    return error_info(ref, WORKER_CRASH, f"the decode worker process died on each of {attempts} attempts "
                                         f"to decode this file (a crash in the decoder, or out of memory)")


class DecodeStage:
    """Callable: batch of FileRef rows -> iterator of window/file batches (decode -> infer).

    With a ``ledger``, a file whose decoding killed the worker ``max_attempts`` times is not tried
    again: it becomes an error row (``worker_crash``) and the run goes on.
    """

    def __init__(self, options: DecodeOptions | None = None, storage_options: Mapping[str, Any] | None = None,
                 *, windows_per_batch: int = 4, ledger: AttemptLedger | None = None, max_attempts: int = 2):
        self.options = options or DecodeOptions()
        self.storage_options = dict(storage_options or {})
        self.windows_per_batch = windows_per_batch
        self.ledger = ledger
        self.max_attempts = max_attempts

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        rows: list[dict[str, Any]] = []

        def emit(row: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
            nonlocal rows
            rows.append(row)
            if len(rows) >= self.windows_per_batch:
                yield rows_to_columns(rows, cols.WINDOW_COLUMNS)
                rows = []

        for i in range(len(batch["uri"])):
            ref = ref_from_row({k: batch[k][i] for k in batch})
            key = f"decode:{ref.file_id}"
            attempt = self.ledger.begin(key) if self.ledger is not None else 1
            if attempt > self.max_attempts:
                log.error("giving up on %s: its decode killed the worker %d times", ref.uri, attempt - 1)
                yield from emit(self.file_row(crash_info(ref, attempt - 1)))
                continue
            faults.maybe_crash("decode", ref.uri)
            # The file's FileInfo rides on its last window row, so file rows do not take
            # inference batch slots; a file without windows gets a file row of its own.
            held: dict[str, Any] | None = None
            for item in decode_file(ref, self.options, self.storage_options):
                if isinstance(item, Window):
                    if held is not None:
                        yield from emit(held)
                    held = self.window_row(item)
                elif held is not None:
                    held["file_info"] = info_to_json(item)
                    yield from emit(held)
                    held = None
                else:
                    yield from emit(self.file_row(item))
            if self.ledger is not None:
                self.ledger.end(key)
        if rows:
            yield rows_to_columns(rows, cols.WINDOW_COLUMNS)

    @staticmethod
    def window_row(w: Window) -> dict[str, Any]:
        return {
            "kind": cols.KIND_WINDOW, "file_id": w.file_id, "uri": w.uri, "segment_index": w.segment_index,
            "start_s": w.start_s, "end_s": w.end_s,
            "samples": np.ascontiguousarray(w.samples, dtype="<f4").tobytes(),
            "is_silent": bool(w.is_silent), "file_info": None,
        }

    @staticmethod
    def file_row(info: FileInfo) -> dict[str, Any]:
        return {"kind": cols.KIND_FILE, "file_id": info.file_id, "uri": info.uri, "segment_index": None,
                "start_s": None, "end_s": None, "samples": None, "is_silent": None,
                "file_info": info_to_json(info)}


@dataclasses.dataclass
class _Pending:
    info: FileInfo | None = None
    segments: dict[tuple[int, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    failed_windows: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CompleteFile:
    """A file whose results are all in: what the committer writes."""

    info: FileInfo
    segments: list[dict[str, Any]]   # sorted by (segment_index, task order)
    failed_windows: dict[int, str]   # segment_index -> error (inference failures)


class ResultAssembler:
    """Buffers result rows per file until the file is complete (driver side).

    Rows are keyed by (segment_index, task), so a row delivered twice (a retried Ray task whose
    first attempt had already streamed part of its output) is stored once.
    """

    def __init__(self, task_names: Sequence[str]):
        self.task_names = list(task_names)
        self._order = {t: i for i, t in enumerate(self.task_names)}
        self._pending: dict[str, _Pending] = {}
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def add(self, batch: Mapping[str, Sequence[Any]]) -> list[CompleteFile]:
        """Take one result batch; return the files it completed."""
        touched = set()
        for i in range(len(batch["kind"])):
            kind = batch["kind"][i]
            fid = batch["file_id"][i]
            p = self._pending.setdefault(fid, _Pending())
            touched.add(fid)
            if batch["file_info"][i] is not None:  # a file row, or the row of its last window
                p.info = info_from_json(batch["file_info"][i])
            if kind == cols.KIND_SEGMENT:
                key = (int(batch["segment_index"][i]), str(batch["task"][i]))
                if key in p.segments:
                    self.duplicates += 1
                p.segments[key] = {c: batch[c][i] for c in cols.RESULT_COLUMNS
                                   if c not in ("kind", "file_info", "error")}
            elif kind == cols.KIND_WINDOW_ERROR:
                p.failed_windows[int(batch["segment_index"][i])] = str(batch["error"][i])
            elif kind != cols.KIND_FILE:
                raise ValueError(f"unknown result kind {kind!r}")
        done = []
        for fid in touched:
            p = self._pending.get(fid)
            if p is None or p.info is None:
                continue
            covered = {k for k in p.segments if k[0] not in p.failed_windows}
            expected = len(self.task_names) * p.info.n_segments
            if len(covered) + len(self.task_names) * len(p.failed_windows) >= expected:
                segs = sorted((v for k, v in p.segments.items() if k in covered),
                              key=lambda r: (r["segment_index"], self._order.get(r["task"], 0)))
                done.append(CompleteFile(p.info, segs, dict(p.failed_windows)))
                del self._pending[fid]
        return done
