"""Inference stage: a batch of audio windows -> one result row per (window, task).

``SalmonnPredictor`` is a plain callable class (Ray Data runs it in a GPU actor pool; tests call
it directly). It loads the model once, runs the encoders once per window and then generates every
task for the whole batch, grouping tasks that share generation settings into one batched call.

Memory: a batch that runs the accelerator out of memory is not a failure of its windows. The
predictor halves the number of windows it runs at once (``max_windows``), keeps that limit for the
rest of the actor's life and carries on, so a batch size chosen too big for a GPU costs a few
failed attempts per actor instead of an error row or a retry storm on every batch.

Failure policy: a failing batch is retried once, then split in halves recursively to isolate the
window that fails; that window becomes a ``window_error`` row (its file is then marked by the
driver), the rest of the batch gets its results. Nothing raises out of ``__call__`` for bad input.

Engines (``salmonn.engines``): the encoders always run here in torch; the answers come from the
``hf`` engine (transformers ``generate``, static batches) or the ``vllm`` engine (vLLM from prompt
embeddings, continuous batching). With vLLM the actor runs two batches at once (Ray Data's
``max_concurrent_calls_per_actor``, ``CONCURRENT_BATCHES``): while one batch's answers are being
generated the next batch is encoded and its requests join the same running engine, so the engine
does not idle between Ray Data batches. An engine that dies (``salmonn.EngineDeadError``) takes
its actor with it: Ray restarts the actor, with a new engine, and retries the batch, and the
attempt ledger bounds how often one batch may do that (as for any worker crash).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import faults
from pipelines.batching import AttemptLedger
from schemas import stage as st
from schemas.vocabulary import (
    FINISH_LENGTH,
    FINISH_NO_SPEECH,
    FINISH_SILENCE,
    FINISH_STOP,
    INFERENCE_ERROR,
    WORKER_CRASH,
)

log = logging.getLogger(__name__)

CONCURRENT_BATCHES = {"hf": 1, "vllm": 2}   # Ray Data batches one inference actor runs at once


@dataclasses.dataclass(frozen=True)
class WindowIn:
    file_id: str
    uri: str
    segment_index: int
    start_s: float
    end_s: float
    samples: np.ndarray                          # (N,) float32, 16 kHz mono
    is_silent: bool = False
    speech_ratio: float | None = None
    file_info: dict[str, Any] | None = None      # the file's FileInfo when this is its last window
    speech_spans: tuple[tuple[float, float], ...] | None = None   # the VAD's speech, s from start_s

    def spans_in_file(self) -> list[tuple[float, float]] | None:
        """The window's speech segments in media time (None: not measured)."""
        if self.speech_spans is None:
            return None
        return [(self.start_s + a, self.start_s + b) for a, b in self.speech_spans]


def windows_from_batch(batch: pa.Table) -> tuple[list[WindowIn], list[dict[str, Any]]]:
    """A checked ``WINDOWS`` batch -> its windows (samples read without a copy) and its file rows."""
    windows, files = [], []
    samples = batch.column("samples")
    for i, row in enumerate(batch.drop_columns(["samples"]).to_pylist()):
        if row["kind"] != st.KIND_WINDOW:
            files.append(row)
            continue
        cell = samples[i]
        windows.append(WindowIn(
            file_id=row["file_id"], uri=row["uri"], segment_index=row["segment_index"],
            start_s=row["start_s"], end_s=row["end_s"],
            samples=np.frombuffer(cell.as_buffer(), dtype="<f4") if cell.is_valid else np.zeros(0, np.float32),
            is_silent=bool(row["is_silent"]), speech_ratio=row["speech_ratio"], file_info=row["file_info"],
            speech_spans=None if row.get("speech_spans") is None else tuple(
                (float(s["start_s"]), float(s["end_s"])) for s in row["speech_spans"]),
        ))
    return windows, files


