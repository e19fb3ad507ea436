from typing import Annotated

from zenml import log_metadata, step

from tracesft.train.adapter import LoraAdapter
from tracesft.config import Device, EvalSettings, TrainingRecipe
from tracesft.device import require_device
from tracesft.evaluate.eval_set import EvalProblem
from tracesft.evaluate.evaluation import EvalReport, evaluate


@step
def evaluate_model(
    problems: list[EvalProblem],
    base_model: str,
    base_model_revision: str | None,
    settings: EvalSettings,
    recipe: TrainingRecipe,
    device: Device,
    adapter: LoraAdapter | None = None,
    validation: list[EvalProblem] | None = None,
) -> Annotated[EvalReport, "eval_report"]:
    """Score the base (no adapter) or the fine-tuned model on the same problems (and their renamed
    and validation-split companions)."""
    require_device(device)
    report = evaluate(
        base_model,
        problems,
        settings,
        recipe,
        device,
        adapter.path if adapter is not None else None,
        base_model_revision,
        validation,
    )
    scores = report.scores
    metadata = {"model": report.model, "f1": scores.f1, "accuracy": scores.accuracy, "parse_failure_rate": scores.parse_failure_rate}
    if report.robustness_f1_drop is not None:
        metadata["robustness_f1_drop"] = report.robustness_f1_drop
    if report.validation is not None:
        metadata["validation_f1"] = report.validation.scores.f1
    if report.generation is not None:
        metadata |= report.generation.model_dump(exclude_none=True)  # ZenML metadata takes no None
    log_metadata(metadata)
    return report
