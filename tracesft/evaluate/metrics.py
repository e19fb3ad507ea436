"""Corr2Cause's own scoring: F1 of the "valid" class, as the official scorer computes it.

An answer that cannot be parsed counts as "not valid" (the official scorer's rule), and its rate
is reported alongside so a model that stops answering cannot hide behind a high accuracy.

Two models scored on the same problems are compared with a paired bootstrap of the F1 difference:
resampling problems (not each model separately) keeps the pairing, so the interval reflects how
much the difference would move on another draw of problems like these, and a promotion gate that
asks for its lower bound to clear zero does not promote noise.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from pydantic import BaseModel

from tracesft.data.answers import Answer


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


class F1DifferenceInterval(BaseModel):
    """A bootstrap confidence interval of F1(tuned) - F1(base) on the same problems."""

    observed: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    n: int  # problems both models answered


def paired_bootstrap_f1_difference(
    labels: list[int],
    base_answers: list[Answer],
    tuned_answers: list[Answer],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> F1DifferenceInterval:
    """Percentile interval of the F1 difference over problems resampled with replacement.

    Each resample draws n problems with replacement, the same draw for both models, and scores F1
    exactly as `scores` does (so "none" counts as "not valid"). A resample's draw is held as
    per-problem counts, which turns every confusion cell into one dot product.
    """
    n = len(labels)
    if not (len(base_answers) == len(tuned_answers) == n):
        raise ValueError(f"paired bootstrap needs one answer per label from each model: {n}, {len(base_answers)}, {len(tuned_answers)}")
    if n == 0:
        raise ValueError("paired bootstrap needs at least one problem")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    gold = np.asarray(labels) == 1
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    differences = _f1(counts, gold, tuned_answers) - _f1(counts, gold, base_answers)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    observed = _f1(np.ones((1, n), dtype=np.int64), gold, tuned_answers) - _f1(np.ones((1, n), dtype=np.int64), gold, base_answers)
    return F1DifferenceInterval(
        observed=float(observed[0]), low=float(low), high=float(high), confidence=confidence, n_resamples=n_resamples, n=n
    )


def _f1(counts: np.ndarray, gold: np.ndarray, answers: list[Answer]) -> np.ndarray:
    """F1 of the valid class for each row of `counts` (how often each problem was drawn)."""
    predicted = np.asarray([a == "yes" for a in answers])
    tp = counts @ (gold & predicted)
    fp = counts @ (~gold & predicted)
    fn = counts @ (gold & ~predicted)
    denominator = 2 * tp + fp + fn  # F1 = 2tp / (2tp + fp + fn); 0 when there is no tp at all
    return np.divide(2.0 * tp, denominator, out=np.zeros(len(counts)), where=denominator > 0)
