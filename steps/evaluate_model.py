from typing import Annotated

from zenml import log_metadata, step

from tracesft.adapter import LoraAdapter
from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.eval_set import EvalProblem
from tracesft.evaluation import EvalReport, evaluate


@step
def evaluate_model(
    problems: list[EvalProblem],
    base_model: str,
    base_model_revision: str | None,
    settings: EvalSettings,
    recipe: TrainingRecipe,
    adapter: LoraAdapter | None = None,
) -> Annotated[EvalReport, "eval_report"]:
    """Score the base (no adapter) or the fine-tuned model on the same problems."""
    report = evaluate(
        base_model, problems, settings, recipe, adapter.path if adapter is not None else None, base_model_revision
    )
    scores = report.scores
    log_metadata({"model": report.model, "f1": scores.f1, "accuracy": scores.accuracy, "parse_failure_rate": scores.parse_failure_rate})
    return report
