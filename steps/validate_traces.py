from typing import Annotated

from zenml import log_metadata, step
from zenml.types import HTMLString

from tracesft.config import QualitySettings, RegistrySettings
from tracesft.evaluate.eval_set import load_eval_set
from tracesft.train.modeling import load_tokenizer
from tracesft.data.quality import (
    QualityReport,
    log_report_to_mlflow,
    previous_accepted_profile,
    report_html,
    validate_traces as run_checks,
)
from tracesft.data.traces import TraceBatch

from steps.run_context import zenml_run_tags


@step
def validate_traces(
    verified: TraceBatch,
    base_model: str,
    base_model_revision: str | None,
    max_seq_length: int,
    eval_set: str,
    settings: QualitySettings,
    registry: RegistrySettings,
) -> tuple[Annotated[QualityReport, "data_quality_report"], Annotated[HTMLString, "data_quality_view"]]:
    """Run the Great Expectations checks; the dataset step refuses to build on a failed report.

    The drift checks compare against the last dataset the gate accepted in this configuration's
    MLflow experiment. The report is logged to MLflow as a run of its own (tagged with this ZenML
    run) before any verdict is acted on, so a failed gate leaves its evidence in MLflow too, and a
    passed one becomes the next run's drift baseline. The baseline is not part of the cache key:
    a cached step keeps the verdict its inputs were first given.
    """
    tokenizer = load_tokenizer(base_model, base_model_revision)
    baseline = previous_accepted_profile(registry)
    report = run_checks(verified, tokenizer, max_seq_length, load_eval_set(eval_set), settings, baseline)
    mlflow_run_id = log_report_to_mlflow(report, registry, zenml_run_tags())
    log_metadata(
        {
            "success": report.success,
            "failed_checks": [o.message() for o in report.failures()],
            "skipped_checks": {o.check: o.skipped for o in report.outcomes if o.skipped},
            "drift_baseline": report.baseline or "none",
            "eval_rows_removed_as_traced": [o.eval_row for o in report.eval_overlap],
            "held_out_eval_problems": report.held_out_eval_problems,
            "mlflow_run_id": mlflow_run_id,
        }
    )
    return report, HTMLString(report_html(report))
