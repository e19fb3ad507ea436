from typing import Annotated

from zenml import get_step_context, log_metadata, step

from tracesft.evaluate.comparison import ModelComparison
from tracesft.config import RegistrySettings
from tracesft.registry.control_plane import set_stage, stage_for
from tracesft.evaluate.evaluation import EvalReport
from tracesft.registry.model_registry import PromotionDecision, RegisteredVersion, eval_metrics, promote_if_better


@step
def promote_adapter(
    version: RegisteredVersion,
    base_report: EvalReport,
    tuned_report: EvalReport,
    comparison: ModelComparison,
    registry: RegistrySettings,
) -> Annotated[PromotionDecision, "promotion_decision"]:
    """Move `champion` to this version only if it beats the base beyond the evaluation's confidence
    interval and beats the current champion; the pipeline's ZenML model version goes to
    `production` if it did, `staging` if not."""
    decision = promote_if_better(
        version, eval_metrics(base_report, tuned_report), registry, f1_difference_ci_low=comparison.f1_difference.low
    )
    model = get_step_context().model
    holds_champion = decision.promoted or decision.champion_version == decision.version  # a reused version may hold it already
    set_stage(model.name, str(model.id), stage_for(holds_champion))
    log_metadata({"promoted": decision.promoted, "reason": decision.reason})
    log_metadata({"promotion": decision.model_dump()}, infer_model=True)
    return decision
