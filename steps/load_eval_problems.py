from typing import Annotated

from zenml import log_metadata, step

from tracesft.config import EvalSettings
from tracesft.evaluate.eval_set import EvalProblem, exclude_seen, load_eval_set, stratified_sample
from tracesft.data.sft_dataset import SFTDataset


@step
def load_eval_problems(
    path: str, content_hash: str, dataset: SFTDataset, settings: EvalSettings | None = None
) -> Annotated[list[EvalProblem], "eval_problems"]:
    """The eval set minus problems seen in training, then the configured stratified sample of it, if any;
    `content_hash` keys the cache on the CSV's bytes."""
    problems = load_eval_set(path)
    unseen = exclude_seen(problems, dataset.queries())
    scored = unseen
    if settings is not None and settings.sample_size is not None:
        scored = stratified_sample(unseen, settings.sample_size, settings.sample_seed)
    log_metadata({"rows": len(problems), "excluded_as_seen_in_training": len(problems) - len(unseen), "scored": len(scored)})
    return scored
