"""Typed batches that cross Ray Data stage boundaries: the only place their columns are defined.

    driver --FILE_REFS--> decode (CPU actors) --WINDOWS--> SALMONN (GPU actors) --RESULTS--> driver

Each stage builds its output with :func:`build` (rows -> ``pyarrow.Table`` of exactly the schema)
and checks its input with :func:`check`. Ray Data then moves Arrow tables whose types never
depend on the values of one block: with untyped object arrays, a column that happens to be all
null in one block (``file_info`` rides only on a file's last window, so the blocks of a long file
have none) was inferred as float in some blocks and string in others, and the run died far from
the cause. A batch that does not match is a bug, reported at the boundary with the column's name
(:class:`StageSchemaError`).

Audio travels as raw little-endian float32 bytes: one window (<= 30 s at 16 kHz, <= 1.92 MB) is
one ``binary`` cell, read back without a copy (``np.frombuffer``).

These batches are internal (never written to Parquet); the output tables are in ``schemas``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from schemas import FILES, SEGMENTS

# ``kind`` column values
KIND_WINDOW = "window"              # decode -> infer: one audio window
KIND_FILE = "file"                  # decode -> infer -> driver: a file without windows (its FileInfo)
KIND_SEGMENT = "segment"            # infer -> driver: one (window, task) result
KIND_WINDOW_ERROR = "window_error"  # infer -> driver: a window that failed inference for good

_TS = pa.timestamp("us", tz="UTC")

# The decode stage's summary of one file (pipelines.decode.FileInfo, field for field): the files
# table's columns of the same names and types. It rides on the file's last window row, or on a
# file row of its own when the file has no window.
_FILE_INFO_FIELDS = ("file_id", "uri", "status", "error_type", "error_message", "container", "codec",
                     "sample_rate_in", "channels_in", "duration_s", "n_segments", "audio_stream")
_FILE_INFO_REQUIRED = frozenset({"file_id", "uri", "status", "n_segments"})
FILE_INFO = pa.struct([FILES.field(n).remove_metadata().with_nullable(n not in _FILE_INFO_REQUIRED)
                       for n in _FILE_INFO_FIELDS])

# Where a row sits in its file: the first columns of both WINDOWS and RESULTS.
_POSITION = [
    pa.field("kind", pa.string(), nullable=False),
    pa.field("file_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("segment_index", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
]

# driver -> decode: one row per input file (pipelines.sources.FileRef)
FILE_REFS = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("file_id", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("mtime", _TS),
])

# decode -> infer: window rows (kind "window") and file rows (kind "file", no audio)
WINDOWS = pa.schema([
    *_POSITION,
    pa.field("samples", pa.binary()),          # (N,) float32 little-endian, 16 kHz mono
    pa.field("is_silent", pa.bool_()),         # digital silence: no sample above one 16-bit LSB
    pa.field("speech_ratio", pa.float32()),    # fraction of the window with speech; null: not measured
    # the VAD's speech segments, seconds from the window's start (where words may be: timed text);
    # null: not measured (speech gate off)
    pa.field("speech_spans", pa.list_(pa.struct([pa.field("start_s", pa.float32()),
                                                  pa.field("end_s", pa.float32())]))),
    pa.field("file_info", FILE_INFO),
])

# The segments columns of timed text (schema v5) a RESULTS row carries to the driver: the window's
# language, the row's word timings and the Whisper task's quality measures. All nullable: a
# producer that does not set them (a row without the key) sends nulls (:func:`build`).
TIMED_TEXT_FIELDS = ("language", "language_prob", "words", "avg_logprob", "compression_ratio", "no_speech_prob")

# infer -> driver: one row per (window, task), window errors, and file rows passed through
RESULTS = pa.schema([
    *_POSITION,
    pa.field("task", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("text", pa.string()),
    pa.field("lora_scale", pa.float32()),
    pa.field("num_beams", pa.int32()),
    pa.field("n_output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("speech_ratio", pa.float32()),
    # v5 timed text (the segments columns of the same names; null where a row has none)
    *(SEGMENTS.field(n).remove_metadata() for n in TIMED_TEXT_FIELDS),
    pa.field("error_type", pa.string()),       # window_error rows: e.g. worker_crash, inference_error
    pa.field("error", pa.string()),            # window_error rows: "ExceptionType: message"
    pa.field("file_info", FILE_INFO),
])

# Arrow types Ray Data may hand back in place of ours when it concatenates blocks: same values
# (also inside nested types: the words list of structs, see :func:`_regular`).
_EQUIVALENT = {
    pa.large_string(): pa.string(),
    pa.large_binary(): pa.binary(),
}


def _regular(t: pa.DataType) -> pa.DataType:
    """``t`` with every large_string/large_binary/large_list inside it made regular (and list
    items named ``item``, as pyarrow names them: Parquet readers say ``element``)."""
    if t in _EQUIVALENT:
        return _EQUIVALENT[t]
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(pa.field("item", _regular(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_regular(t.field(i).type)) for i in range(t.num_fields)])
    return t


class StageSchemaError(TypeError):
    """A stage batch does not match its schema: a bug in the stage that made it."""


def build(rows: Sequence[Mapping[str, Any]], schema: pa.Schema, stage: str) -> pa.Table:
    """Rows (dicts; missing keys are null) -> a table of exactly ``schema``.

    So a producer written before a nullable column was added (e.g. the v5 timed-text columns of
    ``RESULTS``) keeps working: its rows send nulls there.

    Raises :class:`StageSchemaError` naming the column for an unknown key, a value of the wrong
    type or a null in a required column.
    """
    names = set(schema.names)
    extra = {k for r in rows for k in r} - names
    if extra:
        raise StageSchemaError(f"{stage}: unknown column(s) {sorted(extra)}; the schema has {schema.names}")
    arrays = []
    for field in schema:
        try:
            arr = pa.array([r.get(field.name) for r in rows], type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise StageSchemaError(f"{stage}: column {field.name!r} ({field.type}): {e}") from e
        _check_nulls(field, arr, stage)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)


def check(table: pa.Table, schema: pa.Schema, stage: str) -> pa.Table:
    """Check a batch received from the previous stage; returns it with ``schema``'s column order.

    The columns, their types and required (non-null) values must match ``schema``; Ray's
    large_string/large_binary stand-ins are cast back. Raises :class:`StageSchemaError` naming
    the first column that does not match.
    """
    have = table.column_names
    missing = [n for n in schema.names if n not in have]
    extra = [n for n in have if n not in schema.names]
    if missing or extra:
        raise StageSchemaError(f"{stage}: batch columns do not match the schema: missing {missing}, "
                               f"unexpected {extra}")
    columns = []
    for field in schema:
        col = table.column(field.name)
        if col.type != field.type:
            if _regular(col.type) == field.type:
                col = col.cast(field.type)
            else:
                raise StageSchemaError(f"{stage}: column {field.name!r} is {col.type}, the schema says "
                                       f"{field.type}")
        _check_nulls(field, col, stage)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def _check_nulls(field: pa.Field, arr: pa.Array | pa.ChunkedArray, stage: str) -> None:
    if not field.nullable and arr.null_count:
        raise StageSchemaError(f"{stage}: column {field.name!r} is required but has {arr.null_count} null(s)")
