"""The bundled demo data can be made again, byte for byte, from its recipe in sample_data.py."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest

from tracesft.evaluate.eval_set import EVAL_COLUMNS, load_eval_set
from tracesft.data.sample_data import (
    DATA,
    EVAL_CSV,
    TRACE_FILES,
    TRACE_PROBLEMS_CSV,
    bundled_rows,
    sample_trace_files,
)
from tracesft.data.sft_dataset import normalize_query

OFFICIAL_TEST_CSV = Path(__file__).resolve().parents[2] / "shared/data/corr2cause/test.csv"
BUNDLED_CSVS = (TRACE_PROBLEMS_CSV, EVAL_CSV)


def select_problems(test_csv: Path, n_traces: int = 100, n_eval: int = 40, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """How the bundled problems were drawn from the official split: a seeded sample, a third of
    it "valid" problems so both classes are seen; the first `n_traces` get traces, the rest is
    the eval set."""
    with test_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(seed)
    by_label = {label: [r for r in rows if r["label"] == label] for label in ("0", "1")}
    for group in by_label.values():
        rng.shuffle(group)
    total = n_traces + n_eval
    positives, negatives = by_label["1"][: total // 3], by_label["0"][: total - total // 3]
    chosen = positives + negatives
    rng.shuffle(chosen)
    return chosen[:n_traces], chosen[n_traces:]


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EVAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r[c] for c in EVAL_COLUMNS} for r in rows)
    return out.getvalue()


def bundled_text(*parts: str) -> str:
    return (DATA.joinpath(*parts)).read_text(encoding="utf-8")


def test_sample_trace_files_reproduce_the_bundled_files() -> None:
    files = sample_trace_files(bundled_rows(TRACE_PROBLEMS_CSV))
    assert sorted(files) == sorted(TRACE_FILES)
    for name, text in files.items():
        assert text.encode("utf-8") == DATA.joinpath("sample_traces", name).read_bytes(), name


def test_sample_trace_files_are_deterministic_and_seeded() -> None:
    problems = bundled_rows(TRACE_PROBLEMS_CSV)
    assert sample_trace_files(problems) == sample_trace_files(problems)
    assert sample_trace_files(problems, seed=12) != sample_trace_files(problems)


def test_trace_problems_and_eval_set_are_disjoint_by_query() -> None:
    traces = [normalize_query(r["input"]) for r in bundled_rows(TRACE_PROBLEMS_CSV)]
    evals = [normalize_query(r["input"]) for r in bundled_rows(EVAL_CSV)]
    assert len(set(traces)) == len(traces)
    assert len(set(evals)) == len(evals)
    assert not set(traces) & set(evals)


@pytest.mark.parametrize("name", BUNDLED_CSVS)
def test_bundled_problems_have_the_official_columns(name: str) -> None:
    header = bundled_text(name).splitlines()[0]
    assert header == ",".join(EVAL_COLUMNS)
    rows = bundled_rows(name)
    assert rows
    for number, row in enumerate(rows):
        assert list(row) == list(EVAL_COLUMNS), number
        assert row["input"].startswith("Premise:") and "Hypothesis:" in row["input"], number
        assert row["label"] in ("0", "1"), number
        assert int(row["num_variables"]) >= 2, number
        assert row["template"].strip(), number
    # Both classes are present, so the demo sees "valid" problems too.
    assert {r["label"] for r in rows} == {"0", "1"}
    # And the loader the pipeline uses accepts the file as is.
    assert len(load_eval_set(Path(str(DATA / name)))) == len(rows)


@pytest.mark.skipif(not OFFICIAL_TEST_CSV.exists(), reason=f"official Corr2Cause test split not present at {OFFICIAL_TEST_CSV}")
def test_select_problems_reproduces_the_bundled_csvs() -> None:
    header = OFFICIAL_TEST_CSV.read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",")[: len(EVAL_COLUMNS)] == list(EVAL_COLUMNS)
    trace_rows, eval_rows = select_problems(OFFICIAL_TEST_CSV)
    assert (len(trace_rows), len(eval_rows)) == (100, 40)
    assert csv_text(trace_rows) == bundled_text(TRACE_PROBLEMS_CSV)
    assert csv_text(eval_rows) == bundled_text(EVAL_CSV)
