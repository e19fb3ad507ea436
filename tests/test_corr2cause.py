"""Reading Corr2Cause problems: the official wording of every statement and template, the common
paraphrases, and a specific error for anything else."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tracesft.data.corr2cause import (
    CHILD,
    HAS_COLLIDER,
    HAS_CONFOUNDER,
    NON_CHILD_DESCENDANT,
    NON_PARENT_ANCESTOR,
    PARENT,
    Hypothesis,
    Independence,
    MalformedProblemError,
    parse_hypothesis,
    parse_problem,
)
from tracesft.errors import TracesftError

OFFICIAL_TEST_CSV = Path(__file__).resolve().parents[2] / "shared/data/corr2cause/test.csv"
HEADER = "Premise: Suppose there is a closed system of {n} variables, {names}. All the statistical relations among these {n} variables are as follows: "
# Official test row 500, verbatim.
ROW_500 = (
    HEADER.format(n=5, names="A, B, C, D and E")
    + "A correlates with C. A correlates with D. A correlates with E. B correlates with C. B correlates with D. "
    "B correlates with E. C correlates with D. C correlates with E. D correlates with E. However, A is independent of B. "
    "B and D are independent given A and C. B and D are independent given A, C and E. C and E are independent given A and B. "
    "C and E are independent given A, B and D. D and E are independent given A and B. D and E are independent given A, B and C. "
    "D and E are independent given A and C.\nHypothesis: There exists at least one confounder (i.e., common cause) of B and D."
)
THREE = HEADER.format(n=3, names="A, B and C")


def pair(x: str, y: str) -> frozenset[str]:
    return frozenset((x, y))


def test_official_row_parses_into_its_statements() -> None:
    problem = parse_problem(ROW_500)
    premise = problem.premise
    assert premise.variables == frozenset("ABCDE")
    assert len(premise.correlations) == 9 and pair("A", "C") in premise.correlations
    assert len(premise.independences) == 8
    assert Independence(pair=pair("A", "B"), given=frozenset()) in premise.independences
    assert Independence(pair=pair("B", "D"), given=frozenset("ACE")) in premise.independences
    assert problem.hypothesis == Hypothesis(HAS_CONFOUNDER, "B", "D")


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        # The six official templates (Corr2Cause data_verbalize.py), as they appear in the split.
        ("A directly causes B.", Hypothesis(PARENT, "A", "B")),
        ("A causes something else which causes B.", Hypothesis(NON_PARENT_ANCESTOR, "A", "B")),
        # "X is a cause for Y, but not a direct one" is the non-child-descendant template of (Y, X).
        ("A is a cause for B, but not a direct one.", Hypothesis(NON_CHILD_DESCENDANT, "B", "A")),
        ("There exists at least one collider (i.e., common effect) of A and B.", Hypothesis(HAS_COLLIDER, "A", "B")),
        ("There exists at least one confounder (i.e., common cause) of B and A.", Hypothesis(HAS_CONFOUNDER, "B", "A")),
        # The benchmark's own paraphrased set, and other common rewordings.
        ("A directly affects B.", Hypothesis(PARENT, "A", "B")),
        ("A is a direct cause of B.", Hypothesis(PARENT, "A", "B")),
        ("B is directly caused by A.", Hypothesis(CHILD, "B", "A")),
        ("A influences B through some mediator(s).", Hypothesis(NON_PARENT_ANCESTOR, "A", "B")),
        ("A is an indirect cause of B.", Hypothesis(NON_PARENT_ANCESTOR, "A", "B")),
        ("B is indirectly caused by A.", Hypothesis(NON_CHILD_DESCENDANT, "B", "A")),
        ("A and B together cause some other variable(s).", Hypothesis(HAS_COLLIDER, "A", "B")),
        ("There exists at least one common effect of A and B.", Hypothesis(HAS_COLLIDER, "A", "B")),
        ("A and B have a common effect.", Hypothesis(HAS_COLLIDER, "A", "B")),
        ("Some variable(s) cause(s) both A and B.", Hypothesis(HAS_CONFOUNDER, "A", "B")),
        ("A and B have a common cause", Hypothesis(HAS_CONFOUNDER, "A", "B")),
        ("  a   DIRECTLY causes b .", Hypothesis(PARENT, "a", "b")),  # case and spacing do not matter
    ],
)
def test_hypothesis_templates(sentence: str, expected: Hypothesis) -> None:
    assert parse_hypothesis(sentence) == expected


@pytest.mark.parametrize(
    "statements",
    [
        "A correlates with C. B correlates with C. However, A is independent of B.",
        "A is correlated with C. B and C are correlated. A and B are independent.",
        "A is associated with C. C depends on B. However, A is marginally independent of B.",
    ],
)
def test_statement_paraphrases(statements: str) -> None:
    premise = parse_problem(THREE + statements + "\nHypothesis: A directly causes C.").premise
    assert premise.correlations == {pair("A", "C"), pair("B", "C")}
    assert premise.independences == {Independence(pair=pair("A", "B"), given=frozenset())}


@pytest.mark.parametrize(
    "statement",
    [
        "A and C are independent given B.",
        "A is independent of C given B.",
        "A and C are conditionally independent given B.",
        "A and C are independent conditional on B.",
        "A is independent of C conditioned on B.",
        "A and C are independent when controlling for B.",
    ],
)
def test_conditional_independence_paraphrases(statement: str) -> None:
    text = THREE + f"A correlates with B. B correlates with C. A correlates with C. However, {statement}\nHypothesis: A directly causes B."
    assert parse_problem(text).premise.independences == {Independence(pair=pair("A", "C"), given=frozenset("B"))}


def test_long_conditioning_lists_and_longer_names() -> None:
    text = (
        HEADER.format(n=5, names="X1, X2, Y, Z and W")
        + "X1 correlates with X2. However, Y and Z are independent given X1, X2 and W.\nHypothesis: X1 directly causes X2."
    )
    problem = parse_problem(text)
    assert problem.premise.variables == {"X1", "X2", "Y", "Z", "W"}
    assert Independence(pair=pair("Y", "Z"), given=frozenset({"X1", "X2", "W"})) in problem.premise.independences


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (THREE + "A correlates with B.", "no 'Hypothesis:'"),
        ("Premise: A correlates with B.\nHypothesis: A directly causes B.", "closed system"),
        (HEADER.format(n=3, names="A and B") + "A correlates with B.\nHypothesis: A directly causes B.", "announces 3 variables"),
        (THREE + "A correlates with B, strongly.\nHypothesis: A directly causes B.", "'A correlates with B, strongly'"),
        (THREE + "A correlates with D.\nHypothesis: A directly causes B.", "outside A, B, C"),
        (THREE + "A and B are independent given A.\nHypothesis: A directly causes B.", "repeats one"),
        (THREE + "A correlates with B. However, A is independent of B.\nHypothesis: A directly causes B.", "both correlated and independent"),
        (THREE + "A correlates with B.\nHypothesis: A directly causes D.", "hypothesis is about A and D"),
        (THREE + "A correlates with B.\nHypothesis: A directly causes A.", "hypothesis is about A and A"),
        (THREE + "A correlates with B.\nHypothesis: A may well cause B.", "'A may well cause B'"),
    ],
)
def test_malformed_problems_raise_a_specific_error(text: str, named: str) -> None:
    with pytest.raises(MalformedProblemError) as excinfo:
        parse_problem(text)
    assert named in str(excinfo.value)
    assert isinstance(excinfo.value, TracesftError)  # the CLI prints it as a message, not a traceback


@pytest.mark.skipif(not OFFICIAL_TEST_CSV.exists(), reason=f"official Corr2Cause test split not present at {OFFICIAL_TEST_CSV}")
def test_every_official_row_parses_and_its_wording_matches_its_template() -> None:
    with OFFICIAL_TEST_CSV.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1162
    for index, row in enumerate(rows):
        problem = parse_problem(row["input"])
        assert len(problem.premise.variables) == int(row["num_variables"]), index
        # "X directly causes Y" is filed as "parent" or "child" depending on which variable the
        # generator started from; every other wording names exactly its template.
        expected = {PARENT} if row["template"] in (PARENT, CHILD) else {row["template"]}
        assert problem.hypothesis.template in expected, index
