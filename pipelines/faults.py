"""Test hook: make a stage's worker process exit hard, to prove the run survives it.

Off unless the environment variable ``SALMONN_PIPELINE_FAULTS`` holds a JSON list of rules::

    [{"stage": "decode" | "infer", "uri_contains": "clip-03", "times": 1, "marker_dir": "/tmp/x"}]

A rule fires (``os._exit(77)``, the stand-in for a segfault in a decoder or a CUDA fault) when a
worker of ``stage`` handles a file whose URI contains ``uri_contains``. ``times`` bounds how often it
fires across all processes (counted with marker files in ``marker_dir``, since the process that
fires dies); ``times: -1`` fires every time. A rule with ``"sleep_s": S`` sleeps instead of
exiting (to slow a run down so that a test can interrupt it at a known point); one with
``"raise": "message"`` raises ``RuntimeError(message)`` (an ordinary failure of the work, which the
stage must turn into an error row without losing its neighbours).

``{"stage": "infer", "uri_contains": "clip-03", "corrupt_kind": "bogus"}`` gives that file's result
rows an unknown ``kind`` (a result the driver cannot use: it must fail that file, not the run).
``{"stage": "commit", "uri_contains": ..., "raise": "message"}`` makes the driver's commit of that
file raise (a failure of the run itself, e.g. an output that stopped being writable).

``{"stage": "infer", "oom_over_windows": N}`` makes an inference call of more than N windows raise
``torch.OutOfMemoryError``, as a GPU too small for the batch size does.
"""

from __future__ import annotations

import json
import os
import time
import uuid

ENV = "SALMONN_PIPELINE_FAULTS"
EXIT_CODE = 77


def maybe_crash(stage: str, uri: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for rule in json.loads(spec):
        if (rule.get("stage") != stage or rule.get("uri_contains", "") not in uri or "oom_over_windows" in rule
                or "corrupt_kind" in rule):
            continue
        if "sleep_s" in rule:
            time.sleep(float(rule["sleep_s"]))
            continue
        if "raise" in rule:
            raise RuntimeError(rule["raise"])
        times = int(rule.get("times", 1))
        if times >= 0:
            marker_dir = rule["marker_dir"]
            os.makedirs(marker_dir, exist_ok=True)
            fired = [n for n in os.listdir(marker_dir) if n.startswith(f"{stage}-")]
            if len(fired) >= times:
                continue
            with open(os.path.join(marker_dir, f"{stage}-{uuid.uuid4().hex}"), "w") as f:
                f.write(uri)
        os._exit(EXIT_CODE)


def maybe_run_out_of_memory(stage: str, n_windows: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for rule in json.loads(spec):
        limit = rule.get("oom_over_windows")
        if rule.get("stage") == stage and limit is not None and n_windows > int(limit):
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB "
                                         f"(injected: {n_windows} windows > {limit})")


def maybe_corrupt(stage: str, rows: list[dict]) -> None:
    """Apply ``corrupt_kind`` rules to result rows (in place)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for rule in json.loads(spec):
        if rule.get("stage") == stage and "corrupt_kind" in rule:
            for row in rows:
                if rule.get("uri_contains", "") in row["uri"]:
                    row["kind"] = rule["corrupt_kind"]
