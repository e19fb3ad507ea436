"""Verification: a trace is kept only when its own text answers the gold label and the exact solver
confirms that label; every rejection keeps its record and says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracesft.data.ingest import ingest
from tracesft.data.sample_data import (
    DATA,
    DUPLICATED,
    FLAG_CONTRADICTS,
    TRACE_FILES,
    TRACE_PROBLEMS_CSV,
    UNPARSEABLE,
    WRONG_ANSWER,
    bundled_rows,
)
from tracesft.data.traces import TraceBatch, TraceRecord
from tracesft.data.verify import (
    DUPLICATE,
    FLAG_CONTRADICTS_TEXT,
    GOLD_CONTRADICTED,
    MALFORMED_PREMISE,
    UNPARSEABLE as UNPARSEABLE_REASON,
    WRONG,
    verify,
)

SAMPLE_DIR = Path(str(DATA / "sample_traces"))
YES_TRACE = "Every compatible graph has the edge.\n\nAnswer: Yes"
NO_TRACE = "A fork explains the correlation as well.\n\nAnswer: No"
CUT_TRACE = "I am still weighing the candidate graphs and have not"

HEADER = "Premise: Suppose there is a closed system of {n} variables, {names}. All the statistical relations among these {n} variables are as follows: "
COLLIDER = HEADER.format(n=3, names="A, B and C") + "A correlates with C. B correlates with C. However, A is independent of B."
YES_QUERY = COLLIDER + "\nHypothesis: A directly causes C."  # the v-structure compels A -> C
OTHER_YES_QUERY = COLLIDER + "\nHypothesis: B directly causes C."
NO_QUERY = HEADER.format(n=2, names="A and B") + "A correlates with B.\nHypothesis: A directly causes B."  # B -> A fits too
QUERY_FOR_GOLD = {1: YES_QUERY, 0: NO_QUERY}


def rec(query: str | None = None, trace: str = YES_TRACE, gold: int = 1, n: int = 1, **extra) -> TraceRecord:
    """A record on a real problem whose solver label is `gold` unless `query` says otherwise."""
    query = QUERY_FOR_GOLD[gold] if query is None else query
    return TraceRecord(query=query, trace=trace, gold=gold, source="run.json", locator=f"record {n}", **extra)


def batch_of(*records: TraceRecord) -> TraceBatch:
    return TraceBatch(records=list(records), content_hash="abc", files=["run.json"], run_metadata={"run.json": {"m": 1}})


@pytest.mark.parametrize(
    ("trace", "gold", "flag"),
    [(YES_TRACE, 1, None), (NO_TRACE, 0, None), (YES_TRACE, 1, True), (NO_TRACE, 0, True)],
)
def test_kept_when_text_answer_matches_gold(trace: str, gold: int, flag: bool | None) -> None:
    record = rec(trace=trace, gold=gold, flagged_correct=flag)
    result = verify(batch_of(record))
    assert result.kept.records == [record]
    assert result.rejected == []
    assert result.rejected_by_reason() == {}


def test_kept_batch_keeps_hash_files_and_metadata() -> None:
    batch = batch_of(rec(), rec(trace=NO_TRACE, n=2))
    result = verify(batch)
    assert result.kept.content_hash == "abc"
    assert result.kept.files == ["run.json"]
    assert result.kept.run_metadata == {"run.json": {"m": 1}}
    assert len(batch.records) == 2  # the input batch is left alone


def test_the_harness_prediction_field_is_not_evidence() -> None:
    # The harness says "Yes" and the flag agrees with gold, but the text itself never answers.
    result = verify(batch_of(rec(trace=CUT_TRACE, predicted="Yes", flagged_correct=True)))
    assert [r.reason for r in result.rejected] == [UNPARSEABLE_REASON]


@pytest.mark.parametrize("flag", [None, True, False])
def test_unparseable_answer(flag: bool | None) -> None:
    result = verify(batch_of(rec(trace=CUT_TRACE, flagged_correct=flag)))
    assert result.kept.records == []
    assert [r.reason for r in result.rejected] == [UNPARSEABLE_REASON]


@pytest.mark.parametrize("flag", [None, False])
def test_wrong_answer(flag: bool | None) -> None:
    result = verify(batch_of(rec(trace=NO_TRACE, gold=1, flagged_correct=flag)))
    assert [r.reason for r in result.rejected] == [WRONG]
    assert "'no'" in result.rejected[0].detail and "1" in result.rejected[0].detail


def test_flag_true_but_text_wrong() -> None:
    result = verify(batch_of(rec(trace=NO_TRACE, gold=1, flagged_correct=True)))
    assert [r.reason for r in result.rejected] == [FLAG_CONTRADICTS_TEXT]
    assert "says correct" in result.rejected[0].detail


def test_flag_false_but_text_right() -> None:
    result = verify(batch_of(rec(trace=YES_TRACE, gold=1, flagged_correct=False)))
    assert [r.reason for r in result.rejected] == [FLAG_CONTRADICTS_TEXT]
    assert "says wrong" in result.rejected[0].detail


def test_duplicate_is_whitespace_insensitive_and_the_first_is_kept() -> None:
    first = rec(query=YES_QUERY, n=1)
    other = rec(query=OTHER_YES_QUERY, n=2)
    again = rec(query="  " + YES_QUERY.replace(" ", "  ").replace("\n", "\t") + " ", trace="  " + YES_TRACE.replace("\n\n", "\n"), n=3)
    result = verify(batch_of(first, other, again))
    assert result.kept.records == [first, other]
    assert [r.reason for r in result.rejected] == [DUPLICATE]
    assert result.rejected[0].record == again
    assert "run.json (record 1)" in result.rejected[0].detail


def test_same_query_with_a_different_trace_is_not_a_duplicate() -> None:
    result = verify(batch_of(rec(n=1), rec(trace="Another line of reasoning.\n\nAnswer: Yes", n=2)))
    assert len(result.kept.records) == 2


def test_rejected_copy_of_a_kept_trace_is_not_counted_as_duplicate() -> None:
    # The second copy contradicts its flag: that is the reason it is rejected, not duplication.
    result = verify(batch_of(rec(n=1), rec(n=2, flagged_correct=False)))
    assert [r.reason for r in result.rejected] == [FLAG_CONTRADICTS_TEXT]


def test_rejected_records_keep_the_full_record() -> None:
    record = TraceRecord(
        query=YES_QUERY, trace=NO_TRACE, gold=1, predicted="No", flagged_correct=True, source="/data/run2.jsonl", locator="line 7"
    )
    rejected = verify(batch_of(record)).rejected[0]
    assert rejected.record == record
    assert rejected.record.where == "/data/run2.jsonl (line 7)"
    assert rejected.detail


def test_rejected_by_reason_counts() -> None:
    records = [
        rec(n=1),
        rec(n=2),  # duplicate of 1
        rec(n=3),  # duplicate of 1
        rec(trace=NO_TRACE, n=4),  # wrong
        rec(trace=CUT_TRACE, n=5),  # unparseable
        rec(trace=NO_TRACE, flagged_correct=True, n=6),  # flag contradicts
        rec(trace=NO_TRACE, gold=0, n=7),  # kept
    ]
    result = verify(batch_of(*records))
    assert result.rejected_by_reason() == {DUPLICATE: 2, FLAG_CONTRADICTS_TEXT: 1, UNPARSEABLE_REASON: 1, WRONG: 1}
    assert list(result.rejected_by_reason()) == sorted(result.rejected_by_reason())
    assert [r.locator for r in result.kept.records] == ["record 1", "record 7"]


# Bundled trace problems whose official gold label the exact solver contradicts (official test
# rows 984, 553, 779, 458 and 920; see `tracesft solve`): their traces answer gold, and are
# still kept aside, because gold there is not to be trusted.
GOLD_CONTRADICTED_BY_SOLVER = (35, 47, 50, 68, 94)


# --- the solver's part: problems that cannot be read, gold labels it contradicts ---------------


@pytest.mark.parametrize("trace", [YES_TRACE, NO_TRACE])
def test_malformed_premise_is_rejected(trace: str) -> None:
    record = rec(query="Premise: A correlates with B, mostly.\nHypothesis: A directly causes B.", trace=trace, gold=1)
    result = verify(batch_of(record))
    assert [r.reason for r in result.rejected] == [MALFORMED_PREMISE]
    assert "closed system" in result.rejected[0].detail


def test_unknown_hypothesis_wording_is_a_malformed_premise() -> None:
    record = rec(query=COLLIDER + "\nHypothesis: A is somehow linked to C.", gold=1)
    assert [r.reason for r in verify(batch_of(record)).rejected] == [MALFORMED_PREMISE]


@pytest.mark.parametrize(("trace", "flag"), [(NO_TRACE, None), (NO_TRACE, True), (YES_TRACE, False)])
def test_gold_contradicted_by_solver(trace: str, flag: bool | None) -> None:
    # Gold says "not implied" for a compelled edge: the solver derives 1, so the record is kept
    # aside whatever the trace answers, and a trace agreeing with the solver is not called wrong.
    record = rec(query=YES_QUERY, trace=trace, gold=0, flagged_correct=flag)
    result = verify(batch_of(record))
    assert [r.reason for r in result.rejected] == [GOLD_CONTRADICTED]
    assert "solver derives 1" in result.rejected[0].detail and "1 of 1" in result.rejected[0].detail


def test_trace_level_reasons_come_before_the_solver() -> None:
    malformed = "Premise: nothing.\nHypothesis: A directly causes B."
    result = verify(batch_of(rec(query=malformed, trace=CUT_TRACE, n=1), rec(query=YES_QUERY, gold=0, trace=YES_TRACE, flagged_correct=True, n=2)))
    assert [r.reason for r in result.rejected] == [UNPARSEABLE_REASON, FLAG_CONTRADICTS_TEXT]


def test_reasons_are_distinct_constants() -> None:
    reasons = (UNPARSEABLE_REASON, FLAG_CONTRADICTS_TEXT, MALFORMED_PREMISE, GOLD_CONTRADICTED, WRONG, DUPLICATE)
    assert len(set(reasons)) == len(reasons)


def test_many_traces_of_one_problem_cost_one_solve() -> None:
    from tracesft.data.solver import equivalence_class

    records = [rec(trace=f"Thought {i}.\n\nAnswer: Yes", n=i) for i in range(50)]
    before = equivalence_class.cache_info()
    result = verify(batch_of(*records))
    after = equivalence_class.cache_info()
    assert len(result.kept.records) == 50
    assert after.misses - before.misses <= 1


def _expected_reason(index: int) -> str | None:
    """What verification must say about problem `index` of the sample, per sample_data's recipe."""
    if index in UNPARSEABLE:
        return UNPARSEABLE_REASON  # read first: no answer, whatever the flag
    if index in FLAG_CONTRADICTS:
        return FLAG_CONTRADICTS_TEXT  # wrong answer, flag says correct
    if index in GOLD_CONTRADICTED_BY_SOLVER:
        return GOLD_CONTRADICTED
    if index in WRONG_ANSWER:
        return WRONG  # wrong answer, flag honestly says wrong
    return None


