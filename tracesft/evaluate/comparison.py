"""Base against fine-tuned on the same problems: the evidence the promotion gate rests on.

The headline is a paired bootstrap confidence interval of F1(fine-tuned) − F1(base); a gate that
requires its lower bound (`f1_difference.low`) to clear zero promotes only differences that a
redraw of the problems would not erase. The robustness drops (F1 lost when the variables are
renamed) and the validation-split scores travel alongside, for the report.
"""

from __future__ import annotations

from pydantic import BaseModel

from tracesft.config import EvalSettings
from tracesft.errors import TracesftError
from tracesft.evaluate.evaluation import EvalReport
from tracesft.evaluate.metrics import F1DifferenceInterval, paired_bootstrap_f1_difference


class ModelComparison(BaseModel):
    problems: int
    base_f1: float
    finetuned_f1: float
    f1_difference: F1DifferenceInterval  # fine-tuned minus base; `.low` is what the gate reads
    base_robustness_f1_drop: float | None
    finetuned_robustness_f1_drop: float | None
    base_validation_f1: float | None
    finetuned_validation_f1: float | None

    def metrics(self) -> dict[str, float]:
        """Flat numeric view for MLflow and ZenML metadata (absent values left out)."""
        values = {
            "f1_difference": self.f1_difference.observed,
            "f1_difference_ci_low": self.f1_difference.low,
            "f1_difference_ci_high": self.f1_difference.high,
            "base_robustness_f1_drop": self.base_robustness_f1_drop,
            "finetuned_robustness_f1_drop": self.finetuned_robustness_f1_drop,
            "base_validation_f1": self.base_validation_f1,
            "finetuned_validation_f1": self.finetuned_validation_f1,
        }
        return {name: float(value) for name, value in values.items() if value is not None}


def compare_models(base: EvalReport, tuned: EvalReport, settings: EvalSettings) -> ModelComparison:
    """Pair the two reports problem by problem and bootstrap their F1 difference."""
    pairs = [(p.row, p.label) for p in base.predictions]
    if not pairs:
        raise TracesftError("no eval problems left to compare the models on (all excluded as seen in training?).")
    if pairs != [(p.row, p.label) for p in tuned.predictions]:
        raise TracesftError(
            "the base and fine-tuned reports are not on the same problems in the same order; "
            "evaluate both on one eval set (same file, sample and exclusions) before comparing."
        )
    interval = paired_bootstrap_f1_difference(
        [p.label for p in base.predictions],
        [p.answer for p in base.predictions],
        [p.answer for p in tuned.predictions],
        n_resamples=settings.bootstrap_resamples,
        confidence=settings.confidence,
        seed=settings.seed,
    )
    return ModelComparison(
        problems=len(pairs),
        base_f1=base.scores.f1,
        finetuned_f1=tuned.scores.f1,
        f1_difference=interval,
        base_robustness_f1_drop=base.robustness_f1_drop,
        finetuned_robustness_f1_drop=tuned.robustness_f1_drop,
        base_validation_f1=base.validation.scores.f1 if base.validation else None,
        finetuned_validation_f1=tuned.validation.scores.f1 if tuned.validation else None,
    )
