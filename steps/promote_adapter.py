from typing import Annotated

from zenml import log_metadata, step

from tracesft.config import RegistrySettings
from tracesft.evaluation import EvalReport
from tracesft.registry import PromotionDecision, eval_metrics, promote_if_better
from tracesft.registry import RegisteredVersion


@step
def promote_adapter(
    version: RegisteredVersion, base_report: EvalReport, tuned_report: EvalReport, registry: RegistrySettings
) -> Annotated[PromotionDecision, "promotion_decision"]:
    """Move `champion` to this version only if it beats the base and the current champion."""
    decision = promote_if_better(version, eval_metrics(base_report, tuned_report), registry)
    log_metadata({"promoted": decision.promoted, "reason": decision.reason})
    return decision
