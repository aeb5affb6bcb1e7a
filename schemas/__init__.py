"""Parquet schemas of the output tables: the only place their columns are defined.

Both tables carry ``salmonn_pipeline.schema_version`` in their schema metadata. Every part the
pipeline writes is checked against these schemas (:func:`conform`) before it is written.
"""

from __future__ import annotations

import pyarrow as pa

# The values of files.status, segments.finish_reason and segments.label (and files.error_type,
# run states) are defined in schemas.vocabulary; re-exported here for the table checks below.
from schemas.vocabulary import EMOTION_LABELS as EMOTION_LABELS
from schemas.vocabulary import FINISH_LENGTH as FINISH_LENGTH
from schemas.vocabulary import FINISH_LOW_LOGPROB as FINISH_LOW_LOGPROB
from schemas.vocabulary import FINISH_NO_SPEECH_PROB as FINISH_NO_SPEECH_PROB
from schemas.vocabulary import FINISH_REASONS as FINISH_REASONS
from schemas.vocabulary import FINISH_REPETITIVE as FINISH_REPETITIVE
from schemas.vocabulary import FINISH_STOP as FINISH_STOP
from schemas.vocabulary import STATUS_ERROR as STATUS_ERROR
from schemas.vocabulary import STATUS_OK as STATUS_OK
from schemas.vocabulary import STATUS_PARTIAL as STATUS_PARTIAL
from schemas.vocabulary import STATUSES as STATUSES

# Version history:
#   "1"  first release.
#   "2"  segments gain ``label``: the emotion task's answer mapped to EMOTION_LABELS (null for
#        other tasks). Version-1 parts still read: conform() fills the missing column with nulls.
#   "3"  files gain ``version``: the input's version as listed (FileRef.version: ETag, or size +
#        mtime), so the incremental ledger is a column scan of the files table.
#        The speech gate: segments gain ``speech_ratio`` (the window's share of speech, silero-vad),
#        files gain ``speech_s`` (seconds of speech in the file); both null when the gate is off.
#        finish_reason gains ``no_speech`` and ``silence`` (rows the gate answered without the model).
#        files gain ``audio_stream``: which audio stream of the container was decoded (FFmpeg's
#        default/best one); null when none was.
#   "4"  the tables mirror the archive (files gone from a run's input scope are deleted; moved and
#        copied files reuse the results of the same content): files gain ``content_hash`` (the
#        input's content key: "s3-etag:<ETag>", "gcs-md5:<base64>" or "sha256:<hex>"; null where
#        the store has no content hash) and ``reused_from`` (the uri whose results were copied
#        into this row without decoding or generating; null for files processed by this row's
#        run). Rows of earlier versions read with both null.
#   "5"  timed text (Whisper's decoder on SALMONN's Whisper encoder output): segments gain
#        ``language`` (Whisper's language code for the window, e.g. "en"; the same on every task
#        row of a window), ``language_prob`` (its probability), ``words`` (the word timings of the
#        row's text: a list of WORD structs, times absolute in the file in seconds; null = not
#        timed, an empty list = timed, no word), and for the Whisper transcript task (task
#        ``whisper``) faster-whisper's quality measures ``avg_logprob``, ``compression_ratio`` and
#        ``no_speech_prob`` (null on other rows). finish_reason gains ``low_logprob``,
#        ``repetitive`` and ``no_speech_prob`` (a Whisper answer that failed one of
#        faster-whisper's checks; see schemas.vocabulary). The words live in ``segments`` as a
#        nested list, so one row still holds one (window, task) result and the commit protocol
#        is unchanged; ``unnest(words)`` lists them (README, Queries). Tables of earlier versions
#        gain the columns on the next write (pipelines.output.tables.evolve, or
#        ``salmonn-pipeline migrate OUT`` at once); their rows read with the columns null.
SCHEMA_VERSION = "5"
METADATA_KEY = b"salmonn_pipeline.schema_version"

_TS = pa.timestamp("us", tz="UTC")

