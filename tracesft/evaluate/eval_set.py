"""Corr2Cause evaluation problems, read from the official CSV format.

Format: `input,label,num_variables,template`, as in the released test split. Problems also seen
in training are excluded before scoring, so a fine-tuned model is never credited for recall.
A full test split costs hours of generation, so a seeded sample stratified by template and label
keeps the mix of the full set at a fraction of the cost. The traces' own validation split is a
second eval set: problems of the teacher's distribution the adapter never trained on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel

from tracesft.errors import TracesftError
from tracesft.data.sft_dataset import SFTDataset, normalize_query
from tracesft.evaluate.variable_renaming import rename_variables
from tracesft.user_paths import read_bytes, read_text

EVAL_COLUMNS = ("input", "label", "num_variables", "template")


class EvalProblem(BaseModel):
    query: str
    label: int
    num_variables: int
    template: str
    row: int  # 0-based data row, the problem's identity within its set
    # Where messages point: the line of the CSV the row starts on, counted from 1 with the header
    # as line 1 (docs/architecture.md, "Positions in files"); None for problems not read from a CSV.
    line: int | None = None


def load_eval_set(path: str | Path) -> list[EvalProblem]:
    path = Path(path)
    rows = csv.reader(io.StringIO(read_text(path, "eval set"), newline=""))
    problems: list[EvalProblem] = []
    start = 1  # the line the row being read starts on
    try:
        header = next(rows, [])
        missing = [c for c in EVAL_COLUMNS if c not in header]
        if missing:
            raise TracesftError(
                f"{path}: missing column(s) {missing}; a Corr2Cause eval set has columns {', '.join(EVAL_COLUMNS)}."
            )
        start = rows.line_num + 1
        for fields in rows:
            # A quoted field may span lines, so a row starts right after the previous one ended.
            line, start = start, rows.line_num + 1
            if fields:  # not a blank line
                problems.append(_to_problem(dict(zip(header, fields)), len(problems), line, path))
    except csv.Error as err:  # in practice only a field over the csv module's limit of 128 KiB
        raise TracesftError(
            f"{path} (line {start}): not readable as CSV ({err}); check the row's quotes: one that is never "
            "closed runs the field on to the end of the file."
        ) from None
    if not problems:
        raise TracesftError(f"{path}: the eval set has no rows.")
    return problems


def _to_problem(row: dict[str, str], index: int, line: int, path: Path) -> EvalProblem:
    where = f"{path} (line {line})"
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
        query=row["input"],
        label=int(row["label"]),
        num_variables=num_variables,
        template=row["template"],
        row=index,
        line=line,
    )


def exclude_seen(problems: list[EvalProblem], seen_queries: set[str]) -> list[EvalProblem]:
    return [p for p in problems if normalize_query(p.query) not in seen_queries]


def eval_set_hash(path: str | Path) -> str:
    """SHA-256 of the eval set's bytes: the cache key of loading it, and a lineage tag."""
    return hashlib.sha256(read_bytes(Path(path), "eval set (the `eval_set` setting)")).hexdigest()


def stratified_sample(problems: list[EvalProblem], size: int, seed: int) -> list[EvalProblem]:
    """`size` problems drawn without replacement, each template × label stratum in proportion.

    Strata get their rounded-down share first, and the seats left go to the strata with the
    largest remainders (ties broken by the seeded shuffle), so the sample has exactly `size`
    problems and its mix matches the full set's as closely as whole numbers allow. The result
    keeps the CSV's row order.
    """
    if size >= len(problems):
        return list(problems)
    rng = random.Random(seed)
    strata: dict[tuple[str, int], list[EvalProblem]] = defaultdict(list)
    for problem in problems:
        strata[(problem.template, problem.label)].append(problem)
    keys = sorted(strata)
    rng.shuffle(keys)
    quotas = {key: size * len(strata[key]) / len(problems) for key in keys}
    seats = {key: int(quotas[key]) for key in keys}
    for key in sorted(keys, key=lambda k: quotas[k] - seats[k], reverse=True)[: size - sum(seats.values())]:
        seats[key] += 1
    chosen = [p for key in keys for p in rng.sample(strata[key], seats[key])]
    return sorted(chosen, key=lambda p: p.row)


# Corr2Cause writes each relation template's hypothesis in one fixed wording. "X directly causes
# Y" serves both the parent and the child template, so those two cannot be told apart from text.
_TEMPLATE_WORDING = [
    (re.compile(r"There exists at least one collider\b"), "has_collider"),
    (re.compile(r"There exists at least one confounder\b"), "has_confounder"),
    (re.compile(r"\b[A-Z] causes something else which causes [A-Z]\b"), "non-parent ancestor"),
    (re.compile(r"\b[A-Z] is a cause for [A-Z], but not a direct one\b"), "non-child descendant"),
    (re.compile(r"\b[A-Z] directly causes [A-Z]\b"), "parent or child"),
]
_NUM_VARIABLES = re.compile(r"closed system of (\d+) variables?")


def validation_problems(dataset: SFTDataset) -> list[EvalProblem]:
    """The SFT validation split as eval problems, one per distinct query.

    Trace records carry the query and the gold label only; the template and number of variables
    the breakdowns need are read from the query's fixed wording ("unknown" / 0 where it has none).
    `row` numbers the distinct queries in their order in the split.
    """
    problems: dict[str, EvalProblem] = {}
    for record in dataset.validation:
        key = normalize_query(record.query)
        if key in problems:
            continue
        hypothesis = record.query.rsplit("Hypothesis:", 1)[-1]
        template = next((name for pattern, name in _TEMPLATE_WORDING if pattern.search(hypothesis)), "unknown")
        count = _NUM_VARIABLES.search(record.query)
        problems[key] = EvalProblem(
            query=record.query,
            label=record.gold,
            num_variables=int(count[1]) if count else 0,
            template=template,
            row=len(problems),
        )
    return list(problems.values())


def renamed_problems(problems: list[EvalProblem], source: str = "eval set") -> list[EvalProblem]:
    """The same problems with their variables renamed A→Z, B→Y, … (see `variable_renaming`)."""
    return [
        p.model_copy(update={"query": rename_variables(p.query, where=f"{source} (line {p.line})")}) for p in problems
    ]
