"""Batch adapters for the Ray Data graph, usable without Ray.

``DecodeStage`` turns a batch of FileRef rows into window rows plus one file row per file,
yielding typed output batches as windows fill so a long file never sits in memory whole.
``ResultAssembler`` is the driver's side: it gathers result rows per file and says when a file is
complete (its FileInfo is in and every (window, task) result has arrived). Batches between the
stages are ``pyarrow.Table``s of the schemas in :mod:`schemas.stage`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import faults
from pipelines.batching import AttemptLedger
from pipelines.decode import DecodeOptions, FileInfo, Window, decode_file
from pipelines.sources import FileRef
from pipelines.vad import PauseCutter, SpeechDetector
from schemas import STATUS_ERROR
from schemas import stage as st
from schemas.vocabulary import INFERENCE_ERROR, WORKER_CRASH

log = logging.getLogger(__name__)


_INFO_FIELDS = tuple(f.name for f in st.FILE_INFO)


def refs_table(refs: Sequence[FileRef]) -> pa.Table:
    """FileRefs -> a ``FILE_REFS`` table (the decode stage's input)."""
    return st.build([{"uri": r.uri, "file_id": r.file_id, "size_bytes": r.size_bytes, "etag": r.etag,
                      "mtime": r.mtime} for r in refs], st.FILE_REFS, "refs")


def ref_from_row(row: Mapping[str, Any]) -> FileRef:
    """One row of a ``FILE_REFS`` table (``Table.to_pylist()``) -> FileRef."""
    return FileRef(uri=row["uri"], size_bytes=row["size_bytes"], etag=row["etag"] or None,
                   mtime=row["mtime"], file_id=row["file_id"])


def info_to_struct(info: FileInfo) -> dict[str, Any]:
    """FileInfo -> a ``FILE_INFO`` struct value; a FileInfo field the struct lacks is a bug."""
    d = dataclasses.asdict(info)
    if set(d) != set(_INFO_FIELDS):
        raise st.StageSchemaError(f"FileInfo fields {sorted(d)} differ from schemas.stage.FILE_INFO "
                                  f"{sorted(_INFO_FIELDS)}")
    return d


def info_from_struct(value: Mapping[str, Any]) -> FileInfo:
    return FileInfo(**{k: value[k] for k in _INFO_FIELDS})


def error_info(ref: FileRef, error_type: str, message: str) -> FileInfo:
    """The FileInfo of a file that produced no audio at all (an error row)."""
    return FileInfo(file_id=ref.file_id, uri=ref.uri, status=STATUS_ERROR, error_type=error_type,
                    error_message=message, container=None, codec=None, sample_rate_in=None,
                    channels_in=None, duration_s=None, n_segments=0)


def crash_info(ref: FileRef, attempts: int) -> FileInfo:
    return error_info(ref, WORKER_CRASH, f"the decode worker process died on each of {attempts} attempts "
                                         f"to decode this file (a crash in the decoder, or out of memory)")


class DecodeStage:
    """Callable: ``FILE_REFS`` batch -> iterator of ``WINDOWS`` batches (decode -> infer).

    Output batches hold ``windows_per_batch`` rows (the last one of a call may hold fewer), so a
    file of any length streams through in small blocks. With a ``ledger``, a file whose decoding
    killed the worker ``max_attempts`` times is not tried again: it becomes an error row
    (``worker_crash``) and the run goes on.

    ``speech_gate``: run silero-vad (``pipelines.vad``) on each window as it is cut and put its
    ``speech_ratio`` on the row (a digitally silent window is 0 without running the model); off,
    the column is null. ``cut_at_pauses``: windows end at the longest speech pause of their last
    seconds (``PauseCutter``). The VAD runs here, on the decode actors' CPUs, because it costs
    about as much CPU as decoding (one onnxruntime call per window, ~900x real time per
    CPU-second) and CPUs scale out, where on the inference actor it would take device time.
    """

    def __init__(self, options: DecodeOptions | None = None, storage_options: Mapping[str, Any] | None = None,
                 *, windows_per_batch: int = 4, ledger: AttemptLedger | None = None, max_attempts: int = 2,
                 speech_gate: bool = False, cut_at_pauses: bool = False):
        if windows_per_batch < 1:
            raise ValueError(f"windows_per_batch must be >= 1, got {windows_per_batch}")
        self.options = options or DecodeOptions()
        self.storage_options = dict(storage_options or {})
        self.windows_per_batch = windows_per_batch
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.speech_gate = speech_gate
        self.detector = SpeechDetector() if speech_gate or cut_at_pauses else None
        self.cutter = PauseCutter(self.detector) if cut_at_pauses and self.detector is not None else None

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        batch = st.check(batch, st.FILE_REFS, "decode input")
        rows: list[dict[str, Any]] = []
        for ref in map(ref_from_row, batch.to_pylist()):
            for row in self.file_rows(ref):
                rows.append(row)
                if len(rows) >= self.windows_per_batch:
                    yield st.build(rows, st.WINDOWS, "decode")
                    rows = []
        if rows:
            yield st.build(rows, st.WINDOWS, "decode")

    def file_rows(self, ref: FileRef) -> Iterator[dict[str, Any]]:
        """The ``WINDOWS`` rows of one file: its windows, the last one carrying the FileInfo (a
        file without windows gets a file row), so file rows take no inference batch slots."""
        key = f"decode:{ref.file_id}"
        attempt = self.ledger.begin(key) if self.ledger is not None else 1
        if attempt > self.max_attempts:
            log.error("giving up on %s: its decode killed the worker %d times", ref.uri, attempt - 1)
            yield self.file_row(crash_info(ref, attempt - 1))
            return
        faults.maybe_crash("decode", ref.uri)
        held: dict[str, Any] | None = None
        for item in decode_file(ref, self.options, self.storage_options, choose_cut=self.cutter):
            if isinstance(item, Window):
                if held is not None:
                    yield held
                held = self.window_row(item, *self.speech(item))
            elif held is not None:
                held["file_info"] = info_to_struct(item)
                yield held
                held = None
            else:
                yield self.file_row(item)
        if self.ledger is not None:
            self.ledger.end(key)

    def speech(self, w: Window) -> tuple[float | None, list[dict[str, float]] | None]:
        """The window's share of speech and its speech segments (None, None: the gate is off)."""
        if not self.speech_gate or self.detector is None:
            return None, None
        if w.is_silent:
            return 0.0, []
        ratio, spans = self.detector.measure(w.samples)
        return ratio, [{"start_s": a, "end_s": b} for a, b in spans]

    @staticmethod
    def window_row(w: Window, speech_ratio: float | None = None,
                   speech_spans: list[dict[str, float]] | None = None) -> dict[str, Any]:
        return {
            "kind": st.KIND_WINDOW, "file_id": w.file_id, "uri": w.uri, "segment_index": w.segment_index,
            "start_s": w.start_s, "end_s": w.end_s,
            "samples": np.ascontiguousarray(w.samples, dtype="<f4").tobytes(),
            "is_silent": bool(w.is_silent), "speech_ratio": speech_ratio, "speech_spans": speech_spans,
        }

    @staticmethod
    def file_row(info: FileInfo) -> dict[str, Any]:
        return {"kind": st.KIND_FILE, "file_id": info.file_id, "uri": info.uri, "file_info": info_to_struct(info)}


@dataclasses.dataclass
class _Pending:
    info: FileInfo | None = None
    segments: dict[tuple[int, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    failed_windows: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CompleteFile:
    """A file whose results are all in: what the committer writes."""

    info: FileInfo
    segments: list[dict[str, Any]]                # sorted by (segment_index, task order)
    failed_windows: dict[int, tuple[str, str]]    # segment_index -> (error_type, error) of inference
    reused_from: str | None = None                # results copied from this uri (same content), not processed


@dataclasses.dataclass(frozen=True)
class FailedFile:
    """A file whose result rows the driver could not use: it gets a ``pipeline_error`` row."""

    file_id: str
    reason: str


# The columns of a RESULTS row that make a segments row (v5: with the timed-text columns).
SEGMENT_FIELDS = ("file_id", "uri", "segment_index", "start_s", "end_s", "task", "prompt", "text",
                  "lora_scale", "num_beams", "n_output_tokens", "finish_reason", "speech_ratio",
                  *st.TIMED_TEXT_FIELDS)


class ResultAssembler:
    """Buffers result rows per file until the file is complete (driver side).

    Rows are keyed by (segment_index, task), so a row delivered twice (a retried Ray task whose
    first attempt had already streamed part of its output) is stored once. A row that cannot be
    used (an unknown kind, a segment without its index or task, ...) fails its file: the file is
    reported once in :meth:`add`'s second result and its later rows are ignored. Nothing here
    raises for the content of a batch.
    """

    def __init__(self, task_names: Sequence[str]):
        self.task_names = list(task_names)
        self._order = {t: i for i, t in enumerate(self.task_names)}
        self._pending: dict[str, _Pending] = {}
        self._failed: set[str] = set()
        self._completed: set[str] = set()   # rows arriving after completion are retried duplicates
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def add(self, batch: pa.Table) -> tuple[list[CompleteFile], list[FailedFile]]:
        """Take one ``RESULTS`` batch; return the files it completed and the files it failed."""
        failed: list[FailedFile] = []
        try:
            batch = st.check(batch, st.RESULTS, "results")
        except st.StageSchemaError as e:
            ids = _file_ids(batch)
            log.error("a result batch of %d rows (files %s) does not match the schema: %s",
                      batch.num_rows, ids[:5], e)
            for fid in ids:
                failed.extend(self._fail(fid, f"a result batch did not match the stage schema: {e}"))
            return [], failed
        touched: set[str] = set()
        for row in batch.to_pylist():
            fid = row["file_id"]
            if fid in self._failed:
                continue
            if fid in self._completed:
                self.duplicates += 1
                continue
            try:
                self._add_row(row)
                touched.add(fid)
            except Exception as e:  # noqa: BLE001 - a bad row fails its file, never the run
                log.error("unusable result row for %s (%s): %s", row.get("uri"), row.get("kind"), e)
                failed.extend(self._fail(fid, f"unusable result row ({row.get('kind')}): {type(e).__name__}: {e}"))
        done = [d for fid in touched if (d := self._complete(fid)) is not None]
        return done, failed

    def _add_row(self, row: dict[str, Any]) -> None:
        kind = row["kind"]
        p = self._pending.setdefault(row["file_id"], _Pending())
        if row["file_info"] is not None:  # a file row, or the row of its last window
            p.info = info_from_struct(row["file_info"])
        if kind == st.KIND_SEGMENT:
            if row["segment_index"] is None or row["task"] not in self._order:
                raise ValueError(f"segment row without a valid segment_index/task: "
                                 f"{row['segment_index']!r}/{row['task']!r}")
            key = (row["segment_index"], row["task"])
            if key in p.segments:
                self.duplicates += 1
            p.segments[key] = {c: row[c] for c in SEGMENT_FIELDS}
        elif kind == st.KIND_WINDOW_ERROR:
            if row["segment_index"] is None:
                raise ValueError("window_error row without a segment_index")
            p.failed_windows[row["segment_index"]] = (row["error_type"] or INFERENCE_ERROR, row["error"] or "")
        elif kind != st.KIND_FILE:
            raise ValueError(f"unknown result kind {kind!r}")

    def _complete(self, fid: str) -> CompleteFile | None:
        p = self._pending.get(fid)
        if p is None or p.info is None:
            return None
        covered = {k for k in p.segments if k[0] not in p.failed_windows}
        expected = len(self.task_names) * p.info.n_segments
        if len(covered) + len(self.task_names) * len(p.failed_windows) < expected:
            return None
        segs = sorted((v for k, v in p.segments.items() if k in covered),
                      key=lambda r: (r["segment_index"], self._order[r["task"]]))
        del self._pending[fid]
        self._completed.add(fid)
        return CompleteFile(p.info, segs, dict(p.failed_windows))

    def _fail(self, fid: str, reason: str) -> list[FailedFile]:
        if fid in self._failed or fid in self._completed:
            return []
        self._failed.add(fid)
        self._pending.pop(fid, None)
        return [FailedFile(fid, reason[:2000])]


def _file_ids(batch: pa.Table) -> list[str]:
    """The distinct string file ids of a batch that may not match its schema."""
    if "file_id" not in batch.column_names:
        return []
    seen: dict[str, None] = {}
    for v in batch.column("file_id").to_pylist():
        if isinstance(v, str):
            seen.setdefault(v)
    return list(seen)
