"""The data-quality gate: real Great Expectations over real tokenised traces, thresholds from the
config, eval problems that leak into the traces removed and reported (failing only when too few
are left), a failure message naming the failed expectations, and the report logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracesft.config import QualitySettings, RegistrySettings
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem, load_eval_set
from tracesft.data.ingest import ingest
from tracesft.train.modeling import load_tokenizer
from tracesft.data.quality import log_report_to_mlflow, report_html, validate_traces
from tracesft.data.sample_data import DATA, EVAL_CSV, tokenizer_corpus
from tracesft.train.tiny_model import build_tiny_model
from tracesft.data.verify import verify

SAMPLE_DIR = Path(str(DATA / "sample_traces"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())))


@pytest.fixture(scope="module")
def verified():
    return verify(ingest([str(SAMPLE_DIR)])).kept


@pytest.fixture(scope="module")
def eval_problems() -> list[EvalProblem]:
    return load_eval_set(Path(str(DATA / EVAL_CSV)))


def traced_as_eval(verified, count: int, first_row: int = 1000) -> list[EvalProblem]:
    """Eval problems that are copies of traced problems (leakage)."""
    return [
        EvalProblem(query=r.query, label=r.gold, num_variables=3, template="parent", row=first_row + i)
        for i, r in enumerate(verified.records[:count])
    ]


def test_clean_traces_pass(tokenizer, verified, eval_problems) -> None:
    report = validate_traces(verified, tokenizer, 4096, eval_problems)
    assert report.success, report.failures()
    assert report.row_count == len(verified.records)
    assert (report.eval_problems, report.eval_overlap, report.held_out_eval_problems) == (40, [], 40)
    report.raise_for_failure()  # no error
    assert "passed" in report_html(report) and "40 held out" in report_html(report)


def test_leaked_eval_problems_are_removed_and_reported_not_failed(tokenizer, verified, eval_problems) -> None:
    leaked = traced_as_eval(verified, 3)
    report = validate_traces(verified, tokenizer, 4096, eval_problems + leaked)
    assert report.success, report.failures()
    assert [o.eval_row for o in report.eval_overlap] == [1000, 1001, 1002]
    assert report.eval_overlap[0].traces == [verified.records[0].where]
    assert report.held_out_eval_problems == 40
    assert "eval row 1000: also in" in report_html(report)


def test_too_little_held_out_eval_data_fails_and_names_the_expectation(tokenizer, verified, eval_problems) -> None:
    leaked = traced_as_eval(verified, 10)
    settings = QualitySettings(min_held_out_eval_problems=5, min_held_out_eval_share=0.5)
    report = validate_traces(verified, tokenizer, 4096, eval_problems[:4] + leaked, settings)
    assert not report.success
    [failure] = report.failures()
    assert "expect_table_row_count_to_be_between (held-out eval problems >= 7)" == failure.expectation
    with pytest.raises(TracesftError) as excinfo:
        report.raise_for_failure()
    message = str(excinfo.value)
    assert "failed 1 expectation(s)" in message and "held-out eval problems >= 7" in message
    assert "eval row 1000 is also traced in" in message


def test_length_and_answer_expectations_with_thresholds(tokenizer, eval_problems) -> None:
    raw = ingest([str(SAMPLE_DIR)])  # unverified: wrong and unanswered traces are still in
    report = validate_traces(raw, tokenizer, 64, eval_problems, QualitySettings(min_traces=500))
    failed = {o.expectation for o in report.failures()}
    assert failed == {
        "expect_table_row_count_to_be_between",  # min_traces from the config
        "expect_column_values_to_be_in_set",  # unparseable answers, answers against gold
        "expect_column_values_to_be_between",  # token length over 64
        "expect_compound_columns_to_be_unique",  # the duplicated record
    }
    with pytest.raises(TracesftError, match="expect_column_values_to_be_between on token_length"):
        report.raise_for_failure()
    tolerant = QualitySettings(within_length_share=0.001)
    lengths = validate_traces(raw, tokenizer, 700, eval_problems, tolerant)
    assert all(o.success for o in lengths.outcomes if o.column == "token_length")


def test_report_is_logged_to_mlflow(tokenizer, verified, eval_problems, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    report = validate_traces(verified, tokenizer, 4096, eval_problems + traced_as_eval(verified, 2))
    run_id = log_report_to_mlflow(report, RegistrySettings(experiment_name="quality-test"), {"zenml_run_name": "run-1"})
    run = mlflow.get_run(run_id)
    assert run.data.tags["tracesft.kind"] == "data_quality" and run.data.tags["zenml_run_name"] == "run-1"
    assert run.info.run_name == "data-quality run-1"
    assert run.data.metrics["quality_success"] == 1.0
    assert run.data.metrics["eval_overlap_removed"] == 2.0
    assert run.data.metrics["verified_traces"] == len(verified.records)
    artifacts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path="data_quality")}
    assert artifacts == {"data_quality/report.json", "data_quality/report.html"}
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/data_quality/report.json")
    assert [o["eval_row"] for o in logged["eval_overlap"]] == [1000, 1001]
