from typing import Annotated

from zenml import log_metadata, step

from tracesft.config import ProblemSettings
from tracesft.evaluate.eval_set import load_eval_set
from tracesft.rl.problems import GrpoProblem, check_held_apart, fresh_problems


@step
def generate_grpo_problems(
    settings: ProblemSettings, eval_set: str, eval_set_hash: str
) -> Annotated[list[GrpoProblem], "grpo_problems"]:
    """Fresh problems of the configured family, none of them in the eval set (dropped as drawn,
    then checked again); `eval_set_hash` keys the cache on the CSV's bytes."""
    eval_problems = load_eval_set(eval_set)
    problems = fresh_problems(settings, eval_problems)
    check_held_apart(problems, eval_problems, eval_set)
    log_metadata({"problems": len(problems), "valid": sum(p.label for p in problems),
                  "templates": sorted({p.template for p in problems}), "held_apart_from_eval_rows": len(eval_problems)})
    return problems
