"""Corr2Cause evaluation problems, read from the official CSV format.

Format: `input,label,num_variables,template`, as in the released test split. Problems also seen
in training are excluded before scoring, so a fine-tuned model is never credited for recall.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from pydantic import BaseModel

from tracesft.errors import TracesftError
from tracesft.sft_dataset import normalize_query

EVAL_COLUMNS = ("input", "label", "num_variables", "template")


class EvalProblem(BaseModel):
    query: str
    label: int
    num_variables: int
    template: str
    row: int  # 0-based data row in the CSV, to point back at the source


def load_eval_set(path: str | Path) -> list[EvalProblem]:
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in EVAL_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise TracesftError(
                    f"{path}: missing column(s) {missing}; a Corr2Cause eval set has columns {', '.join(EVAL_COLUMNS)}."
                )
            problems = [_to_problem(row, index, path) for index, row in enumerate(reader)]
    except FileNotFoundError:
        raise TracesftError(f"{path}: eval set not found (check the `eval_set` setting).") from None
    if not problems:
        raise TracesftError(f"{path}: the eval set has no rows.")
    return problems


def _to_problem(row: dict[str, str], index: int, path: Path) -> EvalProblem:
    where = f"{path} (data row {index}, line {index + 2})"
    missing = [column for column in EVAL_COLUMNS if row.get(column) is None]
    if missing:
        raise TracesftError(f"{where}: the row has no value for {missing}; every row needs {', '.join(EVAL_COLUMNS)}.")
    if not (row.get("input") or "").strip():
        raise TracesftError(f"{where}: column 'input' is empty.")
    if row.get("label") not in ("0", "1"):
        raise TracesftError(f"{where}: column 'label' must be 0 or 1, got {row.get('label')!r}.")
    try:
        num_variables = int(row["num_variables"])
    except (TypeError, ValueError):
        raise TracesftError(f"{where}: column 'num_variables' must be an integer, got {row.get('num_variables')!r}.") from None
    return EvalProblem(
        query=row["input"], label=int(row["label"]), num_variables=num_variables, template=row["template"], row=index
    )


def exclude_seen(problems: list[EvalProblem], seen_queries: set[str]) -> list[EvalProblem]:
    return [p for p in problems if normalize_query(p.query) not in seen_queries]


def eval_set_hash(path: str | Path) -> str:
    """SHA-256 of the eval set's bytes: the cache key of loading it, and a lineage tag."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise TracesftError(f"{path}: eval set not found (check the `eval_set` setting).") from None
