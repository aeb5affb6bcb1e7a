"""The values the pipeline writes into enumerated columns and run records, each defined once.

* :data:`ERRORS` -- every ``files.error_type``: which stage produces it, whether the next run tries
  the file again (``retryable``), and what it means. ``pipelines.decode``,
  ``pipelines.output.ledger`` and the README's error table derive from it (a test checks the
  README against it). A new error type is one more entry here.
* run states (``_runs/<run_id>/run.json`` ``status``): :data:`RUN_STATES`.
* file statuses, finish reasons and emotion labels: the values of ``files.status``,
  ``segments.finish_reason`` and ``segments.label``. (Task names are defined with their prompts in
  ``salmonn.prompts``, not here.)

Pure Python, no imports: every package (decode actors, the driver, operator tools) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- files.status ---------------------------------------------------------------------------
STATUS_OK = "ok"            # decoded to the end, every window inferred
STATUS_PARTIAL = "partial"  # windows were produced, then the stream broke (error_type says why)
STATUS_ERROR = "error"      # no result at all (error_type says why)
STATUSES = (STATUS_OK, STATUS_PARTIAL, STATUS_ERROR)

# --- segments.finish_reason -----------------------------------------------------------------
FINISH_STOP = "stop"      # the model emitted its end-of-sequence token
FINISH_LENGTH = "length"  # max_new_tokens reached
# The speech gate (--speech-gate on) writes these rows without generating: text null, 0 tokens.
FINISH_NO_SPEECH = "no_speech"  # a task that needs speech, on a window whose speech ratio is below the threshold
FINISH_SILENCE = "silence"      # any task, on a digitally silent window (no sample above one 16-bit LSB)
# v5: a Whisper answer (task ``whisper``) that fails one of faster-whisper's checks of a decoded
# window keeps its text, words and measures (avg_logprob, compression_ratio, no_speech_prob) but
# gets one of these instead of stop/length (checked in this order; thresholds are faster-whisper's
# defaults, which it uses to retry at a higher temperature or to drop the segment):
FINISH_NO_SPEECH_PROB = "no_speech_prob"  # no_speech_prob > 0.6 and avg_logprob < -1.0: most likely nobody
                                          # speaks (faster-whisper drops such a segment)
FINISH_REPETITIVE = "repetitive"          # compression_ratio > 2.4: the text repeats itself (a decoding loop)
FINISH_LOW_LOGPROB = "low_logprob"        # avg_logprob < -1.0: the decoder was unsure of its own text
FINISH_WHISPER_FAILED = (FINISH_NO_SPEECH_PROB, FINISH_REPETITIVE, FINISH_LOW_LOGPROB)
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_NO_SPEECH, FINISH_SILENCE, *FINISH_WHISPER_FAILED)
FINISH_SKIPPED = (FINISH_NO_SPEECH, FINISH_SILENCE)   # rows the gate answered without the model

# --- segments.label (emotion task rows; pipelines.labels maps the free-text answer onto them) --
EMOTION_LABELS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised", "other")

# --- run.json status ------------------------------------------------------------------------
RUN_RUNNING = "running"          # written when the run starts; a killed driver leaves it so
RUN_COMPLETED = "completed"      # every listed file was committed
RUN_FAILED = "failed"            # the run itself could not complete (an exception in the driver)
RUN_INTERRUPTED = "interrupted"  # stopped by the operator (Ctrl-C / SIGTERM); resumable
RUN_STATES = (RUN_RUNNING, RUN_COMPLETED, RUN_FAILED, RUN_INTERRUPTED)

# --- files.error_type -----------------------------------------------------------------------
DECODE = "decode"        # produced by the CPU decode stage (pipelines.decode)
INFERENCE = "inference"  # produced around the SALMONN predictor (pipelines.stages / driver)
DRIVER = "driver"        # produced by the driver itself (pipelines.run, pipelines.driver)

# The error types the code names (the others are chosen in decode from this table).
INFERENCE_ERROR = "inference_error"
WORKER_CRASH = "worker_crash"
PIPELINE_ERROR = "pipeline_error"
ROWS_LOST = "rows_lost"      # written by a repair (pipelines.output.health), never by processing


@dataclass(frozen=True)
class ErrorType:
    name: str
    stage: str          # DECODE | INFERENCE | DRIVER
    retryable: bool     # transient by nature: the next run tries the file again
    description: str    # one sentence, as the README shows it


_ERRORS = (
    ErrorType("not_found", DECODE, False,
              "the file or object does not exist (e.g. deleted after listing), or a dangling symlink"),
    ErrorType("permission_denied", DECODE, False, "the store refused to open or read it"),
    ErrorType("not_a_file", DECODE, False, "the URI names a directory (or an object-store prefix)"),
    ErrorType("symlink_loop", DECODE, False, "a local path whose symbolic links loop (too many levels of links)"),
    ErrorType("not_a_regular_file", DECODE, False,
              "a FIFO, socket or device: not read, as reading it could block or never end"),
    ErrorType("empty_file", DECODE, False, "0 bytes"),
    ErrorType("too_large", DECODE, False, "more than `max_bytes` (checked before decoding)"),
    ErrorType("invalid_data", DECODE, False,
              "the bytes are not a media container FFmpeg recognises, or its header is broken"),
    ErrorType("no_audio_stream", DECODE, False, "a valid container (e.g. a video) without any audio stream"),
    ErrorType("unsupported_codec", DECODE, False, "an audio stream whose codec this FFmpeg build cannot decode"),
    ErrorType("empty_audio", DECODE, False, "the audio stream decoded to no samples at all"),
    ErrorType("too_long", DECODE, False,
              "the decoded audio reached `max_duration_s` (partial: the first `max_duration_s`; a header's "
              "duration is never trusted)"),
    ErrorType("decode_error", DECODE, False,
              "FFmpeg failed demuxing or decoding at once (error), or damaged packets or bytes in the middle were "
              "replaced by silence and the audio after them kept at its time (partial)"),
    ErrorType("truncated", DECODE, False,
              "the stream ended well before the duration its header declares (partial)"),
    ErrorType("non_finite_samples", DECODE, False,
              "NaN or infinite samples (a float file, or a down-mix that overflowed) replaced by silence (partial)"),
    ErrorType("read_error", DECODE, True,
              "an I/O error while reading (network, object changed during the read, ...), or a worker without "
              "the file system package of the URI (gs:// without gcsfs)"),
    ErrorType("internal_error", DECODE, True, "anything else (a bug): logged with its traceback, never raised"),
    ErrorType(INFERENCE_ERROR, INFERENCE, True,
              "inference failed for a window even after the batch was retried and split"),
    ErrorType(WORKER_CRASH, INFERENCE, False,
              "the file killed its worker process on every attempt (it would again on every run)"),
    ErrorType(PIPELINE_ERROR, DRIVER, True,
              "no result came back for the file in any pass of the run (a worker died each time)"),
    ErrorType(ROWS_LOST, DRIVER, True,
              "a data file of `segments` disappeared and took some of the file's rows with it; `maintain "
              "--repair` marked the file (status `partial`, the rows that survived kept) so that the next run "
              "processes it again"),
)

ERRORS: dict[str, ErrorType] = {e.name: e for e in _ERRORS}
ERROR_TYPES: tuple[str, ...] = tuple(ERRORS)
RETRYABLE_ERRORS: frozenset[str] = frozenset(e.name for e in _ERRORS if e.retryable)


def error_types(stage: str) -> tuple[str, ...]:
    """The error types one stage produces, in table order."""
    return tuple(e.name for e in _ERRORS if e.stage == stage)
