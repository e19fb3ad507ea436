"""The data-quality gate: real Great Expectations over traces the real ingestion and verification
kept, from files the project's generator wrote. Each check fails on data made to fail it, alone,
with a message naming the check, the observed value, the bound and the key to change; the demo's
bundled data pass every check; the drift baseline comes back from MLflow; eval problems that leak
into the traces are removed and reported (failing only when too few are left)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.gate_data import eval_problems, lengthened, predictions, problems, recased, without, write_traces
from tracesft.config import QualitySettings, RegistrySettings
from tracesft.data.ingest import ingest
from tracesft.data.quality import (
    Baseline,
    QualityReport,
    coverage_template,
    log_report_to_mlflow,
    previous_accepted_profile,
    report_html,
    validate_traces,
)
from tracesft.data.sample_data import DATA, EVAL_CSV, tokenizer_corpus
from tracesft.data.verify import verify
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EvalProblem, load_eval_set
from tracesft.train.modeling import load_tokenizer
from tracesft.train.tiny_model import build_tiny_model

SAMPLE_DIR = Path(str(DATA / "sample_traces"))
ALL_CHECKS = [
    "traces", "within_length", "valid_share", "template_coverage", "variable_count_coverage", "long_traces",
    "near_duplicates", "source_share", "held_out_eval", "valid_share_drift", "length_drift",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())))


@pytest.fixture(scope="module")
def verified():
    return verify(ingest([str(SAMPLE_DIR)])).kept


@pytest.fixture(scope="module")
def eval_set() -> list[EvalProblem]:
    return load_eval_set(Path(str(DATA / EVAL_CSV)))


@pytest.fixture(scope="module")
def generated_eval() -> list[EvalProblem]:
    return eval_problems(problems(30, seed=2))


@pytest.fixture(scope="module")
def clean() -> list[dict]:
    """93 right answers over 4-6 variables and every template, 30% of them valid."""
    return predictions(problems(93, seed=1))


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """One sqlite MLflow store for the module (creating one costs seconds); tests use their own experiments."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield
    patch.undo()


@pytest.fixture
def gate(tmp_path: Path, tokenizer, generated_eval):
    """Write the records as result files, ingest and verify them for real, then run the gate."""

    def run(
        files: dict[str, list[dict]],
        settings: QualitySettings | None = None,
        evaluation: list[EvalProblem] | None = None,
        max_seq_length: int = 4096,
        baseline: Baseline | None = None,
    ) -> QualityReport:
        folder = write_traces(tmp_path / f"traces-{len(list(tmp_path.iterdir()))}", files)
        result = verify(ingest([str(folder)]))
        assert not result.rejected, result.rejected_by_reason()  # only the gate may object
        return validate_traces(result.kept, tokenizer, max_seq_length, evaluation or generated_eval, settings, baseline)

    return run


def two_files(records: list[dict]) -> dict[str, list[dict]]:
    return {"run1.jsonl": records[::2], "run2.jsonl": records[1::2]}


def only_failure(report: QualityReport, check: str) -> str:
    """The one failed check is `check`; returns the error the dataset step would raise."""
    assert [o.id for o in report.failures()] == [check], [o.message() for o in report.failures()]
    with pytest.raises(TracesftError) as raised:
        report.raise_for_failure()
    assert str(raised.value) == report.failures()[0].message()
    return str(raised.value)


def test_the_demo_data_pass_every_check(tokenizer, verified, eval_set) -> None:
    report = validate_traces(verified, tokenizer, 4096, eval_set)
    assert report.success, [o.message() for o in report.failures()]
    assert [o.id for o in report.outcomes] == ALL_CHECKS
    assert report.row_count == len(verified.records) and report.profile.traces == len(verified.records)
    assert (report.eval_problems, report.eval_overlap, report.held_out_eval_problems) == (40, [], 40)
    report.raise_for_failure()  # no error
    page = report_html(report)
    assert "passed" in page and "40 held out" in page and "none (drift checks skipped)" in page


