"""Random Corr2Cause-style problems, and synthetic GPT-style prediction files to go with them.

Problems are made the way the benchmark made its own: draw a random DAG over 2-6 variables
(named A, B, ... in an order unrelated to the causal one), list ALL its statistical relations in
the official wording (a correlation for every pair that is not marginally d-separated, then every
d-separation), and ask one of the six relation templates about a random pair. The label comes
from the exact solver, never from the generating DAG: the generating DAG is only one member of
its Markov equivalence class, and the question is about all of them.

Prediction files look like a harness's output (query, reasoning trace ending in `Answer: Yes/No`,
the answer, gold, a `correct` flag), with a chosen share answering wrongly; they feed the tests
and the verification benchmark. Everything is seeded, so a given call always writes the same bytes.
"""

from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path
from typing import Iterable, Iterator

from tracesft.data.corr2cause import (
    CHILD,
    HAS_COLLIDER,
    HAS_CONFOUNDER,
    NON_CHILD_DESCENDANT,
    NON_PARENT_ANCESTOR,
    PARENT,
    TEMPLATES,
    Problem,
    parse_hypothesis,
    parse_premise,
)
from tracesft.data.sample_data import reasoning_text
from tracesft.data.solver import Dag, d_separations, solve

VARIABLE_NAMES = "ABCDEF"
_HYPOTHESES_PER_DAG = 30  # tries at the wanted label before drawing another DAG

# The official wording (Corr2Cause's `data_verbalize.py`), for the pair (x, y) with x before y.
_HYPOTHESES = {
    PARENT: "{x} directly causes {y}.",
    NON_PARENT_ANCESTOR: "{x} causes something else which causes {y}.",
    CHILD: "{y} directly causes {x}.",
    NON_CHILD_DESCENDANT: "{y} is a cause for {x}, but not a direct one.",
    HAS_COLLIDER: "There exists at least one collider (i.e., common effect) of {x} and {y}.",
    HAS_CONFOUNDER: "There exists at least one confounder (i.e., common cause) of {x} and {y}.",
}


def random_dag(num_variables: int, rng: random.Random, edge_probability: float = 0.5) -> Dag:
    """A DAG over the first `num_variables` names, each edge of a random causal order kept with `edge_probability`."""
    names = tuple(VARIABLE_NAMES[:num_variables])
    order = list(range(num_variables))
    rng.shuffle(order)
    parents = [0] * num_variables
    for a, b in combinations(range(num_variables), 2):
        if rng.random() < edge_probability:
            parents[order[b]] |= 1 << order[a]
    return Dag(names=names, parents=tuple(parents))


def premise_text(dag: Dag) -> str:
    """The official premise for `dag`: every correlation, then every (conditional) independence."""
    names, n = dag.names, len(dag.names)
    separations = d_separations(dag)
    independences = sorted(
        (x, y, tuple(i for i in range(n) if given >> i & 1))
        for pair, given in separations
        for x, y in [tuple(i for i in range(n) if pair >> i & 1)]
    )
    correlations = [(x, y) for x, y in combinations(range(n), 2) if ((1 << x) | (1 << y), 0) not in separations]
    statements = [f"{names[x]} correlates with {names[y]}." for x, y in correlations]
    independent = [
        f"{names[x]} and {names[y]} are independent given {list_text([names[i] for i in given])}."
        if given
        else f"{names[x]} is independent of {names[y]}."
        for x, y, given in independences
    ]
    relations = " ".join(statements)
    if independent:
        relations += (" However, " if statements else "") + " ".join(independent)
    return (
        f"Suppose there is a closed system of {n} variables, {list_text(list(names))}. All the statistical "
        f"relations among these {n} variables are as follows: {relations}"
    )


def hypothesis_text(template: str, x: str, y: str) -> str:
    return _HYPOTHESES[template].format(x=x, y=y)


def generate_problems(
    count: int, seed: int = 0, min_variables: int = 2, max_variables: int = 6, positive_share: float | None = None
) -> list[dict]:
    """`count` problems as rows of the official CSV (`input,label,num_variables,template`).

    Random hypotheses are rarely implied (about 6%), so `positive_share` can ask for a share of
    label-1 problems (the official test split has about 15%): each problem then draws the label it
    wants and keeps drawing hypotheses, and fresh DAGs, until the solver gives that label.
    """
    if not 2 <= min_variables <= max_variables <= len(VARIABLE_NAMES):
        raise ValueError(f"variables must satisfy 2 <= min <= max <= {len(VARIABLE_NAMES)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        wanted = None if positive_share is None else int(rng.random() < positive_share)
        row = None
        while row is None:
            n = rng.randint(min_variables, max_variables)
            dag = random_dag(n, rng, edge_probability=rng.uniform(0.2, 0.8))
            text = premise_text(dag)
            premise = parse_premise(text)  # the solver reads our wording back, as it will read the file
            for _ in range(_HYPOTHESES_PER_DAG):
                template = rng.choice(TEMPLATES)
                x, y = rng.sample(dag.names, 2)
                if template not in (HAS_COLLIDER, HAS_CONFOUNDER):
                    x, y = sorted((x, y))  # the official order; the template's wording sets the direction
                hypothesis = hypothesis_text(template, x, y)
                label = solve(Problem(premise=premise, hypothesis=parse_hypothesis(hypothesis))).label
                if wanted is None or label == wanted:
                    query = f"Premise: {text}\nHypothesis: {hypothesis}"
                    row = {"input": query, "label": str(label), "num_variables": str(n), "template": template}
                    break
        rows.append(row)
    return rows


def synthetic_predictions(problems: Iterable[dict], wrong_share: float, seed: int = 0) -> Iterator[dict]:
    """GPT-style prediction records for `problems`; a `wrong_share` of them answer wrongly (flag honest)."""
    rng = random.Random(seed)
    for problem in problems:
        gold = int(problem["label"])
        right = rng.random() >= wrong_share
        answer_yes = (gold == 1) == right
        trace = reasoning_text(problem["input"], answer_yes, rng) + f"\n\nAnswer: {'Yes' if answer_yes else 'No'}"
        yield {
            "input": problem["input"],
            "response": trace,
            "prediction": "Yes" if answer_yes else "No",
            "label": gold,
            "correct": right,
        }


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Stream records to a JSONL file; return how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written


def list_text(items: list[str]) -> str:
    """Names as the official wording lists them: `A`, `A and B`, `A, B and C`."""
    return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 2 else " and ".join(items)
