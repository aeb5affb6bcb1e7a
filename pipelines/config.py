"""Pipeline configuration: :class:`PipelineConfig`, its validation, the config hash and task
resolution. No Ray here: the CLI, ``plan`` and tests build and check configurations without it.

Every rule a configuration must satisfy is checked in one place, :meth:`PipelineConfig.validate`
(run by ``__post_init__``, so an invalid configuration cannot be built), and raises
:class:`ConfigError` with a one-line message naming the setting. :func:`check_output` adds the
checks that need the output location (``--out`` is not a regular file, ``--resume RUN`` exists);
the CLI runs both before Ray starts, and ``run_pipeline`` runs them for the Python API.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from fsspec.core import url_to_fs

import salmonn
from pipelines.decode import DecodeOptions
from pipelines.sources import is_local_filesystem
from pipelines.vad import DEFAULT_SPEECH_THRESHOLD, PAUSE_SEARCH_S, VAD_ID
from salmonn.config import NUMERICS, GenerationSettings
from salmonn.prompts import Task

# A run's windows are at least this long: the model zero-pads anything shorter to 1 s, so a
# shorter window or hop only multiplies the rows (a 1 ms window makes 3.6 million per hour).
MIN_WINDOW_S = 1.0
RUNS_DIR = "_runs"            # OUT/_runs/<run_id>/run.json holds each run's record
RUN_RECORD = "run.json"

# Model-loading options a run may set (``--model-option KEY=VALUE``): the SalmonnConfig fields that
# name where the parts are and which numerics to use. Dimensions are never options: they are
# derived from the weight files.
MODEL_OPTIONS: dict[str, str] = {
    "whisper_path": "Whisper encoder: a local directory or a hub id",
    "beats_path": "BEATs checkpoint file",
    "llm_path": "Vicuna LLM: a local directory or a hub id",
    "checkpoint_path": "SALMONN checkpoint file (.pth or .safetensors)",
    "weights_dir": "where relative part names are looked up",
    "numerics": f"one of {', '.join(NUMERICS)}",
}

# Generation engines (DESIGN.md "Generation engines"): "hf" (transformers generate, static batches;
# the exact reference), "vllm" (vLLM from prompt embeddings, continuous batching; needs the vllm
# package on the inference workers), "auto" (vllm where it is installed and the inference actors
# have GPUs, else hf). Both give the same tokens in fp32, so the engine is not part of the config
# hash: switching engines does not reprocess an archive.
ENGINES = ("auto", "hf", "vllm")

# GenerationSettings fields with the rule each value must satisfy.
_SETTING_RULES: dict[str, tuple[type, str]] = {
    "max_new_tokens": (int, "an integer >= 1"),
    "num_beams": (int, "an integer >= 1"),
    "repetition_penalty": (float, "a finite number > 0"),
    "length_penalty": (float, "a finite number > 0"),
    "lora_scale": (float, "a finite number >= 0"),
}
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(GenerationSettings))


class ConfigError(ValueError):
    """An invalid setting; the message is one line and names the setting."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything a run needs. CLI flags map 1:1 onto these fields."""

    input: str | tuple[str, ...]
    out: str
    tasks: tuple[Task, ...] = ()                 # () = the built-in three (caption, transcribe, emotion)
    model: str = "tiny"                          # preset name or a directory of model parts
    model_options: Mapping[str, str] = dataclasses.field(default_factory=dict)   # MODEL_OPTIONS keys
    decode: DecodeOptions = DecodeOptions()
    speech_gate: bool = True                     # VAD on every window; speech tasks skip windows without speech
    timed_text: bool = False                     # language per window, word times of transcripts (Whisper's decoder)
    speech_threshold: float = DEFAULT_SPEECH_THRESHOLD   # below this share of speech a window has "no speech"
    cut_at_pauses: bool = False                  # end each window at the longest speech pause of its last seconds
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # input (fsspec)
    out_storage_options: Mapping[str, Any] | None = None                          # None = input's
    extensions: tuple[str, ...] | None = None
    address: str | None = None                   # None: start a local Ray; "auto" / host: connect
    num_cpus: int | None = None                  # local Ray only
    batch_size: int | None = None                # windows per inference batch; None: 32 on GPU actors, 8 on CPU
    windows_per_batch: int = 4                   # windows per decode output block (streamed to inference)
    prefetch_batches: int = 4                    # inference batches decode may run ahead, per inference actor
    decode_actors: int | None = None             # None: derived from the cluster
    infer_actors: int | None = None
    gpus_per_infer_actor: float | None = None    # None: 1 when the cluster has GPUs, else 0
    flush_files: int = 32                        # commit once this many files are complete...
    flush_seconds: float = 30.0                  # ...or this long after the last commit
    max_passes: int = 2                          # 1 normal pass + an isolating pass for dropped blocks
    crash_attempts: int = 2                      # attempts before work that kills its worker is given up
    resume_run_id: str | None = None
    fresh: bool = False
    progress: bool = True
    runtime_env: Mapping[str, Any] | None = None
    stall_timeout_s: float | None = None         # no result this long fails the run; None: pipelines.watchdog's default
    engine: str = "auto"                         # generation engine (ENGINES); resolved per pass (resolve_engine)
    keep_removed: bool = False                   # keep the rows of files gone from the input's scope
    max_removed: float = 0.1                     # a run removing more of its scope's indexed files...
    max_removed_files: int = 3                   # ...and more files than this stops (both must be exceeded)
    repair: bool = False                         # a table that lost data files: repair it before planning
                                                 # (pipelines.output.health) instead of refusing to run

    def __post_init__(self) -> None:
        if isinstance(self.tasks, list):
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.input, list):
            object.__setattr__(self, "input", tuple(self.input))
        if isinstance(self.extensions, list):
            object.__setattr__(self, "extensions", tuple(self.extensions))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line) for the first invalid setting."""
        inputs = (self.input,) if isinstance(self.input, str) else self.input
        if not inputs or not all(isinstance(i, str) and i.strip() for i in inputs):
            raise ConfigError(f"input: give at least one non-empty input URI, got {self.input!r}")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError(f"--out: must be a non-empty URI, got {self.out!r}")
        if not isinstance(self.decode, DecodeOptions):
            raise ConfigError(f"decode: must be a DecodeOptions, got {type(self.decode).__name__}")
        if self.decode.window_s < MIN_WINDOW_S:
            raise ConfigError(f"--window-s: must be at least {MIN_WINDOW_S:g} s, got {self.decode.window_s!r}")
        if self.decode.hop_s is not None and self.decode.hop_s < MIN_WINDOW_S:
            raise ConfigError(f"--hop-s: must be at least {MIN_WINDOW_S:g} s, got {self.decode.hop_s!r}")
        _check_tasks(self.tasks)
        _check_model(self.model, self.model_options)
        for flag, value in (("--num-cpus", self.num_cpus), ("--batch-size", self.batch_size),
                            ("--decode-actors", self.decode_actors), ("--infer-actors", self.infer_actors)):
            if value is not None:
                _positive_int(flag, value)
        _positive_int("--flush-files", self.flush_files)
        _positive_int("--windows-per-batch", self.windows_per_batch)
        _positive_int("--prefetch-batches", self.prefetch_batches)
        _positive_int("max_passes", self.max_passes)
        _positive_int("crash_attempts", self.crash_attempts)
        if self.gpus_per_infer_actor is not None:
            _finite("--gpus-per-actor", self.gpus_per_infer_actor, minimum=0.0)
        _finite("--flush-seconds", self.flush_seconds, minimum=0.0)
        if self.stall_timeout_s is not None:
            _finite("--stall-timeout-s", self.stall_timeout_s, minimum=0.0, strict=True)
        for flag, value in (("--speech-gate", self.speech_gate), ("--cut-at-pauses", self.cut_at_pauses),
                            ("--timed-text", self.timed_text)):
            if not isinstance(value, bool):
                raise ConfigError(f"{flag}: must be on or off (a bool), got {value!r}")
        _finite("--speech-threshold", self.speech_threshold, minimum=0.0)
        if self.speech_threshold > 1:
            raise ConfigError(f"--speech-threshold: a share of the window, in [0, 1], got {self.speech_threshold!r}")
        if not isinstance(self.keep_removed, bool):
            raise ConfigError(f"--keep-removed: must be a bool, got {self.keep_removed!r}")
        _finite("--max-removed", self.max_removed, minimum=0.0)
        if self.max_removed > 1:
            raise ConfigError(f"--max-removed: a share of the indexed files in scope, in [0, 1] (1.0 allows "
                              f"removing all), got {self.max_removed!r}")
        if isinstance(self.max_removed_files, bool) or not isinstance(self.max_removed_files, int) \
                or self.max_removed_files < 0:
            raise ConfigError(f"--max-removed-files: a count of files, >= 0, got {self.max_removed_files!r}")
        if not isinstance(self.repair, bool):
            raise ConfigError(f"--repair: must be a bool, got {self.repair!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.address is not None and not (isinstance(self.address, str) and self.address.strip()):
            raise ConfigError(f"--address: must be 'auto' or HOST:PORT, got {self.address!r}")
        if self.resume_run_id is not None:
            if not isinstance(self.resume_run_id, str) or not _is_plain_name(self.resume_run_id):
                raise ConfigError(f"--resume: not a run id: {self.resume_run_id!r}")
            if self.fresh:
                raise ConfigError("--resume and --fresh exclude each other")
        if self.extensions is not None and not all(isinstance(e, str) and e for e in self.extensions):
            raise ConfigError(f"--extensions: must be non-empty names, got {self.extensions!r}")
        for flag, opts in (("--storage-option", self.storage_options),
                           ("--out-storage-option", self.out_storage_options)):
            if opts is not None and not isinstance(opts, Mapping):
                raise ConfigError(f"{flag}: must be a mapping, got {type(opts).__name__}")

    @property
    def out_options(self) -> dict[str, Any]:
        """fsspec options for the output (the input's unless given)."""
        return dict(self.out_storage_options if self.out_storage_options is not None else self.storage_options)


def _positive_int(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ConfigError(f"{flag}: must be an integer >= 1, got {value!r}")


def _finite(flag: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (float(value) > minimum if strict else float(value) >= minimum)
    if not ok:
        raise ConfigError(f"{flag}: must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def check_setting(label: str, name: str, value: Any) -> None:
    """One generation setting ``name`` has the right type and range (NaN and inf refused);
    ``label`` names it in the message (a flag, or a task and the setting)."""
    if name not in _SETTING_RULES:
        raise ConfigError(f"{label}: unknown setting {name!r}; valid: {', '.join(SETTING_NAMES)}")
    kind, rule = _SETTING_RULES[name]
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
        ok = ok and (float(value) >= 0 if name == "lora_scale" else float(value) > 0)
    if not ok:
        raise ConfigError(f"{label}: must be {rule}, got {value!r}")


def check_settings(task: str, settings: GenerationSettings) -> None:
    """Every generation setting of a task has the right type and range."""
    for name in SETTING_NAMES:
        check_setting(f"task {task!r} {name}", name, getattr(settings, name))


def _check_tasks(tasks: Sequence[Task]) -> None:
    if not isinstance(tasks, tuple):
        raise ConfigError(f"tasks: must be a tuple of salmonn.Task, got {type(tasks).__name__}")
    for t in tasks:
        if not isinstance(t, Task):
            raise ConfigError(f"tasks: must be salmonn.Task objects, got {type(t).__name__}")
        check_settings(t.name, t.settings)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: names must be unique, got {names}")


def _check_model(model: str, options: Mapping[str, Any]) -> None:
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"--model: must be a preset ({', '.join(salmonn.PRESETS)}) or a directory, got {model!r}")
    if not isinstance(options, Mapping):
        raise ConfigError(f"--model-option: must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise ConfigError(f"--model-option: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                          f"{', '.join(MODEL_OPTIONS)}")
    for key, value in options.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"--model-option {key}: must be a non-empty string, got {value!r}")
    if "numerics" in options and options["numerics"] not in NUMERICS:
        raise ConfigError(f"--model-option numerics: must be one of {', '.join(NUMERICS)}, "
                          f"got {options['numerics']!r}")
    try:
        model_id_for(model)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"--model: {model!r} is neither a preset ({', '.join(salmonn.PRESETS)}) nor a "
                          f"directory of model parts ({_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def decode_options(**fields: Any) -> DecodeOptions:
    """:class:`DecodeOptions` from its fields; an invalid value is a :class:`ConfigError` naming
    the CLI flag (``window_s: ...`` -> ``--window-s: ...``)."""
    try:
        return DecodeOptions(**fields)
    except (ValueError, TypeError) as e:
        name, sep, rest = str(e).partition(": ")
        if sep and name in fields:
            raise ConfigError(f"--{name.replace('_', '-')}: {rest}") from e
        raise ConfigError(f"decode options: {_one_line(e)}") from e


def vllm_installed() -> bool:
    """Whether this Python can import vLLM (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_engine(engine: str, *, on_gpu: bool, vllm_available: bool | None = None) -> str:
    """The engine a pass's inference actors run: ``engine`` unless it is "auto", which is "vllm"
    where vLLM is installed (on the driver: the workers run the same image) and the actors have
    GPUs, else "hf" (vLLM's CPU build is for tests; HF is the reference)."""
    if engine != "auto":
        return engine
    available = vllm_installed() if vllm_available is None else vllm_available
    return "vllm" if on_gpu and available else "hf"


def resolve_tasks(tasks: Sequence[Task]) -> tuple[Task, ...]:
    """The tasks a run asks: ``tasks``, or the built-in three when it is empty."""
    return tuple(tasks) if tasks else tuple(salmonn.default_tasks())


def model_id_for(model: str) -> str:
    """The model_id a run of ``model`` writes (nothing is loaded)."""
    return salmonn.model_id_for(model)


# What timed text is made with (enters the config hash when --timed-text is on): Whisper's decoder
# from the model's Whisper folder, openai-whisper's alignment (alignment heads, median filter 7,
# DTW, its clamps) and the speech gate's spans. Bump it when the word times change.
TIMING_ID = "whisper-decoder-dtw-v1"


def config_hash(parts: Mapping[str, Any]) -> str:
    """Stable short hash of everything that changes a file's results (model, tasks, windowing)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash_of(cfg: PipelineConfig) -> str:
    """Hash of what changes results: model, tasks and their settings, windowing.

    Not the schema version: a schema bump (a new derived column) must not reprocess an archive;
    older parts are read through ``schemas.conform``. Nor how the tables follow the archive
    (``keep_removed``, ``max_removed``, ``max_removed_files``): they decide which rows stay, not what a file's rows are.
    Nor ``repair``: it mends the tables before a run, and the files it marks are redone under the run's own hash.

    The speech gate, pause cuts and timed text enter the hash only when they are on, so a run with
    them off has the hash (and the results) of a run from before they existed."""
    tasks = resolve_tasks(cfg.tasks)
    d = cfg.decode
    parts: dict[str, Any] = {
        "model": cfg.model,
        "model_options": dict(cfg.model_options),
        "tasks": [(t.name, t.prompt, dataclasses.asdict(t.settings)) for t in tasks],
        "decode": {"window_s": d.window_s, "hop_s": d.hop_s, "snap": d.snap_to_silence,
                   "channel_mode": d.channel_mode, "sample_rate": d.sample_rate},
    }
    if cfg.speech_gate:
        parts["speech_gate"] = {"threshold": cfg.speech_threshold, "vad": VAD_ID,
                               "speech_tasks": [t.name for t in tasks if t.needs_speech]}
    if cfg.timed_text:
        parts["timed_text"] = {"alignment": TIMING_ID}
    if cfg.cut_at_pauses:
        parts["cut_at_pauses"] = {"search_s": PAUSE_SEARCH_S, "vad": VAD_ID}
    return config_hash(parts)


def check_output(cfg: PipelineConfig, out_storage_options: Mapping[str, Any] | None = None) -> None:
    """The checks that look at the output location: ``--out`` must not be a regular file, and the
    run named by ``--resume`` must have a record (``OUT/_runs/<RUN>/run.json``)."""
    options = dict(out_storage_options if out_storage_options is not None else cfg.out_options)
    try:
        fs, root = url_to_fs(cfg.out, **options)
    except (ValueError, ImportError, TypeError) as e:
        raise ConfigError(f"--out {cfg.out}: {_one_line(e)}") from e
    if fs.isfile(root):
        raise ConfigError(f"--out {cfg.out}: is a regular file; give a directory (or prefix) for the tables")
    if cfg.resume_run_id is not None:
        record = posixpath.join(root.rstrip("/"), RUNS_DIR, cfg.resume_run_id, RUN_RECORD)
        if not fs.isfile(record):
            raise ConfigError(f"--resume {cfg.resume_run_id}: no such run under {cfg.out}")


def check_inputs(cfg: PipelineConfig) -> None:
    """Each input location exists (a glob may match nothing: that is an empty run, not an error)."""
    inputs = (cfg.input,) if isinstance(cfg.input, str) else cfg.input
    for uri in inputs:
        try:
            fs, path = url_to_fs(uri, **dict(cfg.storage_options))
        except (ValueError, ImportError, TypeError) as e:
            raise ConfigError(f"input {uri}: {_one_line(e)}") from e
        if any(c in path for c in "*?[") and not fs.exists(path):
            continue
        if not fs.exists(path):
            raise ConfigError(f"input not found: {uri}")
        if is_local_filesystem(fs) and not _is_dir_or_regular(path):
            raise ConfigError(f"input {uri}: not a directory, regular file or manifest (a FIFO or device "
                              f"is never read)")


def _is_dir_or_regular(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True     # listing reports what is wrong with it
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode)