def test_bundled_sample_gives_the_expected_counts() -> None:
    problems = bundled_rows(TRACE_PROBLEMS_CSV)
    index_of = {p["input"]: i for i, p in enumerate(problems)}
    assert len(index_of) == len(problems)
    special = WRONG_ANSWER + FLAG_CONTRADICTS + UNPARSEABLE + (DUPLICATED,)
    assert 0 <= min(special) and max(special) < len(problems)
    assert not set(special) & set(GOLD_CONTRADICTED_BY_SOLVER)  # one reason per problem

    batch = ingest([str(SAMPLE_DIR)])
    result = verify(batch)

    assert batch.files == [str(SAMPLE_DIR / name) for name in sorted(TRACE_FILES)]
    assert len(batch.records) == len(problems) + 1  # one problem appears twice
    expected: dict[str, int] = {}
    for index in range(len(problems)):
        reason = _expected_reason(index)
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    if _expected_reason(DUPLICATED) is None:
        expected[DUPLICATE] = 1
    assert result.rejected_by_reason() == dict(sorted(expected.items()))
    assert len(result.kept.records) == len(batch.records) - sum(expected.values())

    # And the right problems are rejected for the right reasons.
    for rejection in result.rejected:
        index = index_of[rejection.record.query]
        if rejection.reason == DUPLICATE:
            assert index == DUPLICATED
        else:
            assert rejection.reason == _expected_reason(index), rejection.record.where
    kept_indices = sorted(index_of[r.query] for r in result.kept.records)
    assert kept_indices == [i for i in range(len(problems)) if _expected_reason(i) is None]


def test_bundled_sample_provenance() -> None:
    batch = ingest([str(SAMPLE_DIR)])
    json_file, jsonl_file = (str(SAMPLE_DIR / name) for name in TRACE_FILES)
    sources = {r.source for r in batch.records}
    assert sources == {json_file, jsonl_file}
    assert all(r.locator.startswith("record ") for r in batch.records if r.source == json_file)
    assert all(r.locator.startswith("line ") for r in batch.records if r.source == jsonl_file)
    assert batch.run_metadata[json_file]["model"] == "gpt-4o-2024-08-06"
