"""The demo's training traces: problems from the project's generator, reasoning from its solver.

The bundled sample files (`tracesft.data.sample_data`) hold 100 problems of the official split
with GPT-style traces of several hundred tokens each: far too few, and far too long, for the
tiny CPU model to learn anything in the demo's minute of training. The demo trains instead on
`DEMO_PROBLEMS` problems drawn by `tracesft.data.generator` and labelled by the exact solver,
each with a short trace: which relation the hypothesis claims, and the rule that decides it. The result files are written the way the bundled
ones are (`sample_trace_files`: one JSON, one JSONL, different harness field names, and the same
deliberately bad records, so verification has one of each rejection to show).

What the tiny model can learn from them is the answer format and the class balance, not the
causal reasoning itself: BENCHMARKS.md ("The demo learns") has the figures. The generated
problems are disjoint from the demo's eval set (official problems), and the pipeline removes
any eval problem seen in training anyway.
"""

from __future__ import annotations

import random
from functools import cache

from tracesft.data.corr2cause import (
    CHILD,
    HAS_COLLIDER,
    HAS_CONFOUNDER,
    NON_CHILD_DESCENDANT,
    NON_PARENT_ANCESTOR,
    PARENT,
    parse_problem,
)
from tracesft.data.generator import generate_problems
from tracesft.data.sample_data import EVAL_CSV, bundled_rows, sample_trace_files
from tracesft.data.sft_dataset import normalize_query

DEMO_PROBLEMS = 200
DEMO_SEED = 3
# Valid problems are rare in Corr2Cause (~15%), and a model this small learns the class balance
# of its data, not the premise: from data that is mostly "no" it learns to always answer no
# (F1 of the valid class 0). The generator is asked for a majority of valid problems instead.
DEMO_POSITIVE_SHARE = 0.7
# Four variables keep premises, and so training, short (three give too few distinct problems);
# a few of five and six cover every variable count of the eval set, as the quality gate requires.
DEMO_VARIABLES = ((4, 4, 0.85), (5, 6, 0.15))  # (fewest, most, share of the problems)


@cache
def demo_problems() -> tuple[dict, ...]:
    """The generated problems the demo's traces answer, none of them in the demo's eval set."""
    held_out = {normalize_query(row["input"]) for row in bundled_rows(EVAL_CSV)}
    rows: list[dict] = []
    for index, (fewest, most, share) in enumerate(DEMO_VARIABLES):
        rows += generate_problems(
            round(DEMO_PROBLEMS * share), seed=DEMO_SEED + index, min_variables=fewest, max_variables=most,
            positive_share=DEMO_POSITIVE_SHARE,
        )
    random.Random(DEMO_SEED).shuffle(rows)
    return tuple(row for row in rows if normalize_query(row["input"]) not in held_out)


# What each relation template claims, in words that name no variable: the first thing a trace
# says, so that a model learning to write it must read the hypothesis.
CLAIMS = {
    PARENT: "a direct cause between the two",
    CHILD: "a direct cause between the two",
    NON_PARENT_ANCESTOR: "a cause between the two that acts only through others",
    NON_CHILD_DESCENDANT: "a cause between the two that acts only through others",
    HAS_COLLIDER: "a common effect of the two",
    HAS_CONFOUNDER: "a common cause of the two",
}


def solver_reasoning(query: str, answer_yes: bool, rng: random.Random) -> str:
    """A short trace for `query`: which relation the hypothesis claims, and how it is decided.
    `answer_yes` is the answer the record will give (wrong on purpose for some records).

    Nothing in it depends on the answer: a tiny model copies whatever words precede the answer
    line in its training data, and answer-specific words it cannot yet derive (how many graphs
    satisfy the claim, say) it would make up, and answer from what it made up."""
    del answer_yes, rng  # the answer line is written by the caller, from the solver-checked label
    template = parse_problem(query).hypothesis.template
    return f"The claim is about {CLAIMS[template]}. It must hold in every causal graph that fits the premise."


def demo_trace_files() -> dict[str, str]:
    """The demo's two result files: names and contents, the same bytes on every call."""
    return sample_trace_files(list(demo_problems()), reasoning=solver_reasoning)

