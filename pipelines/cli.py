"""`salmonn-pipeline` console script.

    salmonn-pipeline run INPUT --out OUT [--tasks caption,transcribe,emotion] [--prompt NAME=TEXT] ...
    salmonn-pipeline demo [--dir DIR]
    salmonn-pipeline status OUT
    salmonn-pipeline plan INPUT --out OUT        what a run would do (nothing decoded or written)
    salmonn-pipeline report OUT [--html FILE]    how a run went
    salmonn-pipeline export OUT --format srt|vtt|jsonl|txt --task transcribe --to DIR
    salmonn-pipeline weights fetch|verify|convert
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from pipelines import lifecycle
from pipelines.cli_args import add_run_args, build_tasks, config_from_args, parse_kv, parse_value
from pipelines.config import ConfigError, PipelineConfig, check_output
from pipelines.ops.commands import add_subcommands
from pipelines.ops.search_cmd import add_search_subcommands
from pipelines.output.health import TableDamaged

__all__ = ["build_parser", "build_tasks", "config_from_args", "main", "parse_kv", "parse_value"]

log = logging.getLogger("salmonn_pipeline")
PROG = "salmonn-pipeline"

TINY_WARNING = (
    "NOTE: the 'tiny' model preset has RANDOM weights: its captions, transcripts and emotion tags are "
    "meaningless text. It exists to exercise the pipeline; use --model salmonn-13b|salmonn-7b|PATH with "
    "real weights for real results."
)


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import Interrupted
    from pipelines.run import RunFailed, one_line, run_pipeline

    cfg = config_from_args(args)
    check_output(cfg)   # --out is not a file, --resume names a run: before Ray
    if cfg.model == "tiny":
        print(TINY_WARNING, file=sys.stderr)
    try:
        summary = run_pipeline(cfg)
    except Interrupted as e:   # SIGTERM / SIGINT: complete files committed, the run record says interrupted
        print(f"{PROG}: {e}: the files completed so far are committed; run the same command again to "
              f"resume", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:  # the input location itself (a typo, or an empty prefix)
        print(f"{PROG}: error: input not found: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:   # the run record says failed; the same command resumes it
        # (a run stopped by the removal guard changed nothing: the message names the flag to use)
        again = ("nothing was written; rerun with the flag it names to go on" if e.message.startswith("TooManyRemovals")
                 else "the same command resumes the run")
        print(f"{PROG}: error: {e} (traceback: {cfg.out.rstrip('/')}/_runs/{e.run_id}/error.txt; {again})",
              file=sys.stderr)
        return 1
    except TableDamaged as e:   # a table lost data files: refused before anything was written
        print(f"{PROG}: error: {e} (nothing was written; or run with --repair)", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - before the run started (listing, output location)
        log.debug("run failed before it started", exc_info=True)
        print(f"{PROG}: error: the run could not start: {one_line(e)}", file=sys.stderr)
        return 1
    print(summary.format())
    if cfg.model == "tiny":
        print(TINY_WARNING)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from pipelines.run import run_pipeline
    from pipelines.synth import make_demo_clips

    base = os.path.abspath(args.dir)
    audio, out = os.path.join(base, "audio"), os.path.join(base, "out")
    os.makedirs(audio, exist_ok=True)
    clips = make_demo_clips(audio)
    print(f"demo: wrote {len(clips)} clips to {audio}")
    print(TINY_WARNING)
    # timed text on: languages and word times (the tiny random Whisper decoder), subtitles cut from words
    cfg = PipelineConfig(input=audio, out=out, model="tiny", num_cpus=args.num_cpus, progress=not args.no_progress,
                         timed_text=True)
    summary = run_pipeline(cfg)
    print(summary.format())
    print(f"\nTables (Delta Lake, Parquet data files): {out}/files/  and  {out}/segments/   "
          f"(run records: {out}/_runs/)")
    print("Read the latest result per file, e.g. with DuckDB (both tables are Delta Lake tables):")
    segments = os.path.join(out, "segments")
    query = (f"import duckdb, deltalake; segs = deltalake.QueryBuilder().register('segs', deltalake.DeltaTable("
             f"{segments!r})).execute('SELECT uri, task, start_s, text FROM segs').read_all(); "
             "duckdb.sql('SELECT * FROM segs ORDER BY uri, start_s, task').show()")
    print(f"  {shlex.quote(sys.executable)} -c {shlex.quote(query)}")
    print("or in Python:")
    print(f"  from pipelines.output import OutputStore; OutputStore('{out}').read_table('segments', latest=True)")
    print(f"Status: salmonn-pipeline status {out}")
    print(f"Subtitles cut from word times: salmonn-pipeline export {out} --format srt --task transcribe "
          f"--to {os.path.join(base, 'subtitles')}")
    print(f"Search (the run kept the index current): salmonn-pipeline search {out} \"word\" --task transcribe")
    print(TINY_WARNING)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.ops.status import status_text
    from pipelines.output import OldLayoutError

    try:
        print(status_text(args.out, parse_kv(args.storage_option, "--storage-option")))
    except OldLayoutError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except TableDamaged as e:   # one line per table that lost data files
        for line in e.lines():
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 1
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``salmonn-pipeline: error: ...``, exit code 2) instead of the
    usage block; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with code 2 (a usage error)."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="analyse an archive (folder, bucket prefix, glob or manifest)")
    p.add_argument("input", nargs="+", help="directory/prefix URI, glob, file, or manifest (.parquet/.csv/.txt)")
    p.add_argument("--out", required=True, help="output URI (local path or s3://...)")
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="make sample clips and run the tiny (random-weight) model on local Ray")
    p.add_argument("--dir", default="salmonn-demo", help="where to write clips and tables (default ./salmonn-demo)")
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="runs, counts and error types of an output location")
    p.add_argument("out")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_status)

    add_subcommands(sub)  # plan, report, export, weights
    add_search_subcommands(sub)  # index, search
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: its return value is the process's exit code (``pipelines.lifecycle``
    ends it in order, so a command that did its work exits 0, never 134 at teardown)."""
    return lifecycle.finish(_dispatch(argv))


def _dispatch(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TableDamaged as e:   # any reader (export, report, plan, maintain ...) that met a lost data file
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, lifecycle.Interrupted) as e:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return e.exit_code if isinstance(e, lifecycle.Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
