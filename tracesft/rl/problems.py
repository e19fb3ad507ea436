"""Fresh Corr2Cause problems to train GRPO on, held apart from the eval set.

GRPO needs problems, not traces: the solver labels any problem exactly, so the supply is
unlimited. They come from the project's generator (`tracesft.data.generator`), in the configured
family (relation templates, variable counts, share of valid hypotheses), seeded, so a run's
problems are a pure function of its settings and the eval set.

Held apart twice. By construction: every drawn problem whose normalised text hashes to an eval
problem's is dropped and another drawn. By check: `check_held_apart` compares the finished set
with the eval set again and stops the run on any overlap, so a change to the generator or the
normalisation that broke the first guard cannot train on the problems the gate scores.
"""

from __future__ import annotations

import hashlib
import random

from pydantic import BaseModel

from tracesft.config import ProblemSettings
from tracesft.data.generator import generate_problems
from tracesft.data.sft_dataset import normalize_query
from tracesft.data.solver import solve_text
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem

# Draws of `count` problems before giving up on a family the filters leave (almost) empty.
_MAX_ROUNDS = 20


class GrpoProblem(BaseModel):
    query: str
    label: int  # the solver's
    num_variables: int
    template: str


def problem_hash(query: str) -> str:
    """SHA-256 of the problem text with whitespace normalised, as the SFT split compares queries."""
    return hashlib.sha256(normalize_query(query).encode()).hexdigest()


def fresh_problems(settings: ProblemSettings, eval_problems: list[EvalProblem]) -> list[GrpoProblem]:
    """`settings.count` generated problems of the configured family, none of them an eval problem."""
    held_out = {problem_hash(p.query) for p in eval_problems}
    templates = set(settings.templates) if settings.templates else None
    seeds = random.Random(settings.seed)
    problems: list[GrpoProblem] = []
    for _ in range(_MAX_ROUNDS):
        rows = generate_problems(settings.count, seeds.randrange(2**31), settings.min_variables,
                                 settings.max_variables, settings.positive_share)
        for row in rows:
            if (templates is None or row["template"] in templates) and problem_hash(row["input"]) not in held_out:
                problems.append(GrpoProblem(query=row["input"], label=solve_text(row["input"]).label,
                                            num_variables=int(row["num_variables"]), template=row["template"]))
        if len(problems) >= settings.count:
            return problems[: settings.count]
    raise TracesftError(
        f"problems: {_MAX_ROUNDS} draws gave only {len(problems)} of problems.count {settings.count} problems of the "
        f"family asked for (templates {settings.templates}, {settings.min_variables}-{settings.max_variables} variables, "
        f"positive_share {settings.positive_share}); widen problems.templates or the variable range, or lower problems.count."
    )


def check_held_apart(problems: list[GrpoProblem], eval_problems: list[EvalProblem], eval_set: str) -> None:
    """Stop if any training problem is an eval problem (by the hash of its normalised text)."""
    by_hash = {problem_hash(p.query): p for p in eval_problems}
    shared = [(i, by_hash[h]) for i, p in enumerate(problems) if (h := problem_hash(p.query)) in by_hash]
    if shared:
        index, problem = shared[0]
        raise TracesftError(
            f"{eval_set} (line {problem.line}): GRPO problem {index + 1} is this eval problem, and {len(shared)} of "
            f"{len(problems)} training problems are in the eval set; the gate would score the model on problems it "
            "trained on. Fix the problem source (tracesft/rl/problems.py) before training."
        )