def test_generated_clean_traces_pass_and_drift_is_skipped_without_a_baseline(gate, clean) -> None:
    report = gate(two_files(clean))
    assert report.success, [o.message() for o in report.failures()]
    skipped = {o.id: o.skipped for o in report.outcomes if o.skipped}
    assert set(skipped) == {"valid_share_drift", "length_drift"}
    assert "no previous accepted dataset" in skipped["length_drift"] and report.baseline is None
    assert 0.2 < report.profile.valid_share < 0.4 and len(report.profile.token_lengths) == 93


def test_the_same_data_again_pass_the_drift_checks(gate, clean) -> None:
    first = gate(two_files(clean))
    again = gate(two_files(clean), baseline=Baseline(profile=first.profile, source="MLflow run abc"))
    assert again.success and not [o for o in again.outcomes if o.skipped]
    drift = {o.id: o for o in again.outcomes}
    assert drift["length_drift"].observed == pytest.approx(0.0, abs=1e-3)  # the baseline's bins are smoothed
    assert drift["valid_share_drift"].minimum == pytest.approx(first.profile.valid_share - 0.15)
    assert again.baseline == "MLflow run abc"


def test_too_few_traces_names_the_count_the_minimum_and_the_key(gate, clean) -> None:
    message = only_failure(gate(two_files(clean), QualitySettings(min_traces=1000)), "traces")
    assert message == "quality gate: verified traces 93 is below 1000 (quality.min_traces)"


def test_no_verified_traces_fail_the_count_and_skip_what_needs_traces(tokenizer, generated_eval, clean, tmp_path: Path) -> None:
    wrong = [r | {"response": r["response"].replace("Answer: No", "Answer: Yes"), "prediction": "Yes", "correct": False}
             for r in clean if r["label"] == 0]
    kept = verify(ingest([str(write_traces(tmp_path, {"gpt.jsonl": wrong}))])).kept
    report = validate_traces(kept, tokenizer, 4096, generated_eval)
    templates = sorted(Counter(coverage_template(p.template) for p in generated_eval).items())
    variable_counts = sorted(Counter(p.num_variables for p in generated_eval).items())
    assert [o.message() for o in report.failures()] == [
        "quality gate: verified traces 0 is below 1 (quality.min_traces)",
        "quality gate: fewest traces of an eval relation template 0 is below 1 (quality.min_traces_per_template): "
        + ", ".join(f"{t}: 0 traces (eval set: {n})" for t, n in templates),
        "quality gate: fewest traces of an eval variable count 0 is below 1 (quality.min_traces_per_variable_count): "
        + ", ".join(f"{v} variables: 0 traces (eval set: {n})" for v, n in variable_counts),
    ]
    assert {o.id for o in report.outcomes if o.skipped == "no verified traces"} == set(ALL_CHECKS) - {
        "traces", "template_coverage", "variable_count_coverage", "held_out_eval"
    }


def test_traces_over_max_seq_length(gate, clean) -> None:
    lengths = sorted(gate(two_files(clean)).profile.token_lengths)
    report = gate(two_files(clean), max_seq_length=lengths[-3])  # the two longest do not fit
    message = only_failure(report, "within_length")
    assert message.startswith(f"quality gate: share of traces within training.max_seq_length ({lengths[-3]} tokens) 0.98 ")
    assert "is below 1.00 (quality.within_length_share / training.max_seq_length): 2 trace(s), e.g. " in message
    assert gate(two_files(clean), QualitySettings(within_length_share=0.95), max_seq_length=lengths[-3]).success


def test_a_single_label_fails_the_valid_class_share(gate) -> None:
    message = only_failure(gate(two_files(predictions(problems(93, seed=3, positive_share=0.0)))), "valid_share")
    assert message == (
        "quality gate: valid-class share 0.00 is outside [0.10, 0.90] (quality.min_valid_share / quality.max_valid_share)"
    )


def test_a_template_of_the_eval_set_without_traces_fails_coverage(gate, clean, generated_eval) -> None:
    rows = without(problems(93, seed=1), template="has_confounder")
    message = only_failure(gate(two_files(predictions(rows))), "template_coverage")
    eval_count = sum(p.template == "has_confounder" for p in generated_eval)
    assert message == (
        "quality gate: fewest traces of an eval relation template 0 is below 1 (quality.min_traces_per_template): "
        f"has_confounder: 0 traces (eval set: {eval_count})"
    )


