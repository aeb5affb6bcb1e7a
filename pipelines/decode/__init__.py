"""Streamed decode: one input file -> 16 kHz mono float32 windows (<= 30 s) + one FileInfo.

The file is opened through fsspec with an explicit read block size and decoded by PyAV straight
from that file object (no download, no temp file, no ffmpeg process). Decoded frames are
down-mixed and resampled to 16 kHz (soxr's streaming resampler on chunks of frames; libswresample
for surround down-mixes) and go into a :class:`Windower`, which owns one
preallocated window buffer and hands out each window as soon as it is full, so memory stays
O(window) whatever the file's length. The decoded-sample count is capped in the loop: headers are
never trusted for the length of the audio.

``decode_file`` never raises for bad input. It yields zero or more :class:`Window` and then
exactly one :class:`FileInfo`, whose ``status`` is

* ``ok``      -- decoded to the end;
* ``partial`` -- windows were produced, but not all of the audio is as it was: the stream broke
  or was cut off (the windows before are good and were yielded), damaged packets or bytes in the
  middle were replaced by silence (``decode_error``; the audio after the damage is kept, at its
  own time), or NaN/inf samples were replaced by silence (``non_finite_samples``); the message
  says how much and where (media time) it started;
* ``error``   -- no window at all (``error_type`` says why).

Times are media time: the first window starts where the audio starts on the container's
timeline, rebased to the container's start time as FFmpeg and players do (an audio track that
starts 5 s after the video starts at 5.0). Of several audio streams, the one FFmpeg picks
(``av_find_best_stream``: the default disposition first) is decoded; ``FileInfo.audio_stream``
says which. A local path is classified with ``stat`` before anything opens it (a FIFO or device
is never read).

``error_type`` values: the decode-stage entries of ``schemas.vocabulary.ERRORS`` (:data:`ERROR_TYPES`),

The parts: :mod:`.common` (options, the outputs and the per-file verdict), :mod:`.reading`
(opening local files and objects: what a path is, reads that suit PyAV), :mod:`.mono` (decoded
frames -> 16 kHz mono: down-mix, resampling, non-finite samples), :mod:`.windowing` (16 kHz mono
-> windows with sample-accurate times) and :mod:`.stream` (``decode_file``: the packet loop, its
repairs and the error classification).
"""

from pipelines.decode.common import MAX_WINDOW_S, DecodeOptions, FileInfo, Window
from pipelines.decode.stream import ERROR_TYPES, decode_file
from pipelines.decode.windowing import SILENCE_PEAK, Windower, iter_windows
from salmonn.config import SAMPLE_RATE  # 16 kHz: what Whisper and BEATs (and so SALMONN) take

__all__ = ["ERROR_TYPES", "MAX_WINDOW_S", "SAMPLE_RATE", "SILENCE_PEAK", "DecodeOptions", "FileInfo", "Window",
           "Windower", "decode_file", "iter_windows"]
