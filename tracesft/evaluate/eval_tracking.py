"""The evaluation in MLflow: metrics, the per-example predictions as tables, the report and plot.

Everything lands in the adapter's training run (the run the registered version points at), so one
run holds how the adapter was made and how it scored. The functions log into the active run;
`log_evaluation_run` opens the right one.
"""

from __future__ import annotations

import re

import pandas as pd

from tracesft.train.adapter import LoraAdapter
from tracesft.evaluate.comparison import ModelComparison
from tracesft.config import RegistrySettings
from tracesft.evaluate.eval_report import evaluation_figure, render_evaluation_html
from tracesft.evaluate.evaluation import EvalReport, Prediction
from tracesft.evaluate.metrics import ScoreReport
from tracesft.train.tracking import mlflow_tracking

ARTIFACT_DIR = "evaluation"
_METRICS = ("f1", "precision", "recall", "accuracy", "parse_failure_rate")


def evaluation_metrics(report: EvalReport, prefix: str) -> dict[str, float]:
    """`{prefix}_f1` … on the eval set, `{prefix}_renamed_*`, `{prefix}_validation_*`, breakdowns,
    and what generation took (`{prefix}_generation_s`, and `_tokens_per_s` where the engine counted)."""
    metrics = _scores(report.scores, prefix)
    for group, scores in report.scores.by_template.items():
        metrics[f"{prefix}_f1_template_{_slug(group)}"] = scores.f1
    for group, scores in report.scores.by_num_variables.items():
        metrics[f"{prefix}_f1_variables_{_slug(group)}"] = scores.f1
    if report.renamed is not None:
        metrics |= _scores(report.renamed.scores, f"{prefix}_renamed")
        metrics[f"{prefix}_robustness_f1_drop"] = float(report.robustness_f1_drop or 0.0)
    if report.validation is not None:
        metrics |= _scores(report.validation.scores, f"{prefix}_validation")
    generation = report.generation
    if generation is not None and generation.seconds is not None:
        metrics[f"{prefix}_generation_s"] = generation.seconds
    if generation is not None and generation.tokens_per_s is not None:
        metrics[f"{prefix}_generation_tokens_per_s"] = generation.tokens_per_s
    return metrics


def predictions_table(predictions: list[Prediction]) -> pd.DataFrame:
    return pd.DataFrame([p.model_dump() for p in predictions])


def log_evaluation_to_mlflow(report: EvalReport, prefix: str) -> None:
    """One model's metrics and its predictions (a table per set) into the active MLflow run."""
    import mlflow

    mlflow.log_metrics(evaluation_metrics(report, prefix))
    sets = {"eval": report.predictions}
    if report.renamed is not None:
        sets["renamed"] = report.renamed.predictions
    if report.validation is not None:
        sets["validation"] = report.validation.predictions
    for name, predictions in sets.items():
        if predictions:
            mlflow.log_table(predictions_table(predictions), artifact_file=f"{ARTIFACT_DIR}/{prefix}_{name}_predictions.json")


def log_comparison_to_mlflow(base: EvalReport, tuned: EvalReport, comparison: ModelComparison) -> None:
    """The F1 difference and its interval as metrics, the report page, the plot, the raw comparison."""
    import mlflow

    mlflow.log_metrics(comparison.metrics())
    mlflow.log_dict(comparison.model_dump(), f"{ARTIFACT_DIR}/comparison.json")
    mlflow.log_text(render_evaluation_html(base, tuned, comparison), f"{ARTIFACT_DIR}/report.html")
    mlflow.log_figure(evaluation_figure(base, tuned), f"{ARTIFACT_DIR}/f1_by_template.png")


def log_evaluation_run(
    adapter: LoraAdapter, base: EvalReport, tuned: EvalReport, comparison: ModelComparison, settings: RegistrySettings
) -> str:
    """Log both evaluations and their comparison into the adapter's training run; return its id."""
    import mlflow

    run_id = adapter.metadata.get("mlflow_run_id")
    with (
        mlflow_tracking(settings) as experiment_id,
        mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run,
    ):
        log_evaluation_to_mlflow(base, "base")
        log_evaluation_to_mlflow(tuned, "finetuned")
        log_comparison_to_mlflow(base, tuned, comparison)
        return run.info.run_id


def _scores(scores: ScoreReport, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{name}": float(getattr(scores, name)) for name in _METRICS}


def _slug(text: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . /` and spaces; keep them plain."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
