"""Corr2Cause's own scoring: F1 of the "valid" class, as the official scorer computes it.

An answer that cannot be parsed counts as "not valid" (the official scorer's rule), and its rate
is reported alongside so a model that stops answering cannot hide behind a high accuracy.
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel

from tracesft.answers import Answer


class Scores(BaseModel):
    n: int
    f1: float
    precision: float
    recall: float
    accuracy: float
    parse_failure_rate: float
    confusion: dict[str, int]  # tp, fp, fn, tn with "valid" as the positive class


class ScoreReport(Scores):
    by_template: dict[str, Scores]
    by_num_variables: dict[str, Scores]


def scores(labels: list[int], answers: list[Answer]) -> Scores:
    predicted = [1 if a == "yes" else 0 for a in answers]
    tp = sum(1 for y, p in zip(labels, predicted) if y == 1 and p == 1)
    fp = sum(1 for y, p in zip(labels, predicted) if y == 0 and p == 1)
    fn = sum(1 for y, p in zip(labels, predicted) if y == 1 and p == 0)
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return Scores(
        n=n,
        f1=f1,
        precision=precision,
        recall=recall,
        accuracy=(tp + tn) / n if n else 0.0,
        parse_failure_rate=sum(1 for a in answers if a == "none") / n if n else 0.0,
        confusion={"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    )


def score_report(labels: list[int], answers: list[Answer], templates: list[str], num_variables: list[int]) -> ScoreReport:
    def breakdown(keys: list[str]) -> dict[str, Scores]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, key in enumerate(keys):
            groups[key].append(index)
        return {
            key: scores([labels[i] for i in idx], [answers[i] for i in idx]) for key, idx in sorted(groups.items())
        }

    return ScoreReport(
        **scores(labels, answers).model_dump(),
        by_template=breakdown(templates),
        by_num_variables=breakdown([str(n) for n in num_variables]),
    )
