"""The generator: problems in the official wording (byte for byte), labels from the solver, and
synthetic prediction files whose wrong share verification finds again."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from tracesft.data.corr2cause import TEMPLATES, parse_problem
from tracesft.evaluate.eval_set import EVAL_COLUMNS
from tracesft.data.generator import generate_problems, premise_text, random_dag, synthetic_predictions, write_jsonl
from tracesft.data.ingest import ingest
from tracesft.data.solver import equivalence_class, solve_text
from tracesft.data.verify import WRONG, verify

OFFICIAL_TEST_CSV = Path(__file__).resolve().parents[2] / "shared/data/corr2cause/test.csv"


def test_problems_are_seeded_rows_of_the_official_csv() -> None:
    rows = generate_problems(30, seed=4)
    assert rows == generate_problems(30, seed=4)
    assert rows != generate_problems(30, seed=5)
    for row in rows:
        assert list(row) == list(EVAL_COLUMNS)
        assert row["template"] in TEMPLATES
        assert 2 <= int(row["num_variables"]) <= 6
        problem = parse_problem(row["input"])
        assert len(problem.premise.variables) == int(row["num_variables"])
        assert str(solve_text(row["input"]).label) == row["label"]


def test_variable_range_and_positive_share() -> None:
    rows = generate_problems(60, seed=1, min_variables=3, max_variables=4, positive_share=0.5)
    assert {int(r["num_variables"]) for r in rows} == {3, 4}
    positives = sum(r["label"] == "1" for r in rows)
    assert 15 <= positives <= 45  # drawn per problem with probability 0.5
    with pytest.raises(ValueError):
        generate_problems(1, min_variables=1)
    with pytest.raises(ValueError):
        generate_problems(1, max_variables=7)


def test_the_generating_dag_is_in_the_class_the_solver_finds() -> None:
    rng = random.Random(2)
    for _ in range(150):
        dag = random_dag(rng.randint(2, 6), rng, rng.uniform(0.1, 0.9))
        members = equivalence_class(parse_problem(f"Premise: {premise_text(dag)}\nHypothesis: A directly causes B.").premise)
        assert dag in members


@pytest.mark.skipif(not OFFICIAL_TEST_CSV.exists(), reason=f"official Corr2Cause test split not present at {OFFICIAL_TEST_CSV}")
def test_premise_text_reproduces_every_official_premise() -> None:
    with OFFICIAL_TEST_CSV.open(newline="", encoding="utf-8") as handle:
        premises = {row["input"].partition("\nHypothesis:")[0] for row in csv.DictReader(handle)}
    for premise in premises:
        member = equivalence_class(parse_problem(premise + "\nHypothesis: A directly causes B.").premise)[0]
        assert f"Premise: {premise_text(member)}" == premise


def test_synthetic_predictions_have_the_wrong_share_verification_finds(tmp_path: Path) -> None:
    problems = generate_problems(40, seed=3)
    records = list(synthetic_predictions(problems, wrong_share=0.25, seed=8))
    assert records == list(synthetic_predictions(problems, wrong_share=0.25, seed=8))
    wrong = sum(not r["correct"] for r in records)
    assert 3 <= wrong <= 20
    for record, problem in zip(records, problems):
        assert record["input"] == problem["input"] and record["label"] == int(problem["label"])
        assert record["response"].endswith(f"Answer: {record['prediction']}")
        assert record["correct"] == ((record["prediction"] == "Yes") == (record["label"] == 1))
    path = tmp_path / "gpt.jsonl"
    assert write_jsonl(path, records) == 40
    result = verify(ingest([str(path)]))
    assert len(result.kept.records) == 40 - wrong
    assert result.rejected_by_reason() == ({WRONG: wrong} if wrong else {})


def test_all_right_and_all_wrong() -> None:
    problems = generate_problems(10, seed=6)
    assert all(r["correct"] for r in synthetic_predictions(problems, wrong_share=0.0))
    assert not any(r["correct"] for r in synthetic_predictions(problems, wrong_share=1.0))
