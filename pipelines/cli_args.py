"""The `run` command's arguments, shared by `run`, `plan` and the other operator commands.

Each flag maps 1:1 onto a :class:`pipelines.config.PipelineConfig` field (or a task setting);
:func:`config_from_args` builds the validated configuration. No Ray here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import salmonn
from pipelines.config import (
    ENGINES,
    MODEL_OPTIONS,
    ConfigError,
    PipelineConfig,
    check_inputs,
    check_setting,
    decode_options,
)
from pipelines.vad import DEFAULT_SPEECH_THRESHOLD


def parse_value(text: str) -> Any:
    """'true'/'false'/'null', numbers and JSON stay typed; anything else is a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_kv(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; dotted keys nest (client_kwargs.endpoint_url=... -> {'client_kwargs': {...}})."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{flag}: expects KEY=VALUE, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(value)
    return out


def build_tasks(args: argparse.Namespace) -> tuple[salmonn.Task, ...]:
    """Tasks from --tasks, --prompt, and the global/per-task generation settings."""
    names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    tasks = []
    for n in names:
        try:
            tasks.append(salmonn.builtin_task(n))
        except ValueError:
            raise ConfigError(f"--tasks: unknown task {n!r}; built-in tasks: "
                              f"{', '.join(sorted(salmonn.BUILTIN_TASKS))} (or --prompt NAME=TEXT)") from None
    for item in args.prompt or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise ConfigError(f"--prompt: expects NAME=TEXT, got {item!r}")
        try:
            tasks.append(salmonn.Task(name.strip(), text.strip(), salmonn.GenerationSettings()))
        except ValueError as e:
            raise ConfigError(f"--prompt {name.strip()}: {e}") from None
    if not tasks:
        raise ConfigError("--tasks: no tasks; give --tasks and/or --prompt")
    overrides = {k: v for k, v in {
        "lora_scale": args.lora_scale, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
    }.items() if v is not None}
    for key, value in overrides.items():
        check_setting(f"--{key.replace('_', '-')}", key, value)
    per_task = parse_kv(args.task_setting, "--task-setting")
    out = []
    known = {t.name for t in tasks}
    unknown = set(per_task) - known
    if unknown:
        raise ConfigError(f"--task-setting: unknown task(s) {sorted(unknown)}; tasks are {sorted(known)}")
    needs_speech: dict[str, bool] = {}     # TASK.needs_speech=true|false: the task, not its decoding
    for name, settings in per_task.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"--task-setting: expects TASK.KEY=VALUE, got {name}={settings!r}")
        if "needs_speech" in settings:
            value = settings.pop("needs_speech")
            if not isinstance(value, bool):
                raise ConfigError(f"--task-setting {name}.needs_speech: must be true or false, got {value!r}")
            needs_speech[name] = value
        for key, value in settings.items():
            check_setting(f"--task-setting {name}.{key}", key, value)
    for t in tasks:
        try:
            settings = dataclasses.replace(t.settings, **{**overrides, **per_task.get(t.name, {})})
        except (ValueError, TypeError) as e:   # GenerationSettings' own checks (range, type)
            raise ConfigError(f"task {t.name!r}: {e}") from None
        out.append(dataclasses.replace(t, settings=settings, needs_speech=needs_speech.get(t.name, t.needs_speech)))
    return tuple(out)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="caption,transcribe,emotion",
                   help="comma-separated built-in tasks (caption, transcribe, emotion, ...); '' for none")
    p.add_argument("--prompt", action="append", metavar="NAME=TEXT", help="a custom task (repeatable)")
    p.add_argument("--task-setting", action="append", metavar="TASK.KEY=VALUE",
                   help="per-task generation setting, e.g. caption.lora_scale=2.0, or NAME.needs_speech=true "
                        "to let the speech gate skip a custom prompt where nobody speaks (repeatable)")
    p.add_argument("--model", default="tiny", help="tiny | salmonn-13b | salmonn-7b | PATH (default: tiny)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="model loading option, e.g. whisper_path=/models/whisper-large-v2 (repeatable); "
                        f"keys: {', '.join(MODEL_OPTIONS)}")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="generation engine: hf (transformers generate, static batches), vllm (vLLM from "
                        "prompt embeddings, continuous batching; pip install -e '.[vllm]'), auto (default: "
                        "vllm where it is installed and the inference actors have GPUs, else hf)")
    p.add_argument("--lora-scale", type=float, help="LoRA scale for all tasks (official 4.0; ~2.0 = 'activation')")
    p.add_argument("--num-beams", type=int, help="beams for all tasks (1 = greedy, official 4)")
    p.add_argument("--max-new-tokens", type=int, help="max new tokens for all tasks (official 200)")
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--window-s", type=float, default=30.0, help="window length in seconds (<= 30)")
    p.add_argument("--hop-s", type=float, help="hop between windows (default: the window length)")
    p.add_argument("--snap-to-silence", action="store_true", help="move cuts to the quietest 20 ms of the last 2 s")
    p.add_argument("--timed-text", choices=("on", "off"), default="off",
                   help="timed text: each window's language and the word times of transcripts (SALMONN's "
                        "transcribe, aligned by Whisper's decoder on the encoder pass SALMONN already makes); "
                        "export then cuts subtitles from words. The task `whisper` adds Whisper's own "
                        "transcript. Part of the config hash when on (default off)")
    p.add_argument("--speech-gate", choices=("on", "off"), default="on",
                   help="on (default): voice activity detection on every window; tasks that need speech "
                        "(transcribe, emotion, ...) are not generated where nobody speaks (finish_reason "
                        "no_speech) and digitally silent windows run no task (silence); off: every task on "
                        "every window")
    p.add_argument("--speech-threshold", type=float, default=DEFAULT_SPEECH_THRESHOLD,
                   help=f"share of a window in speech below which it has no speech "
                        f"(default {DEFAULT_SPEECH_THRESHOLD})")
    p.add_argument("--cut-at-pauses", action="store_true",
                   help="end each window at the longest speech pause in its last 5 s (VAD), so words "
                        "are not split between windows")
    p.add_argument("--channel-mode", choices=("mix", "first"), default="mix",
                   help="mix = down-mix to mono; first = channel 0 only (the official behaviour)")
    p.add_argument("--max-duration-s", type=float, default=12 * 3600)
    p.add_argument("--max-bytes", type=int, default=20 * 2**30)
    p.add_argument("--extensions", help="comma-separated extensions to list (default: audio and video)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec storage option for the input, e.g. endpoint_url=http://... anon=true (repeatable)")
    p.add_argument("--out-storage-option", action="append", metavar="KEY=VALUE",
                   help="storage option for the output (default: the input's)")
    p.add_argument("--address", help="Ray cluster to connect to ('auto' or HOST:PORT); default: start a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--batch-size", type=int,
                   help="windows per inference batch (default: 32 on GPU actors, 8 on CPU; a GPU that runs "
                        "out of memory makes its actor run fewer at once)")
    p.add_argument("--windows-per-batch", type=int, default=4,
                   help="windows per decode output block (default 4): how a long file streams to inference")
    p.add_argument("--prefetch-batches", type=int, default=4,
                   help="inference batches decoding may run ahead, per inference actor (default 4)")
    p.add_argument("--decode-actors", type=int, help="max decode actors (default: free CPUs)")
    p.add_argument("--infer-actors", type=int, help="inference actors (default: one per GPU, or 1)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per inference actor (default: 1 if GPUs exist)")
    p.add_argument("--flush-files", type=int, default=32,
                   help="commit every N complete files (commits that take long, e.g. reprocessing in a large "
                        "table, are spaced to 9x their duration)")
    p.add_argument("--flush-seconds", type=float, default=30.0, help="...or every S seconds")
    p.add_argument("--stall-timeout-s", type=float,
                   help="fail the run when no result comes for this long (default: 15 min plus a bound on "
                        "one inference batch; see the README's cluster section)")
    p.add_argument("--keep-removed", action="store_true",
                   help="keep the rows of files the listing no longer returns (default: a file gone from "
                        "the input's scope is removed from the tables; a directory or prefix covers "
                        "everything under it, a glob what it matches, a single file itself, a manifest "
                        "nothing: it names files, not a region, so it removes nothing)")
    p.add_argument("--max-removed", type=float, default=0.1, metavar="SHARE",
                   help="stop the run, before it changes anything, when it would remove more than this "
                        "share of the indexed files in its scope (default 0.1; 1.0 allows all) AND more than "
                        "--max-removed-files of them: an empty listing (wrong prefix, no credentials, "
                        "unmounted volume) must not wipe an index")
    p.add_argument("--max-removed-files", type=int, default=3, metavar="N",
                   help="the removal guard stops a run only when it would also remove more than N files "
                        "(default 3): deleting one episode of a small archive is not a bad listing")
    p.add_argument("--resume", metavar="RUN_ID", help="resume this run explicitly")
    p.add_argument("--fresh", action="store_true", help="never resume: start a new run")
    p.add_argument("--repair", action="store_true",
                   help="when a table of OUT lost data files (deleted under the Delta log), repair it before "
                        "planning (what `salmonn-pipeline maintain OUT --repair` does) and process the files "
                        "whose rows were lost again; without it such a run stops with one line, nothing written")
    p.add_argument("--no-progress", action="store_true", help="no progress line")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The run's configuration, validated, its inputs checked to exist (for ``run`` and
    ``plan``); an invalid argument raises :class:`ConfigError`."""
    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh exclude each other")
    storage = parse_kv(args.storage_option, "--storage-option")
    out_storage = parse_kv(args.out_storage_option, "--out-storage-option") if args.out_storage_option else None
    ext = None
    if args.extensions:
        ext = tuple(e for e in (x.strip().lower().lstrip(".") for x in args.extensions.split(",")) if e)
        if not ext:
            raise ConfigError(f"--extensions: give comma-separated extensions, got {args.extensions!r}")
    decode = decode_options(window_s=args.window_s, hop_s=args.hop_s, snap_to_silence=args.snap_to_silence,
                            channel_mode=args.channel_mode, max_duration_s=args.max_duration_s,
                            max_bytes=args.max_bytes)
    cfg = PipelineConfig(
        input=args.input[0] if len(args.input) == 1 else tuple(args.input),
        out=args.out, tasks=build_tasks(args), model=args.model,
        model_options=parse_kv(args.model_option, "--model-option"), decode=decode,
        storage_options=storage, out_storage_options=out_storage, extensions=ext, address=args.address,
        num_cpus=args.num_cpus, batch_size=args.batch_size, windows_per_batch=args.windows_per_batch,
        prefetch_batches=args.prefetch_batches, decode_actors=args.decode_actors,
        infer_actors=args.infer_actors, gpus_per_infer_actor=args.gpus_per_actor,
        flush_files=args.flush_files, flush_seconds=args.flush_seconds, resume_run_id=args.resume,
        fresh=args.fresh, progress=not args.no_progress, speech_gate=args.speech_gate == "on",
        timed_text=args.timed_text == "on",
        speech_threshold=args.speech_threshold, cut_at_pauses=args.cut_at_pauses,
        stall_timeout_s=args.stall_timeout_s, engine=args.engine,
        keep_removed=args.keep_removed, max_removed=args.max_removed,
        max_removed_files=args.max_removed_files, repair=args.repair,
    )
    check_inputs(cfg)
    return cfg
