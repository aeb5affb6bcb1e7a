"""Operator subcommands of `salmonn-pipeline`: plan, report, export, weights.

    salmonn-pipeline plan INPUT --out OUT [run options] [--throughput X] [--probe auto|always|never]
    salmonn-pipeline report OUT [--run RUN_ID] [--html FILE]
    salmonn-pipeline export OUT --format srt|vtt|jsonl|txt [--task transcribe] --to DIR [--where PREFIX]
                            [--vtt-word-timestamps]
    salmonn-pipeline weights fetch PRESET --to DIR | verify PRESET DIR [--record] | convert SRC [DST]
    salmonn-pipeline maintain OUT [--vacuum-hours H] [--target-mib N] [--repair]
    salmonn-pipeline migrate OUT

``pipelines.cli.build_parser`` registers them with ``add_subcommands(sub)``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pipelines.cli_args import add_run_args, config_from_args, parse_kv
from pipelines.output import MaintenanceBusy, OldLayoutError
from salmonn import weights

log = logging.getLogger(__name__)


def add_subcommands(sub: Any) -> None:
    """Register plan, report, export, weights, maintain and migrate on the ``add_subparsers()``
    object ``sub``."""

    p = sub.add_parser("plan", help="what a run would do: new/changed/unchanged files, files it would remove "
                                    "(gone from the input's scope) and reuse (moved or copied), audio hours, GPU "
                                    "hours (decodes nothing, writes nothing)")
    p.add_argument("input", nargs="+", help="as for `run`")
    p.add_argument("--out", required=True, help="the output a run would write to (read only here)")
    add_run_args(p)
    p.add_argument("--throughput", type=float, metavar="AUDIO_H_PER_GPU_H",
                   help="audio hours one GPU processes per hour with this run's tasks "
                        "(default: the project's figure for the model)")
    p.add_argument("--probe", choices=("auto", "always", "never"), default="auto",
                   help="read container headers (<= 64 KiB a file) for exact durations: auto = local files only; "
                        "local files an indexed file has the size of are hashed (read whole) to recognise copies, "
                        "except with never")
    p.add_argument("--files", action="store_true", help="also list every file with its action")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="a run's summary: counts, errors, durations, throughput, stage times, "
                                      "samples (text, or a self-contained HTML page with plots)")
    p.add_argument("out")
    p.add_argument("--run", metavar="RUN_ID", help="the run to report (default: the newest)")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page with plots")
    p.add_argument("--samples", type=int, default=5, help="sample files to show (default 5)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="one subtitle/transcript file per input from the latest results")
    p.add_argument("out")
    p.add_argument("--format", required=True, choices=("srt", "vtt", "jsonl", "txt"))
    p.add_argument("--task", default="transcribe", help="which task's text (default transcribe)")
    p.add_argument("--to", required=True, metavar="DIR", help="where to write (local path or fsspec URL)")
    p.add_argument("--where", metavar="URI_PREFIX", help="only inputs whose URI starts with this")
    p.add_argument("--run", metavar="RUN_ID", help="only results of this run (default: every file's latest)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--to-storage-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--vtt-word-timestamps", action="store_true",
                   help="vtt: a timestamp tag before each word of a timed cue (karaoke style)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("maintain", help="compact the output's Delta tables, write checkpoints and, with "
                                        "--vacuum-hours, delete data files older versions no longer need")
    p.add_argument("out")
    p.add_argument("--vacuum-hours", type=float, metavar="H",
                   help="also vacuum: delete data files that no table version of the last H hours needs "
                        "(time travel before that ends) and untracked files older than H hours; "
                        "0 is safe only while nothing else writes to OUT")
    p.add_argument("--target-mib", type=int, default=128, metavar="N",
                   help="compact small data files into files of about N MiB (default 128)")
    p.add_argument("--repair", action="store_true",
                   help="first repair tables that lost data files (deleted under the Delta log): a Delta "
                        "repair commit drops the references, and the files whose rows were lost are marked "
                        "rows_lost so that the next run processes them again")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_maintain)

    p = sub.add_parser("migrate", help="convert an output written by an earlier version (Parquet parts + "
                                       "commit records) into Delta tables, in place")
    p.add_argument("out")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("weights", help="fetch, verify or convert the model's weight files")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("fetch", help="download a preset's parts from the hub into DIR, verify, record a manifest")
    w.add_argument("preset", choices=("salmonn-13b", "salmonn-7b"))
    w.add_argument("--to", required=True, metavar="DIR")
    w.add_argument("--parts", help="comma-separated subset of whisper,beats,llm,checkpoint")
    w.add_argument("--endpoint", help="hub endpoint (default: HF_ENDPOINT or the Hugging Face Hub)")
    w.set_defaults(func=cmd_weights_fetch)
    w = wsub.add_parser("verify", help="check sizes and sha256 of a preset's files in DIR")
    w.add_argument("preset", choices=("salmonn-13b", "salmonn-7b"))
    w.add_argument("dir")
    w.add_argument("--record", action="store_true", help="(re)write DIR/salmonn_weights.json once the files pass")
    w.add_argument("--offline", action="store_true", help="never contact the hub (manifest / official sizes)")
    w.add_argument("--online", action="store_true", help="require the hub's metadata")
    w.add_argument("--parts", help="comma-separated subset of whisper,beats,llm,checkpoint")
    w.add_argument("--endpoint", help="hub endpoint (default: HF_ENDPOINT or the Hugging Face Hub)")
    w.set_defaults(func=cmd_weights_verify)
    w = wsub.add_parser("convert", help="official pickle (.pth/.pt) -> .safetensors with the same tensors")
    w.add_argument("src")
    w.add_argument("dst", nargs="?", help="default: SRC with the suffix .safetensors")
    w.add_argument("--no-check", action="store_true", help="skip re-reading both files to compare every tensor")
    w.set_defaults(func=cmd_weights_convert)


def _kv(items: Any, flag: str) -> dict[str, Any]:
    return parse_kv(items, flag)


def _check_tables(out: str, options: dict[str, Any]) -> None:
    """Raise ``TableDamaged`` (one line: the table, the missing file, the repair command; the CLI
    prints it and exits 1) when a table of ``out`` references data files that no longer exist.
    One listing per table: a reader whose filter skips the missing file would otherwise report
    on a table that lost rows without a word."""
    from pipelines.output import OutputStore
    from pipelines.output.health import ensure_healthy

    ensure_healthy(OutputStore(out, options))


def cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.ops.plan import plan_json, plan_run

    cfg = config_from_args(args)
    try:
        _check_tables(cfg.out, cfg.out_options)   # the run would refuse a damaged table: so does its plan
        plan = plan_run(cfg, throughput=args.throughput, probe=args.probe)
    except OldLayoutError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 1
    print(plan_json(plan) if args.json else plan.format(show_files=args.files))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.ops.report import collect, render_text, write_html

    try:
        _check_tables(args.out, _kv(args.storage_option, "--storage-option"))
        data = collect(args.out, args.run, _kv(args.storage_option, "--storage-option"), n_samples=args.samples)
    except (FileNotFoundError, OldLayoutError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 1
    if args.html:
        write_html(data, args.html)
        print(f"wrote {args.html} (run {data.run_id}: {data.n_files} files, "
              + ", ".join(f"{k} {v}" for k, v in sorted(data.status_counts.items())) + ")")
    else:
        print(render_text(data))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipelines.ops.export import export

    if args.vtt_word_timestamps and args.format != "vtt":
        print("export: --vtt-word-timestamps needs --format vtt", file=sys.stderr)
        return 2
    try:
        _check_tables(args.out, _kv(args.storage_option, "--storage-option"))
        result = export(args.out, fmt=args.format, task=args.task, to=args.to, where=args.where, run_id=args.run,
                        storage_options=_kv(args.storage_option, "--storage-option"),
                        to_storage_options=_kv(args.to_storage_option, "--to-storage-option"),
                        word_timestamps=args.vtt_word_timestamps)
    except OldLayoutError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    print(result.format(args.format, args.task, args.to))
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    from pipelines.output import OutputStore, maintain
    from pipelines.output.health import repair

    if args.vacuum_hours is not None and args.vacuum_hours < 0:
        print("maintain: --vacuum-hours must be >= 0", file=sys.stderr)
        return 2
    store = OutputStore(args.out, _kv(args.storage_option, "--storage-option"))
    try:
        if args.repair:    # a table that lost data files: repaired, its lost rows marked for the next run
            for line in repair(store).lines():
                print(line)
        report = maintain(store, vacuum_hours=args.vacuum_hours, target_size=args.target_mib * 2**20)
    except (OldLayoutError, MaintenanceBusy) as e:
        print(f"maintain: {e}", file=sys.stderr)
        return 1
    if not report:
        print(f"{args.out}: no Delta tables here")
        return 1
    for name, r in report.items():
        line = (f"{name}: compacted {r['files_removed']} data files into {r['files_added']}, "
                f"checkpoint at version {r['version']}")
        if "vacuumed" in r:
            line += f", vacuum deleted {r['vacuumed']} files"
        print(line)
    from pipelines.search import clean_index

    print(f"search index: {clean_index(store)} file(s) no index version needs deleted")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pipelines.output import migrate

    result = migrate(args.out, _kv(args.storage_option, "--storage-option"))
    print(result.format(args.out))
    return 0


def _parts(args: argparse.Namespace) -> list[str] | None:
    return [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    try:
        res = weights.fetch(args.preset, args.to, hub=weights.HfHub(endpoint=args.endpoint), parts=_parts(args))
    except weights.WeightsError as e:
        print(f"weights fetch: {e}", file=sys.stderr)
        return 2 if isinstance(e, weights.HubUnavailable) else 1
    print(f"{args.to}: downloaded {len(res.downloaded)} files, kept {len(res.kept)} already there")
    print(res.verify.format())
    if res.verify.ok:
        print(f"manifest: {res.directory / weights.MANIFEST}; use it with --model {res.directory}")
    return 0 if res.verify.ok else 1


def cmd_weights_verify(args: argparse.Namespace) -> int:
    if args.online and args.offline:
        raise SystemExit("--online and --offline exclude each other")
    mode = "online" if args.online else "offline" if args.offline else "auto"
    hub = None if mode == "offline" else weights.HfHub(endpoint=args.endpoint)
    try:
        res = weights.verify(args.preset, args.dir, hub=hub, mode=mode, record=args.record, parts=_parts(args))
    except weights.WeightsError as e:
        print(f"weights verify: {e}", file=sys.stderr)
        return 2 if isinstance(e, weights.HubUnavailable) else 1
    print(res.format())
    if args.record:
        print(f"recorded {weights.MANIFEST} in {args.dir}")
    return 0 if res.ok else 1


def cmd_weights_convert(args: argparse.Namespace) -> int:
    try:
        dst, n = weights.convert(args.src, args.dst, check=not args.no_check)
    except weights.WeightsError as e:
        print(f"weights convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}" + (f" ({n} tensors, each identical to the source)" if n >= 0 else ""))
    return 0

