from typing import Annotated

from zenml import log_metadata, step

from tracesft.config import RegistrySettings
from tracesft.evaluate.comparison import ModelComparison
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
    interval and beats the current champion. The decision is logged on the pipeline's ZenML model
    version as what this run decided; who is champion now only MLflow's alias says."""
    decision = promote_if_better(
        version, eval_metrics(base_report, tuned_report), registry, f1_difference_ci_low=comparison.f1_difference.low
    )
    log_metadata({"promoted": decision.promoted, "reason": decision.reason})
    log_metadata({"promotion": decision.model_dump()}, infer_model=True)
    return decision