def test_a_variable_count_of_the_eval_set_without_traces_fails_coverage(gate) -> None:
    rows = without(problems(93, seed=1), num_variables=4)
    message = only_failure(gate(two_files(predictions(rows))), "variable_count_coverage")
    assert message.startswith(
        "quality gate: fewest traces of an eval variable count 0 is below 1 (quality.min_traces_per_variable_count): "
        "4 variables: 0 traces (eval set: "
    )


def test_long_outliers_fail_by_share(gate, clean) -> None:
    records = [lengthened(r, 10) if i % 10 == 0 else r for i, r in enumerate(clean)]  # 10 of 93
    message = only_failure(gate(two_files(records)), "long_traces")
    assert "quality gate: share of traces over 3x the median token length (" in message
    assert ") 0.11 is above 0.05 (quality.max_long_trace_share / quality.long_trace_multiple): 10 trace(s), e.g. " in message
    assert gate(two_files(records), QualitySettings(max_long_trace_share=0.2)).success


def test_near_duplicate_reasoning_fails_by_share(gate, clean) -> None:
    records = clean + [recased(r) for r in clean[:15]]
    message = only_failure(gate(two_files(records)), "near_duplicates")
    assert "quality gate: share of traces repeating another's normalised reasoning 0.1" in message
    assert "is above 0.10 (quality.max_near_duplicate_share): e.g. " in message and " ≈ " in message


def test_one_file_dominating_fails_and_a_single_file_is_not_compared(gate, clean) -> None:
    message = only_failure(gate({"big.jsonl": clean[:85], "small.jsonl": clean[85:]}), "source_share")
    assert message.startswith("quality gate: largest share of the traces from one file 0.91 is above 0.80 (quality.max_source_share): ")
    assert message.endswith("big.jsonl holds 85 of 93 traces")
    single = gate({"all.jsonl": clean})
    assert single.success, [o.message() for o in single.failures()]
    assert {o.id: o.skipped for o in single.outcomes}["source_share"].startswith("one source file")


def test_valid_share_drift_from_the_previous_accepted_dataset(gate, clean) -> None:
    previous = gate(two_files(predictions(problems(93, seed=4, positive_share=0.7))))
    assert previous.success and previous.profile.valid_share > 0.6
    report = gate(two_files(clean), baseline=Baseline(profile=previous.profile, source="MLflow run prev (data-quality r1)"))
    message = only_failure(report, "valid_share_drift")
    low, high = previous.profile.valid_share - 0.15, previous.profile.valid_share + 0.15
    assert message == (
        f"quality gate: valid-class share against the previous accepted dataset {report.profile.valid_share:.2f} is outside "
        f"[{low:.2f}, {high:.2f}] (quality.max_valid_share_drift): previous accepted dataset "
        f"{previous.profile.valid_share:.2f} (MLflow run prev (data-quality r1))"
    )


def test_length_drift_from_the_previous_accepted_dataset(gate, clean) -> None:
    previous = gate(two_files(clean))
    longer = gate(two_files([lengthened(r, 3) for r in clean]), baseline=Baseline(profile=previous.profile, source="MLflow run prev"))
    message = only_failure(longer, "length_drift")
    assert message.startswith("quality gate: token-length KL divergence from the previous accepted dataset ")
    assert " is above 0.50 (quality.max_length_kl_divergence): median token length " in message
    assert longer.failures()[0].observed > 1.0


def test_leaked_eval_problems_are_removed_and_reported_not_failed(tokenizer, verified, eval_set) -> None:
    leaked = traced_as_eval(verified, 3)
    report = validate_traces(verified, tokenizer, 4096, eval_set + leaked)
    assert report.success, report.failures()
    assert [o.eval_row for o in report.eval_overlap] == [1000, 1001, 1002]
    assert report.eval_overlap[0].traces == [verified.records[0].where]
    assert report.held_out_eval_problems == 40
    # Named by its line, counted from 1 with the header as line 1, as everywhere else.
    assert [o.eval_line for o in report.eval_overlap] == [1002, 1003, 1004]
    assert "eval set line 1002: also in" in report_html(report)


