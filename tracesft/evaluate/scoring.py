"""Scoring any model's raw outputs against a Corr2Cause CSV (`tracesft score`).

Predictions are JSONL, one object per line with `input` (the CSV's `input` text) and `output`
(the model's raw text). Each output goes through the same answer reader and metrics as the
pipeline's own evaluation, so a number from here and one from the pipeline mean the same thing.
Inputs are matched after collapsing whitespace; every way the two files can disagree is an error
that names the line to fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from tracesft.data.answers import extract_answer
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem, load_eval_set
from tracesft.evaluate.evaluation import Prediction, score_predictions
from tracesft.evaluate.metrics import ScoreReport
from tracesft.data.sft_dataset import normalize_query
from tracesft.user_paths import jsonl_lines

_SHOWN = 5  # how many offending rows an error message lists


def load_predictions(path: str | Path) -> dict[str, tuple[int, str]]:
    """Normalised input -> (line number, raw output), from a predictions JSONL file."""
    path = Path(path)
    outputs: dict[str, tuple[int, str]] = {}
    for number, line in jsonl_lines(path, "predictions file"):
        if isinstance(line, TracesftError):
            raise line
        if not line.strip():
            continue
        where = f"{path} (line {number})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TracesftError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object.") from None
        if not isinstance(record, dict):
            raise TracesftError(f"{where}: expected a JSON object with 'input' and 'output', got {type(record).__name__}.")
        for field in ("input", "output"):
            if not isinstance(record.get(field), str):
                problem = "is missing" if field not in record else f"must be a string, got {type(record[field]).__name__}"
                raise TracesftError(f"{where}: field '{field}' {problem}; each line needs 'input' (the CSV's text) and 'output' (the raw model text).")
        key = normalize_query(record["input"])
        if key in outputs and outputs[key][1] != record["output"]:
            raise TracesftError(
                f"{where}: a second, different output for the input of line {outputs[key][0]}; keep one prediction per problem."
            )
        outputs[key] = (number, record["output"])
    if not outputs:
        raise TracesftError(f"{path}: no predictions in the file.")
    return outputs


def score_file(gold_path: str | Path, predictions_path: str | Path, allow_missing: bool = False) -> ScoreReport:
    """Score the predictions of `predictions_path` against the labels of `gold_path`."""
    gold = load_eval_set(gold_path)
    outputs = load_predictions(predictions_path)
    by_input: dict[str, EvalProblem] = {}
    for problem in gold:
        by_input.setdefault(normalize_query(problem.query), problem)
    unmatched = sorted(line for key, (line, _) in outputs.items() if key not in by_input)
    if unmatched:
        raise TracesftError(
            f"{predictions_path}: {len(unmatched)} prediction(s) whose 'input' is not a problem of {gold_path} "
            f"(lines {_listing(unmatched)}); 'input' must be the CSV's input text."
        )
    missing = [p.line for p in gold if normalize_query(p.query) not in outputs]
    if missing and not allow_missing:
        raise TracesftError(
            f"{predictions_path}: no prediction for {len(missing)} of {len(gold)} problems of {gold_path} "
            f"(the rows on its lines {_listing(missing)}); add them, or pass --allow-missing to score only the predicted ones."
        )
    predictions = [
        Prediction(
            row=p.row,
            label=p.label,
            template=p.template,
            num_variables=p.num_variables,
            output=outputs[key][1],
            answer=extract_answer(outputs[key][1]),
            input=p.query,
        )
        for p in gold
        if (key := normalize_query(p.query)) in outputs
    ]
    return score_predictions(predictions)


def _listing(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_SHOWN])
    return shown + (f", … {len(numbers) - _SHOWN} more" if len(numbers) > _SHOWN else "")
