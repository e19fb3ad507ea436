"""Trace files and eval sets made with the project's generator, shaped to pass or fail the
data-quality gate's checks: one label, missing templates or variable counts, long traces,
near-duplicate reasoning, a dominating file. Every trace is right, so verification keeps it and
only the gate can object."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from tracesft.data.generator import generate_problems, synthetic_predictions, write_jsonl
from tracesft.data.quality import coverage_template
from tracesft.evaluate.eval_set import EVAL_COLUMNS, EvalProblem


def problems(count: int, seed: int, positive_share: float = 0.3, min_variables: int = 4, max_variables: int = 6) -> list[dict]:
    """Corr2Cause CSV rows (`input,label,num_variables,template`), no two alike, lengths as in Corr2Cause.

    The generator's sparse graphs list many independences, so its premises vary in length far more
    than the official split's (up to 9x the median against the bundled sample's 1.8x): problems
    over 1.5x the median length of twice as many drawn are left out, so only a test that means to
    make long traces makes them.
    """
    pool = generate_problems(2 * count, seed, min_variables, max_variables, positive_share)
    limit = 1.5 * statistics.median(len(row["input"]) for row in pool)
    return [row for row in pool if len(row["input"]) <= limit][:count]


def predictions(rows: list[dict], seed: int = 0) -> list[dict]:
    """A GPT-style prediction record per problem, each answering right."""
    return list(synthetic_predictions(rows, wrong_share=0.0, seed=seed))


def without(rows: list[dict], *, template: str | None = None, num_variables: int | None = None) -> list[dict]:
    """The rows minus one relation template (as coverage counts it) or one variable count."""
    return [
        r for r in rows
        if coverage_template(r["template"]) != template and int(r["num_variables"]) != num_variables
    ]


def lengthened(record: dict, times: int) -> dict:
    """The record with its reasoning (everything before the answer line) said `times` times."""
    reasoning, answer = record["response"].rsplit("\n\nAnswer:", 1)
    return record | {"response": "\n\n".join([reasoning] * times) + "\n\nAnswer:" + answer}


def recased(record: dict) -> dict:
    """The same reasoning with its opening sentence in capitals: not an exact duplicate, a near one."""
    opening, rest = record["response"].split("\n\n", 1)
    return record | {"response": opening.upper() + "\n\n" + rest}


def write_traces(folder: Path, files: dict[str, list[dict]]) -> Path:
    """One JSONL result file per entry; returns the folder."""
    for name, records in files.items():
        write_jsonl(folder / name, records)
    return folder


def write_eval_set(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EVAL_COLUMNS)
        writer.writeheader()
        writer.writerows({c: r[c] for c in EVAL_COLUMNS} for r in rows)
    return path


def eval_problems(rows: list[dict]) -> list[EvalProblem]:
    return [
        EvalProblem(query=r["input"], label=int(r["label"]), num_variables=int(r["num_variables"]), template=r["template"], row=i)
        for i, r in enumerate(rows)
    ]
