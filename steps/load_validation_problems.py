from typing import Annotated

from zenml import log_metadata, step

from tracesft.evaluate.eval_set import EvalProblem, validation_problems
from tracesft.data.sft_dataset import SFTDataset


@step
def load_validation_problems(dataset: SFTDataset) -> Annotated[list[EvalProblem], "validation_problems"]:
    """The traces' validation split as a second eval set: problems of the teacher's distribution, unseen in training."""
    problems = validation_problems(dataset)
    log_metadata({"problems": len(problems)})
    return problems
