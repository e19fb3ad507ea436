from typing import Annotated

from zenml import log_metadata, step
from zenml.types import HTMLString

from tracesft.train.adapter import LoraAdapter
from tracesft.evaluate.comparison import ModelComparison, compare_models as compare
from tracesft.config import EvalSettings, RegistrySettings
from tracesft.evaluate.eval_report import render_evaluation_html
from tracesft.evaluate.eval_tracking import log_evaluation_run
from tracesft.evaluate.evaluation import EvalReport


@step
def compare_models(
    base_report: EvalReport,
    tuned_report: EvalReport,
    adapter: LoraAdapter,
    settings: EvalSettings,
    registry: RegistrySettings,
) -> tuple[Annotated[ModelComparison, "model_comparison"], Annotated[HTMLString, "evaluation_report"]]:
    """The paired bootstrap interval of the F1 difference, the report page, and both logged to MLflow."""
    comparison = compare(base_report, tuned_report, settings)
    run_id = log_evaluation_run(adapter, base_report, tuned_report, comparison, registry)
    log_metadata({**comparison.metrics(), "mlflow_run_id": run_id})
    return comparison, HTMLString(render_evaluation_html(base_report, tuned_report, comparison))
