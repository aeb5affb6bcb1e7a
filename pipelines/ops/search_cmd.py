"""`salmonn-pipeline index` and `salmonn-pipeline search`: the full-text index beside the tables.

    salmonn-pipeline index OUT [--rebuild] [--json]
    salmonn-pipeline search OUT "query" [--task transcribe] [--language en] [--where URI_PREFIX]
                            [--run RUN_ID] [--limit N] [--json]

``pipelines.cli.build_parser`` registers them with ``add_search_subcommands(sub)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.cli_args import parse_kv


def add_search_subcommands(sub: Any) -> None:
    p = sub.add_parser("index", help="bring the full-text search index (OUT/_search) up to the tables: only "
                                     "files whose rows changed are re-indexed; --rebuild builds it again")
    p.add_argument("out")
    p.add_argument("--rebuild", action="store_true", help="build the index again from the tables")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="ranked windows where the text says QUERY: uri, time, task, snippet "
                                      "(words: stemmed, any; \"a phrase\": exact, required; -word: excluded)")
    p.add_argument("out")
    p.add_argument("query")
    p.add_argument("--task", action="append", help="only this task's text (repeatable)")
    p.add_argument("--language", help="only windows of this language (rows with word timings, schema v5)")
    p.add_argument("--where", metavar="URI_PREFIX", help="only inputs whose URI starts with this")
    p.add_argument("--run", metavar="RUN_ID", help="only rows written by this run")
    p.add_argument("--limit", type=int, default=10, help="hits to show (default 10)")
    p.add_argument("--json", action="store_true", help="print the stable JSON document (README: Search)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_search)


def cmd_index(args: argparse.Namespace) -> int:
    from pipelines.output import OldLayoutError, OutputStore
    from pipelines.search import IndexBusy, update_index

    store = OutputStore(args.out, parse_kv(args.storage_option, "--storage-option"))
    try:
        update = update_index(store, rebuild=args.rebuild)
    except (IndexBusy, OldLayoutError) as e:
        print(f"index: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(update.to_dict(), sort_keys=True) if args.json else update.format())
    return 0


def _time(s: float) -> str:
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{sec:06.3f}" if h else f"{int(m)}:{sec:06.3f}"


def cmd_search(args: argparse.Namespace) -> int:
    from pipelines.output import OldLayoutError
    from pipelines.search import NoIndex, SearchError, hits_json, index_status, search

    options = parse_kv(args.storage_option, "--storage-option")
    filters = {"task": args.task, "language": args.language, "uri_prefix": args.where, "run_id": args.run}
    try:
        hits = search(args.out, args.query, limit=args.limit, storage_options=options, **filters)
        status = index_status(args.out, options)
    except SearchError as e:
        print(f"search: {e}", file=sys.stderr)
        return 2
    except (NoIndex, OldLayoutError) as e:
        print(f"search: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if args.json:
        doc = hits_json(args.out, args.query, hits, filters=filters, limit=args.limit, index=status.to_dict())
        print(json.dumps(doc, ensure_ascii=False, indent=1))
        return 0
    if not status.current:
        print(f"search: note: the index reflects files v{(status.versions or {}).get('files')}, segments "
              f"v{(status.versions or {}).get('segments')}; the tables are at v{status.tables.get('files')}, "
              f"v{status.tables.get('segments')}: `salmonn-pipeline index {args.out}` brings it up to date",
              file=sys.stderr)
    if not hits:
        print("no hits")
    for h in hits:
        when = f"{_time(h.start_s)}-{_time(h.end_s)}"
        print(f"{h.rank:3d}. {h.uri}  {when}  [{h.task}]  score {h.score:.2f}"
              + ("  (word times)" if h.time_source == "words" else ""))
        print(f"     {h.snippet_marked}")
    return 0
