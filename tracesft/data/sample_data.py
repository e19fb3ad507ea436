"""The demo's bundled data, and how its trace files were made (so anyone can make them again).

The problems are a seeded, label-stratified sample of the official Corr2Cause test split:
problems for the teacher traces and a disjoint set for evaluation, bundled as CSVs in
`tracesft/bundled/` (`tests/test_sample_data.py` holds the sampling and checks it against the
official split). `sample_trace_files` turns the trace problems into two GPT-style result files
(one JSON object with run metadata, one JSONL, with different harness field names) whose
reasoning restates each problem and ends in an answer. A few are deliberately bad, one of each
kind verification must catch: wrong answers, a `correct` flag that contradicts the text, an
answer that cannot be read, and a duplicate.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable
from importlib import resources

DATA = resources.files("tracesft") / "bundled"
TRACE_PROBLEMS_CSV = "corr2cause_trace_problems.csv"
EVAL_CSV = "corr2cause_eval.csv"
TRACE_FILES = ("gpt4o_corr2cause_run1.json", "gpt4o_corr2cause_run2.jsonl")

WRONG_ANSWER = (3, 17, 41, 66, 88)  # indices of problems whose trace answers wrongly
FLAG_CONTRADICTS = (9, 58)  # answer wrong, but the harness says "correct"
UNPARSEABLE = (25, 73)  # trace breaks off before answering
DUPLICATED = 30  # this record appears twice


def bundled_rows(name: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO((DATA / name).read_text(encoding="utf-8"))))


def reasoning_text(query: str, answer_yes: bool, rng: random.Random) -> str:
    """A GPT-style reasoning paragraph that restates the problem and argues for the given answer."""
    premise = query.split("Hypothesis:")[0].replace("Premise:", "").strip()
    hypothesis = query.split("Hypothesis:")[-1].strip()
    relations = premise.split("as follows:")[-1].strip()
    n_corr = len(re.findall(r"correlates with", relations))
    n_indep = len(re.findall(r"independent of", relations))
    opening = rng.choice(
        [
            "Let me work through the statistical relations given in the premise.",
            "First, I list what the premise tells us about the variables.",
            "We need to check whether the causal claim is forced by the stated (in)dependencies.",
        ]
    )
    verdict = (
        "In every causal graph compatible with these relations, the claimed relation holds, so the hypothesis must be true."
        if answer_yes
        else "At least one causal graph compatible with these relations contradicts the claim, so the hypothesis is not implied."
    )
    return (
        f"{opening}\n\nThe premise states {n_corr} correlation(s) and {n_indep} independence statement(s): "
        f"{relations}\n\nThe hypothesis to test is: \"{hypothesis}\"\n\n"
        "Using the PC-style reasoning: an independence between two variables removes the edge between them, "
        "and a conditional independence tells us which variables can (or cannot) be colliders on the path.\n\n"
        f"{verdict}"
    )


Reasoning = Callable[[str, bool, random.Random], str]  # (query, answer_yes, rng) -> the trace before its answer


def _trace(query: str, answer_yes: bool, index: int, rng: random.Random, reasoning: Reasoning) -> str:
    body = reasoning(query, answer_yes, rng)
    if index in UNPARSEABLE:
        return body.rsplit("\n\n", 1)[0] + "\n\nI am still unsure which of the candidate graphs applies here"
    return f"{body}\n\nAnswer: {'Yes' if answer_yes else 'No'}"


def sample_trace_files(problems: list[dict], seed: int = 11, reasoning: Reasoning = reasoning_text) -> dict[str, str]:
    """The two result files' names and contents; deterministic for a given problem list, seed and
    `reasoning` (how a trace argues before its answer line)."""
    rng = random.Random(seed)
    run1, run2 = [], []
    for index, problem in enumerate(problems):
        gold = int(problem["label"])
        right = index not in WRONG_ANSWER + FLAG_CONTRADICTS
        answer_yes = (gold == 1) == right
        trace = _trace(problem["input"], answer_yes, index, rng, reasoning)
        flagged = right or index in FLAG_CONTRADICTS
        copies = 2 if index == DUPLICATED else 1
        if index % 2 == 0:
            run1 += [
                {"input": problem["input"], "response": trace, "prediction": "Yes" if answer_yes else "No", "label": gold, "correct": flagged}
            ] * copies
        else:
            run2 += [
                {"question": problem["input"], "reasoning": trace, "predicted_answer": "yes" if answer_yes else "no", "ground_truth": gold, "is_correct": flagged}
            ] * copies
    document = {"model": "gpt-4o-2024-08-06", "benchmark": "corr2cause", "split": "test", "temperature": 0.0, "predictions": run1}
    return {
        TRACE_FILES[0]: json.dumps(document, indent=1, ensure_ascii=False) + "\n",
        TRACE_FILES[1]: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run2),
    }


def tokenizer_corpus() -> list[str]:
    """Text the demo's tiny tokenizer is trained on: every bundled problem and trace."""
    problems = bundled_rows(TRACE_PROBLEMS_CSV) + bundled_rows(EVAL_CSV)
    traces = sample_trace_files(bundled_rows(TRACE_PROBLEMS_CSV)).values()
    return [p["input"] for p in problems] + list(traces)