class SalmonnPredictor:
    """Callable: ``WINDOWS`` batch (decode stage) -> ``RESULTS`` batch (to the driver).

    Speech gate (``speech_threshold`` set; None = off, every task on every window): a window whose
    ``speech_ratio`` is below the threshold gets the rows of its speech tasks (``Task.needs_speech``)
    without generating them (text null, 0 tokens, finish reason ``no_speech``); a digitally silent
    window (``is_silent``) gets every task's row that way, with finish reason ``silence``; a window
    without a measured ratio runs every task. A window with no task left is not encoded either.
    Every window still has one row per task.

    Timed text (``timed_text``, or a ``whisper`` task): Whisper's decoder (``salmonn.whisper_text``)
    reads the Whisper encoder output of the same encoder pass. Every encoded window gets its
    language (``language``, ``language_prob``); the ``whisper`` task's rows are Whisper's own
    transcript with its word times and faster-whisper's quality measures (a window that fails
    them says so in ``finish_reason``); with ``timed_text`` the answers of transcript tasks
    (``Task.timed``: SALMONN's ``transcribe``) get word times by forced alignment. Word times are
    absolute in the file and kept inside the VAD's speech segments where the window has them.
    """

    def __init__(self, model: str = "tiny", tasks: Sequence[Any] | None = None, *,
                 device: str | None = None, model_options: dict[str, Any] | None = None,
                 ledger: AttemptLedger | None = None, max_attempts: int = 2,
                 speech_threshold: float | None = None, engine: str = "hf",
                 engine_options: dict[str, Any] | None = None, timed_text: bool = False):
        import torch

        import salmonn
        from salmonn import engines

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.tasks = list(tasks) if tasks is not None else list(salmonn.default_tasks())
        self.llm_tasks = [t for t in self.tasks if not t.whisper]   # the whisper task is not the LLM's
        llm = engines.llm_weights(engine, self.llm_tasks)   # vLLM: the LLM's input embeddings may do
        self.model = salmonn.load_model(model, device=device, llm=llm, **(model_options or {}))
        self.model.eval()
        self.model_id = self.model.model_id
        self.engine_name = engine
        self.engine = engines.build_engine(engine, self.model, self.llm_tasks, **(engine_options or {}))
        self.timed_text = timed_text
        self.whisper_text = (salmonn.load_whisper_text(self.model)
                             if timed_text or any(t.whisper for t in self.tasks) else None)
        self.ledger = ledger
        self.max_attempts = max_attempts
        self._lock = threading.Lock()         # counters below: two batches may run at once (vLLM)
        self.windows_encoded = 0   # encoder passes (one per window) — for tests and stats
        self.max_windows: int | None = None   # windows run at once; set when memory ran out
        self.speech_threshold = speech_threshold
        self.generations_skipped = 0          # (window, task) rows the speech gate answered
        self.controls_dropped = 0             # control characters removed from answers (salmonn.text)
        log.info("SALMONN predictor ready: model %s on %s, engine %s, tasks %s",
                 self.model_id, device, engine, [t.name for t in self.tasks])

    def close(self) -> None:
        """Release the engine (vLLM: its thread and temporary files). Idempotent."""
        self.engine.close()

    # -- Ray Data batch interface ---------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        windows, files = windows_from_batch(st.check(batch, st.WINDOWS, "infer input"))
        rows = [{"kind": f["kind"], "file_id": f["file_id"], "uri": f["uri"], "file_info": f["file_info"]}
                for f in files]
        if windows:
            rows.extend(self._guarded(windows))
        faults.maybe_corrupt("infer", rows)
        return st.build(rows, st.RESULTS, "infer")

    def _guarded(self, windows: list[WindowIn]) -> list[dict[str, Any]]:
        """``predict`` under the attempt ledger: a batch that killed the worker ``max_attempts``
        times is run window by window, and a window that kills it again becomes an error row."""
        if self.ledger is None:
            return self.predict(windows)
        key = "infer:" + ",".join(f"{w.file_id}/{w.segment_index}" for w in windows)
        attempt = self.ledger.begin(key)
        if attempt <= self.max_attempts:
            rows = self.predict(windows)
        else:
            log.error("a batch of %d windows killed the inference worker %d times; isolating windows",
                      len(windows), attempt - 1)
            rows = []
            for w in windows:
                wkey = f"infer-window:{w.file_id}/{w.segment_index}"
                if self.ledger.begin(wkey) > 1:
                    rows.append(self._error_row(w, "the inference worker process died on this window "
                                                   "on every attempt", WORKER_CRASH))
                else:
                    rows.extend(self.predict([w]))
                self.ledger.end(wkey)
        self.ledger.end(key)
        return rows

    # -- the work -------------------------------------------------------------------------------
    def predict(self, windows: list[WindowIn]) -> list[dict[str, Any]]:
        """Results for ``windows``: retry a failing batch once, then isolate the bad window."""
        try:
            return self._run(windows)
        except Exception as first:  # noqa: BLE001 - any failure of a batch is handled below
            self._exit_if_engine_dead(first)
            log.warning("inference batch of %d windows failed (%s: %s); retrying once",
                        len(windows), type(first).__name__, first)
            self._after_failure()
        try:
            return self._run(windows)
        except Exception as second:  # noqa: BLE001
            self._exit_if_engine_dead(second)
            if len(windows) == 1:
                return [self._error_row(windows[0], second)]
            log.warning("retry failed (%s); splitting the batch to isolate the bad window", second)
            self._after_failure()
            return self._isolate(windows)

    def _isolate(self, windows: list[WindowIn]) -> list[dict[str, Any]]:
        try:
            return self._run(windows)
        except Exception as e:  # noqa: BLE001
            self._exit_if_engine_dead(e)
            self._after_failure()
            if len(windows) == 1:
                return [self._error_row(windows[0], e)]
            mid = len(windows) // 2
            return self._isolate(windows[:mid]) + self._isolate(windows[mid:])

    def _exit_if_engine_dead(self, err: BaseException) -> None:
        """A dead engine fails every later batch too: end this worker process so that Ray restarts
        the actor with a new engine and retries the batch (the attempt ledger bounds the retries
        of a batch that kills the engine each time). Isolating windows would only turn every
        window of the run into an error row."""
        import salmonn

        if isinstance(err, salmonn.EngineDeadError):
            log.error("the %s engine died (%s); exiting so that Ray restarts this actor", self.engine_name, err)
            logging.shutdown()
            os._exit(70)   # EX_SOFTWARE: an unexpected death is what makes Ray restart an actor

    def _after_failure(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _error_row(self, w: WindowIn, err: BaseException | str, error_type: str = INFERENCE_ERROR) -> dict[str, Any]:
        """A window that failed for good; ``error`` is "ExceptionType: message"."""
        text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        log.error("window %d of %s failed inference (%s): %s", w.segment_index, w.uri, error_type, text)
        return {"kind": st.KIND_WINDOW_ERROR, "file_id": w.file_id, "uri": w.uri,
                "segment_index": w.segment_index, "start_s": w.start_s, "end_s": w.end_s,
                "speech_ratio": w.speech_ratio, "error_type": error_type, "error": text[:2000],
                "file_info": w.file_info}

    def _run(self, windows: list[WindowIn]) -> list[dict[str, Any]]:
        """All windows, at most ``max_windows`` at a time; out of memory halves that limit."""
        import salmonn

        rows: list[dict[str, Any]] = []
        done = 0
        while done < len(windows):
            n = min(len(windows) - done, self.max_windows or len(windows))
            try:
                rows += self._run_at_once(windows[done:done + n])
            except Exception as e:
                if n == 1 or not salmonn.is_out_of_memory(e):
                    raise
                with self._lock:
                    self.max_windows = min(self.max_windows or n, n // 2)
                log.warning("out of memory with %d windows at once (%s); running at most %d at a time "
                            "from now on", n, str(e).splitlines()[0][:200], self.max_windows)
                self._after_failure()
                continue
            done += n
        return rows

    def _run_at_once(self, windows: list[WindowIn]) -> list[dict[str, Any]]:
        import torch

        from salmonn.engines import task_requests

        faults.maybe_run_out_of_memory("infer", len(windows))
        for w in windows:
            faults.maybe_crash("infer", w.uri)
        plan = [self.tasks_for(w) for w in windows]        # the tasks each window runs
        run = [i for i, p in enumerate(plan) if p]         # the windows to encode
        answers: dict[tuple[int, str], dict[str, Any]] = {}   # (window index, task) -> row fields
        timed: dict[int, dict[str, Any]] = {}                 # window index -> its language
        if run:
            lengths = [len(windows[i].samples) for i in run]
            wave = np.zeros((len(run), max(lengths)), dtype=np.float32)  # (B, N)
            for j, i in enumerate(run):
                wave[j, : lengths[j]] = windows[i].samples
            with torch.inference_mode():
                audio = (torch.from_numpy(wave).to(self.device), torch.tensor(lengths, device=self.device))
                if self.whisper_text is None:
                    embeds, enc = self.model.encode(*audio), None                    # (B, Q, D)
                else:
                    embeds, enc = self.model.encode_with_whisper(*audio)             # + (B, 1500, Cw)
            # One request per (window, task) the speech gate lets through, task-major: the HF
            # engine batches a task group's rows together, vLLM takes them all at once.
            requests = task_requests(embeds, self.llm_tasks, [[t for t in plan[i] if not t.whisper] for i in run])
            for r, g in zip(requests, self.engine.generate(requests) if requests else [], strict=True):
                assert r.row is not None and r.task is not None   # task_requests names both
                answers[(run[r.row], r.task)] = {"text": g.text, "n_output_tokens": int(g.n_tokens),
                                                  "finish_reason": g.finish_reason,
                                                  "_dropped": g.dropped_controls}
            if enc is not None:
                timed = self._timed_text(windows, run, plan, enc, lengths, answers)
        dropped = sum(a.pop("_dropped", 0) for a in answers.values())
        with self._lock:
            self.windows_encoded += len(run)
            self.controls_dropped += dropped
            self.generations_skipped += len(windows) * len(self.tasks) - len(answers)
        if dropped:
            log.warning("dropped %d control character(s) from the answers of %d windows (byte-fallback tokens "
                        "decoded to NUL, form feed, ...; %d so far in this actor)", dropped, len(windows),
                        self.controls_dropped)
        rows = []
        for t, task in enumerate(self.tasks):
            for i, w in enumerate(windows):
                a = answers.get((i, task.name))
                rows.append({
                    "kind": st.KIND_SEGMENT, "file_id": w.file_id, "uri": w.uri, "segment_index": w.segment_index,
                    "start_s": w.start_s, "end_s": w.end_s, "task": task.name, "prompt": task.prompt,
                    "text": None, "n_output_tokens": 0,
                    "finish_reason": FINISH_SILENCE if w.is_silent else FINISH_NO_SPEECH,
                    **(a or {}), **timed.get(i, {}),
                    "lora_scale": float(task.settings.lora_scale), "num_beams": int(task.settings.num_beams),
                    "speech_ratio": w.speech_ratio,
                    "file_info": w.file_info if t == 0 else None,  # passed on once per window
                })
        return rows

    def _timed_text(self, windows: list[WindowIn], run: list[int], plan: list[list[Any]], enc: Any,
                    lengths: list[int], answers: dict[tuple[int, str], dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Whisper's decoder on the encoder output ``enc`` (B, 1500, Cw) of the windows ``run``:
        each window's language (returned per window index), the ``whisper`` task's answers, and
        with ``timed_text`` the words of the transcript tasks' answers (both into ``answers``)."""
        from salmonn.text import clean_text
        from salmonn.timing import place_words
        from salmonn.whisper_text import mel_frames

        wt = self.whisper_text
        assert wt is not None
        enc = enc.to(wt.dtype)
        frames = [mel_frames(n) for n in lengths]
        langs = wt.detect_language(enc)                    # [(code, probability)] per encoded window
        codes = [c for c, _ in langs]

        def placed(i: int, words: Any) -> list[dict[str, Any]]:
            w = windows[i]
            return [{"word": x.word, "start_s": x.start_s, "end_s": x.end_s, "probability": x.probability}
                    for x in place_words(words, w.start_s, w.spans_in_file())]

        for task in self.tasks:
            if task.whisper:
                sel = [j for j, i in enumerate(run) if task in plan[i]]
                if not sel:
                    continue
                segs = wt.transcribe(enc[sel], [frames[j] for j in sel], [codes[j] for j in sel],
                                     max_new_tokens=min(int(task.settings.max_new_tokens), wt.max_text_tokens))
                for j, seg in zip(sel, segs, strict=True):
                    text, dropped = clean_text(seg.text)
                    answers[(run[j], task.name)] = {
                        "text": text, "n_output_tokens": len(seg.tokens), "_dropped": dropped,
                        "finish_reason": seg.failed or (FINISH_STOP if seg.finished else FINISH_LENGTH),
                        "words": placed(run[j], seg.words), "avg_logprob": seg.avg_logprob,
                        "compression_ratio": seg.compression_ratio, "no_speech_prob": seg.no_speech_prob}
            elif task.timed and self.timed_text:
                sel = [j for j, i in enumerate(run) if answers.get((i, task.name), {}).get("text")]
                if not sel:
                    continue
                aligned = wt.align(enc[sel], [frames[j] for j in sel],
                                   [answers[(run[j], task.name)]["text"] for j in sel], [codes[j] for j in sel])
                for j, words in zip(sel, aligned, strict=True):
                    answers[(run[j], task.name)]["words"] = placed(run[j], words)
        return {i: {"language": code, "language_prob": prob} for i, (code, prob) in zip(run, langs, strict=True)}

    def tasks_for(self, w: WindowIn) -> list[Any]:
        """The tasks the speech gate lets ``w`` run: all of them with the gate off (or no ratio
        measured), none on digital silence, only those that do not need speech below the
        threshold."""
        if self.speech_threshold is None:
            return self.tasks
        if w.is_silent:
            return []
        if w.speech_ratio is None or w.speech_ratio >= self.speech_threshold:
            return self.tasks
        return [t for t in self.tasks if not t.needs_speech]