# v5: one timed word of ``segments.words``: its text as the aligner gave it (Whisper's words keep
# their leading space: " Hello", and punctuation is merged into the word next to it), its start
# and end in seconds of media time (absolute in the file, like start_s/end_s), and the aligner's
# confidence (Whisper: the mean probability of the word's tokens; null where there is none).
WORD = pa.struct([
    pa.field("word", pa.string()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("probability", pa.float32()),
])
WORDS = pa.list_(WORD)


def _with_version(fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields).with_metadata({METADATA_KEY: SCHEMA_VERSION.encode()})


# One row per input file per run.
FILES = _with_version([
    pa.field("file_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("mtime", _TS),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("container", pa.string()),
    pa.field("codec", pa.string()),
    pa.field("sample_rate_in", pa.int32()),
    pa.field("channels_in", pa.int32()),
    pa.field("duration_s", pa.float64()),
    pa.field("n_segments", pa.int32()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_id", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("pipeline_version", pa.string()),
    pa.field("processed_at", _TS),
    pa.field("version", pa.string()),          # v3: the input's version (FileRef.version) when processed
    pa.field("speech_s", pa.float64()),        # v3: seconds of speech (VAD) in the file; null: gate off
    pa.field("audio_stream", pa.int32()),      # v3: index of the decoded audio stream in its container
    pa.field("content_hash", pa.string()),     # v4: content key of the input (pipelines.sources.content_key)
    pa.field("reused_from", pa.string()),      # v4: uri whose results were copied (same content); null: processed
])

# One row per (file, segment, task).
SEGMENTS = _with_version([
    pa.field("file_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("segment_index", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("text", pa.string()),
    pa.field("lora_scale", pa.float32()),
    pa.field("num_beams", pa.int32()),
    pa.field("n_output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_id", pa.string()),
    pa.field("label", pa.string()),            # v2: emotion label (EMOTION_LABELS) or null
    pa.field("speech_ratio", pa.float32()),    # v3: share of the window inside speech (VAD); null: gate off
    pa.field("language", pa.string()),         # v5: Whisper's language code of the window ("en"); null: not identified
    pa.field("language_prob", pa.float32()),   # v5: the probability Whisper gave that language
    pa.field("words", WORDS),                  # v5: word timings of the text (absolute s); null: not timed
    pa.field("avg_logprob", pa.float32()),     # v5: whisper task: mean log-probability of its tokens
    pa.field("compression_ratio", pa.float32()),   # v5: whisper task: gzip compression ratio of its text
    pa.field("no_speech_prob", pa.float32()),  # v5: whisper task: probability of <|nospeech|> at its start
])

TABLES: dict[str, pa.Schema] = {"files": FILES, "segments": SEGMENTS}


class SchemaError(ValueError):
    """A table does not match its declared schema."""


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, order, types and metadata.

    Missing nullable columns are filled with nulls; a missing non-nullable column, a null in a
    non-nullable column, an extra column or an uncastable type raises :class:`SchemaError`.
    """
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise SchemaError(f"unexpected columns {sorted(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaError(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {e}") from e
        elif field.nullable:
            col = pa.nulls(table.num_rows, type=field.type)
        else:
            raise SchemaError(f"missing required column {field.name!r}")
        if not field.nullable and col.null_count:
            raise SchemaError(f"column {field.name!r} has {col.null_count} nulls but is required")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def check_values(name: str, table: pa.Table) -> None:
    """Check the enumerated columns of a conformed table (status, finish_reason, label)."""
    import pyarrow.compute as pc

    if name == "files":
        bad = pc.invert(pc.is_in(table["status"], pa.array(STATUSES)))
        if pc.any(bad).as_py():
            raise SchemaError(f"files.status outside {STATUSES}")
    elif name == "segments":
        reasons = table["finish_reason"].drop_null()
        if len(reasons) and pc.any(pc.invert(pc.is_in(reasons, pa.array(FINISH_REASONS)))).as_py():
            raise SchemaError(f"segments.finish_reason outside {FINISH_REASONS}")
        labels = table["label"].drop_null()
        if len(labels) and pc.any(pc.invert(pc.is_in(labels, pa.array(EMOTION_LABELS)))).as_py():
            raise SchemaError(f"segments.label outside {EMOTION_LABELS}")


def schema_version(schema: pa.Schema) -> str | None:
    """The schema version recorded in a Parquet/Arrow schema's metadata, or None."""
    meta = schema.metadata or {}
    value = meta.get(METADATA_KEY)
    return value.decode() if value is not None else None
