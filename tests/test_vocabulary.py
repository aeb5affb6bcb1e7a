"""One vocabulary: error types, run states and shared constants are each defined once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipelines import decode
from pipelines.output import ledger
from schemas import vocabulary

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("salmonn", "schemas", "pipelines", "jobs", "benchmarks")


def _readme_error_table() -> dict[str, bool]:
    """error_type -> retried, from the README's `| error_type | retried | meaning |` table."""
    rows = {}
    in_table = False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| error_type |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            m = re.match(r"\|\s*`(\w+)`\s*\|\s*(yes|no)\s*\|", line)
            if m:
                rows[m.group(1)] = m.group(2) == "yes"
    return rows


def test_readme_lists_every_error_type_with_its_retry_flag():
    table = _readme_error_table()
    assert table, "README has no `| error_type | retried | meaning |` table"
    expected = {e.name: e.retryable for e in vocabulary.ERRORS.values()}
    assert table == expected


def test_stages_derive_their_error_types_from_the_vocabulary():
    assert set(decode.ERROR_TYPES) <= set(vocabulary.ERROR_TYPES)
    assert decode.ERROR_TYPES == vocabulary.error_types(vocabulary.DECODE)
    assert ledger.RETRYABLE_ERRORS == vocabulary.RETRYABLE_ERRORS
    assert "timeout" not in vocabulary.ERRORS  # nothing produces it
    assert "worker_crash" in vocabulary.ERRORS and not vocabulary.ERRORS["worker_crash"].retryable
    for e in vocabulary.ERRORS.values():
        assert e.stage in (vocabulary.DECODE, vocabulary.INFERENCE, vocabulary.DRIVER), e
        assert re.fullmatch(r"[a-z_]+", e.name) and e.description, e
    assert len(set(vocabulary.RUN_STATES)) == 4


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


_BUILTINS = {"frozenset", "tuple", "set", "int", "float", "str"}


def _is_literal(node: ast.expr) -> bool:
    """A value built from constants only (no other name): a definition, not an alias."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) or (isinstance(sub, ast.Name) and sub.id not in _BUILTINS):
            return False
    return True


def test_shared_constants_and_helpers_are_defined_once():
    """A constant assigned a literal, or a helper defined, in more than one module is a duplicate."""
    constants = {"SAMPLE_RATE", "BEATS_FILE", "PARTS_FILE", "RUN_RUNNING", "RUN_COMPLETED", "RUN_FAILED",
                 "RUN_INTERRUPTED", "STATUS_OK", "STATUS_ERROR", "STATUS_PARTIAL"}
    literal_defs: dict[str, list[str]] = {c: [] for c in constants}
    helper_defs: dict[str, list[str]] = {"extension": [], "id3": []}
    error_lists: list[str] = []
    names = set(vocabulary.ERROR_TYPES)
    for path, tree in _sources():
        rel = str(path.relative_to(ROOT))
        for node in tree.body:
            if isinstance(node, ast.Assign) and _is_literal(node.value):
                for target in node.targets:
                    for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(t, ast.Name) and t.id in constants:
                            literal_defs[t.id].append(rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                name = node.name.lower()
                if re.fullmatch(r"_?(file_)?extension", name):
                    helper_defs["extension"].append(f"{rel}:{node.name}")
                if "id3" in name:
                    helper_defs["id3"].append(f"{rel}:{node.name}")
            # a hand-written list of error types outside the vocabulary
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and rel != "schemas/vocabulary.py":
                values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(values) >= 3 and len(values) == len(node.elts) and set(values) <= names:
                    error_lists.append(f"{rel}:{node.lineno}")
    dupes = {k: v for k, v in {**literal_defs, **helper_defs}.items() if len(v) > 1}
    assert not dupes, f"defined more than once: {dupes}"
    missing = {k for k, v in literal_defs.items() if not v}
    assert not missing, f"not defined anywhere (renamed?): {missing}"
    assert not error_lists, f"error types listed by hand (use schemas.vocabulary): {error_lists}"