def test_too_little_held_out_eval_data_fails_and_names_the_check(tokenizer, verified, eval_set) -> None:
    leaked = traced_as_eval(verified, 10)
    settings = QualitySettings(min_held_out_eval_problems=5, min_held_out_eval_share=0.5)
    message = only_failure(validate_traces(verified, tokenizer, 4096, eval_set[:4] + leaked, settings), "held_out_eval")
    assert message.startswith(
        "quality gate: held-out eval problems 4 is below 7 "
        "(quality.min_held_out_eval_problems / quality.min_held_out_eval_share): eval set line 1002 is also traced in "
    )


def traced_as_eval(verified, count: int, first_row: int = 1000) -> list[EvalProblem]:
    """Eval problems that are copies of traced problems (leakage), one CSV line each after the header."""
    return [
        EvalProblem(query=r.query, label=r.gold, num_variables=6, template="parent", row=first_row + i, line=first_row + i + 2)
        for i, r in enumerate(verified.records[:count])
    ]


def test_the_report_page_shows_every_check_with_its_value_and_bound(gate, clean) -> None:
    report = gate(two_files(predictions(problems(93, seed=3, positive_share=0.0))))
    page = report_html(report)
    assert page.count("<tr") == 1 + len(ALL_CHECKS) and "FAILED" in page
    assert "<td>FAIL</td><td>valid-class share</td><td>0.000</td><td>[0.10, 0.90]</td>" in page
    assert "<td>quality.min_valid_share, quality.max_valid_share</td><td>expect_column_mean_to_be_between</td>" in page
    assert page.count("<td>skipped</td>") == 2 and page.count("<td>pass</td>") == len(ALL_CHECKS) - 3


def test_the_drift_baseline_is_the_newest_accepted_report_in_the_experiment(tokenizer, verified, eval_set, mlflow_store) -> None:
    registry = RegistrySettings(experiment_name="gate-baseline")
    assert previous_accepted_profile(registry) is None
    accepted = validate_traces(verified, tokenizer, 4096, eval_set)
    run_id = log_report_to_mlflow(accepted, registry, {"zenml_run_name": "accepted"})
    refused = validate_traces(verified, tokenizer, 4096, eval_set, QualitySettings(min_traces=1000))
    log_report_to_mlflow(refused, registry, {"zenml_run_name": "refused"})  # newer, but not accepted
    baseline = previous_accepted_profile(registry)
    assert baseline.profile == accepted.profile
    assert baseline.source == f"MLflow run {run_id} (data-quality accepted)"
    assert previous_accepted_profile(RegistrySettings(experiment_name="another-configuration")) is None


def test_report_is_logged_to_mlflow(tokenizer, verified, eval_set, mlflow_store) -> None:
    import mlflow

    report = validate_traces(verified, tokenizer, 4096, eval_set + traced_as_eval(verified, 2))
    run_id = log_report_to_mlflow(report, RegistrySettings(experiment_name="quality-test"), {"zenml_run_name": "run-1"})
    run = mlflow.get_run(run_id)
    assert run.data.tags["tracesft.kind"] == "data_quality" and run.data.tags["zenml_run_name"] == "run-1"
    assert run.info.run_name == "data-quality run-1"
    assert run.data.metrics["quality_success"] == 1.0 and run.data.metrics["failed_checks"] == 0.0
    assert run.data.metrics["eval_overlap_removed"] == 2.0
    assert run.data.metrics["verified_traces"] == len(verified.records)
    assert run.data.metrics["gate.valid_share"] == pytest.approx(report.profile.valid_share)
    assert "gate.length_drift" not in run.data.metrics  # skipped: no value
    artifacts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path="data_quality")}
    assert artifacts == {"data_quality/report.json", "data_quality/report.html"}
    logged = mlflow.artifacts.load_dict(f"runs:/{run_id}/data_quality/report.json")
    assert [o["eval_row"] for o in logged["eval_overlap"]] == [1000, 1001]
    assert QualityReport.model_validate(logged) == report


def test_valid_share_bounds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="min_valid_share must not exceed max_valid_share"):
        QualitySettings(min_valid_share=0.9, max_valid_share=0.1)
