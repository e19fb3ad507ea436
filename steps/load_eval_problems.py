from typing import Annotated

from zenml import log_metadata, step

from tracesft.eval_set import EvalProblem, exclude_seen, load_eval_set
from tracesft.sft_dataset import SFTDataset


@step
def load_eval_problems(path: str, content_hash: str, dataset: SFTDataset) -> Annotated[list[EvalProblem], "eval_problems"]:
    """The eval set minus problems seen in training; `content_hash` keys the cache on the CSV's bytes."""
    problems = load_eval_set(path)
    kept = exclude_seen(problems, dataset.queries())
    log_metadata({"rows": len(problems), "excluded_as_seen_in_training": len(problems) - len(kept)})
    return kept
