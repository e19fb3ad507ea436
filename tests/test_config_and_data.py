"""Run configuration, the SFT split, the eval set, scoring and the training target."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tracesft.config import PRODUCTION_BASE_MODEL, RunConfig, TrainingRecipe, embedded_config_path, load_run_config
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_set import EVAL_COLUMNS, exclude_seen, load_eval_set
from tracesft.evaluate.metrics import score_report, scores
from tracesft.data.prompting import THINK_CLOSE, THINK_OPEN, build_completion
from tracesft.data.sft_dataset import build_sft_dataset, normalize_query, summarize
from tracesft.data.traces import IgnoredFile, SkippedRecord, TraceBatch, TraceRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
SEVEN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_error_names(excinfo: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} not in error message {message!r}"


# --- run configuration -----------------------------------------------------------------------


def test_embedded_config_validates() -> None:
    config = load_run_config()
    assert isinstance(config, RunConfig)
    assert embedded_config_path().is_file()
    assert config.registry.model_name == "corr2cause-tiny-lora"
    assert config.registry.tracking_uri == "sqlite:///.tracesft/mlflow.db"
    # Unset knobs keep the seed recipe.
    assert config.training.lora_r == 16 and config.training.bnb_4bit_quant_type == "nf4"


def test_repo_zenml_config_has_the_seed_recipe() -> None:
    config = load_run_config(REPO_ROOT / "zenml_config.yaml")
    t = config.training
    assert config.base_model == PRODUCTION_BASE_MODEL == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert (t.lora_r, t.lora_alpha, t.lora_dropout) == (16, 32, 0.05)
    assert t.learning_rate == pytest.approx(2e-5)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (1, 8, 3)
    assert t.max_seq_length == 4096
    assert t.use_4bit and t.bnb_4bit_quant_type == "nf4" and t.use_double_quant
    assert t.optim == "paged_adamw_8bit"
    assert t.target_modules == SEVEN_MODULES
    assert config.registry.promotion_margin == 0.0


def test_recipe_defaults_are_the_seed_recipe() -> None:
    assert TrainingRecipe() == load_run_config(REPO_ROOT / "zenml_config.yaml").training
    assert TrainingRecipe().target_modules == SEVEN_MODULES


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_on_bad_record_setting(tmp_path: Path) -> None:
    assert load_run_config(write_config(tmp_path, "parameters:\n  traces: [t]\n  eval_set: e.csv\n")).on_bad_record == "error"
    path = write_config(tmp_path, "parameters:\n  traces: [t]\n  eval_set: e.csv\n  on_bad_record: skip\n")
    assert load_run_config(path).on_bad_record == "skip"
    path = write_config(tmp_path, "parameters:\n  traces: [t]\n  eval_set: e.csv\n  on_bad_record: ignore\n")
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    assert_error_names(excinfo, "parameters.on_bad_record", "'error'", "'skip'")


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(tmp_path / "absent.yaml")
    assert_error_names(excinfo, str(tmp_path / "absent.yaml"), "not found")


def test_config_bad_yaml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "parameters:\n  traces: [a, b\n  eval_set: x.csv\n")
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    assert_error_names(excinfo, str(path), "not valid YAML", "line")


@pytest.mark.parametrize("text", ["", "enable_cache: true\n", "parameters: [1, 2]\n", "- just a list\n"])
def test_config_without_parameters(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    assert_error_names(excinfo, str(path), "`parameters:`")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("  training:\n    lora_rr: 8\n", "parameters.training.lora_rr"),
        ("  registry:\n    modle_name: x\n", "parameters.registry.modle_name"),
        ("  trace: [x]\n", "parameters.trace"),
    ],
)
def test_config_unknown_key_names_its_path(tmp_path: Path, body: str, where: str) -> None:
    path = write_config(tmp_path, "parameters:\n  traces: [t]\n  eval_set: e.csv\n" + body)
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    assert_error_names(excinfo, str(path), where, "Extra inputs are not permitted")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("  training:\n    lora_r: sixteen\n", "parameters.training.lora_r"),
        ("  training:\n    lora_dropout: 1.5\n", "parameters.training.lora_dropout"),
        ("  training:\n    bnb_4bit_quant_type: int8\n", "parameters.training.bnb_4bit_quant_type"),
        ("  training:\n    memory_budget_gib: 0\n", "parameters.training.memory_budget_gib"),
        ("  training:\n    memory_budget_gib: -8\n", "parameters.training.memory_budget_gib"),
        ("  training:\n    memory_budget_gib: forty\n", "parameters.training.memory_budget_gib"),
        ("  dataset:\n    validation_fraction: 0\n", "parameters.dataset.validation_fraction"),
        ("  traces: []\n", "parameters.traces"),
    ],
)
def test_config_wrong_type_or_value_names_its_path(tmp_path: Path, body: str, where: str) -> None:
    text = "parameters:\n  eval_set: e.csv\n" + body
    if "traces:" not in body:
        text += "  traces: [t]\n"
    path = write_config(tmp_path, text)
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    assert_error_names(excinfo, str(path), where)


def test_config_missing_required_parameter(tmp_path: Path) -> None:
    path = write_config(tmp_path, "parameters:\n  traces: [t]\n")
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    assert_error_names(excinfo, str(path), "parameters.eval_set", "required")


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(tmp_path)
    assert_error_names(excinfo, str(tmp_path))


# --- SFT split -------------------------------------------------------------------------------


def make_batch(n_queries: int, copies: int = 1) -> TraceBatch:
    records = []
    for q in range(n_queries):
        for c in range(copies):
            # Copies of a query differ in whitespace, which must not separate them.
            query = f"Premise: problem {q}." + (" " * c) + f"\nHypothesis: claim {q}."
            records.append(
                TraceRecord(
                    query=query, trace=f"Reasoning {q}/{c}.\nAnswer: Yes", gold=q % 2, source=f"run{c}.json", locator=f"record {q + 1}"
                )
            )
    return TraceBatch(records=records, content_hash="f" * 64, files=["run0.json"])


def split_queries(dataset) -> tuple[set[str], set[str]]:
    return {normalize_query(r.query) for r in dataset.train}, {normalize_query(r.query) for r in dataset.validation}


def test_split_is_by_query_even_with_duplicates() -> None:
    batch = make_batch(30, copies=3)
    dataset = build_sft_dataset(batch, validation_fraction=0.2, seed=42)
    train, validation = split_queries(dataset)
    assert train and validation
    assert not train & validation
    assert len(dataset.train) + len(dataset.validation) == len(batch.records)
    assert len(dataset.validation) == 3 * len(validation)  # every copy goes with its query
    assert dataset.queries() == train | validation
    assert (dataset.content_hash, dataset.seed, dataset.validation_fraction) == ("f" * 64, 42, 0.2)


def test_split_is_reproducible_for_a_seed() -> None:
    batch = make_batch(40)
    a = build_sft_dataset(batch, 0.15, seed=7)
    b = build_sft_dataset(batch, 0.15, seed=7)
    assert a == b


def test_split_depends_on_the_seed() -> None:
    batch = make_batch(40)
    assert split_queries(build_sft_dataset(batch, 0.25, seed=1))[1] != split_queries(build_sft_dataset(batch, 0.25, seed=2))[1]


@pytest.mark.parametrize(("n_queries", "fraction", "expected"), [(40, 0.25, 10), (100, 0.15, 15), (20, 0.1, 2), (7, 0.15, 1)])
def test_split_respects_the_fraction(n_queries: int, fraction: float, expected: int) -> None:
    dataset = build_sft_dataset(make_batch(n_queries, copies=2), fraction, seed=3)
    train, validation = split_queries(dataset)
    assert len(validation) == expected
    assert len(train) == n_queries - expected


def test_split_edge_cases() -> None:
    one = build_sft_dataset(make_batch(1, copies=2), 0.5, seed=0)
    assert len(one.train) == 2 and one.validation == []
    two = build_sft_dataset(make_batch(2), 0.01, seed=0)  # at least one problem validates
    assert len(two.train) == 1 and len(two.validation) == 1
    most = build_sft_dataset(make_batch(3), 0.99, seed=0)  # at least one problem trains
    assert len(most.train) == 1 and len(most.validation) == 2


def test_summarize_has_both_splits() -> None:
    dataset = build_sft_dataset(make_batch(20, copies=2), 0.2, seed=42)
    text = summarize(dataset)
    assert text.startswith("# SFT dataset")
    assert f"| train | {len(dataset.train)} |" in text
    assert f"| validation | {len(dataset.validation)} |" in text
    assert "split seed 42" in text and "ffffffffffffffff" in text
    assert "| `run0.json` | 20 |" in text and "| `run1.json` | 20 |" in text
    assert "skipped" not in text and "not read" not in text


def test_dataset_carries_and_summarizes_what_ingestion_skipped_and_left_unread() -> None:
    skipped = [SkippedRecord(source="t/b.jsonl", locator="line 3", error="t/b.jsonl (line 3): not valid JSON\n(x|y)")]
    ignored = [IgnoredFile(path="t/README.md", reason="wrong_extension"), IgnoredFile(path="t/.git", reason="hidden")]
    batch = make_batch(4).model_copy(update={"skipped": skipped, "ignored": ignored})
    dataset = build_sft_dataset(batch, 0.25, seed=0)
    assert (dataset.skipped, dataset.ignored) == (skipped, ignored)
    text = summarize(dataset)
    assert "1 unreadable record(s) skipped at ingestion" in text
    assert "| `t/b.jsonl` | line 3 | t/b.jsonl (line 3): not valid JSON (x\\|y) |" in text  # one table row
    assert "2 path(s) in the traces folders not read" in text
    assert "| `t/README.md` | wrong_extension |" in text and "| `t/.git` | hidden |" in text


# --- eval set --------------------------------------------------------------------------------

HEADER = ",".join(EVAL_COLUMNS) + "\n"


def write_csv(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "eval.csv"
    path.write_text(header + body, encoding="utf-8")
    return path


def test_load_eval_set_good_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path, '"Premise: a.\nHypothesis: b.",1,3,parent\nPremise: c. Hypothesis: d.,0,4,collider\n')
    problems = load_eval_set(path)
    # The first row spans lines 2 and 3 of the file, so the second starts on line 4.
    assert [(p.query, p.label, p.num_variables, p.template, p.row, p.line) for p in problems] == [
        ("Premise: a.\nHypothesis: b.", 1, 3, "parent", 0, 2),
        ("Premise: c. Hypothesis: d.", 0, 4, "collider", 1, 4),
    ]


def test_eval_missing_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "q,1,3\n", header="input,label,num_variables\n")
    with pytest.raises(TracesftError) as excinfo:
        load_eval_set(path)
    assert_error_names(excinfo, str(path), "['template']", "input, label, num_variables, template")


@pytest.mark.parametrize(
    ("rows", "row", "column", "value"),
    [
        ("q0,1,3,parent\nq1,yes,3,parent\n", 1, "label", "'yes'"),
        ("q0,2,3,parent\n", 0, "label", "'2'"),
        ("q0,1,3,parent\nq1,0,3,parent\nq2,1,three,parent\n", 2, "num_variables", "'three'"),
        ("q0,1,,parent\n", 0, "num_variables", "''"),
        ('q0,1,3,parent\n"  ",0,3,parent\n', 1, "input", "empty"),
    ],
)
def test_eval_bad_row_names_file_row_and_column(tmp_path: Path, rows: str, row: int, column: str, value: str) -> None:
    path = write_csv(tmp_path, rows)
    with pytest.raises(TracesftError) as excinfo:
        load_eval_set(path)
    assert_error_names(excinfo, str(path), f"(line {row + 2})", f"'{column}'", value)


def test_eval_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TracesftError) as excinfo:
        load_eval_set(tmp_path / "absent.csv")
    assert_error_names(excinfo, str(tmp_path / "absent.csv"), "eval set not found")


def test_eval_no_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "")
    with pytest.raises(TracesftError) as excinfo:
        load_eval_set(path)
    assert_error_names(excinfo, str(path), "no rows")


def test_eval_short_row_is_a_clear_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "q0,1,3,parent\nq1,1,3\n")
    with pytest.raises(TracesftError) as excinfo:
        load_eval_set(path)
    assert_error_names(excinfo, str(path), "(line 3)", "template")


def test_exclude_seen(tmp_path: Path) -> None:
    path = write_csv(tmp_path, '"Premise: a.  Hypothesis: b.",1,3,parent\nPremise: c.,0,3,parent\nPremise: d.,0,3,parent\n')
    problems = load_eval_set(path)
    kept = exclude_seen(problems, {normalize_query("Premise: a.\nHypothesis:   b."), "Premise: d."})
    assert [p.row for p in kept] == [1]
    assert exclude_seen(problems, set()) == problems


# --- scoring ---------------------------------------------------------------------------------

LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
ANSWERS = ["yes", "yes", "no", "yes", "no", "none", "none", "no"]
TEMPLATES = ["parent", "parent", "parent", "parent", "collider", "collider", "collider", "collider"]
NUM_VARS = [3, 3, 4, 4, 3, 3, 4, 4]


def test_scores_hand_computed() -> None:
    s = scores(LABELS, ANSWERS)
    # tp: 0, 1; fp: 3; fn: 2, 6 ("none" counts as predicted 0); tn: 4, 5 ("none"), 7
    assert s.confusion == {"tp": 2, "fp": 1, "fn": 2, "tn": 3}
    assert s.n == 8
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(1 / 2)
    assert s.f1 == pytest.approx(4 / 7)
    assert s.accuracy == pytest.approx(5 / 8)
    assert s.parse_failure_rate == pytest.approx(2 / 8)


def test_scores_degenerate_cases() -> None:
    none = scores([1, 0], ["none", "none"])
    assert (none.f1, none.precision, none.recall, none.accuracy, none.parse_failure_rate) == (0.0, 0.0, 0.0, 0.5, 1.0)
    perfect = scores([1, 0, 1], ["yes", "no", "yes"])
    assert (perfect.f1, perfect.accuracy, perfect.parse_failure_rate) == (1.0, 1.0, 0.0)
    empty = scores([], [])
    assert (empty.n, empty.f1, empty.accuracy, empty.parse_failure_rate) == (0, 0.0, 0.0, 0.0)


def test_score_report_breakdowns() -> None:
    report = score_report(LABELS, ANSWERS, TEMPLATES, NUM_VARS)
    assert report.f1 == pytest.approx(4 / 7) and report.n == 8
    assert list(report.by_template) == ["collider", "parent"]
    parent, collider = report.by_template["parent"], report.by_template["collider"]
    # parent: (1,yes) tp, (1,yes) tp, (1,no) fn, (0,yes) fp
    assert parent.confusion == {"tp": 2, "fp": 1, "fn": 1, "tn": 0}
    assert parent.f1 == pytest.approx(2 / 3) and parent.accuracy == pytest.approx(0.5)
    # collider: (0,no) tn, (0,none) tn, (1,none) fn, (0,no) tn
    assert collider.confusion == {"tp": 0, "fp": 0, "fn": 1, "tn": 3}
    assert collider.f1 == 0.0 and collider.parse_failure_rate == pytest.approx(0.5)
    assert list(report.by_num_variables) == ["3", "4"]
    three, four = report.by_num_variables["3"], report.by_num_variables["4"]
    # 3 vars: (1,yes) (1,yes) (0,no) (0,none) -> tp 2, tn 2
    assert three.confusion == {"tp": 2, "fp": 0, "fn": 0, "tn": 2} and three.f1 == 1.0
    # 4 vars: (1,no) fn, (0,yes) fp, (1,none) fn, (0,no) tn
    assert four.confusion == {"tp": 0, "fp": 1, "fn": 2, "tn": 1} and four.f1 == 0.0
    assert four.parse_failure_rate == pytest.approx(0.25)


# --- training target -------------------------------------------------------------------------

GPT_TRACE = "  The fork A <- C -> B explains the correlation.\n\nAnswer: No  "
R1_TRACE = "<think>\nA and B share the cause C.\n</think>\n\nSo the hypothesis does not hold.\n\n**Answer:** No"


@pytest.mark.parametrize("prompt", ["<|User|>q<|Assistant|><think>\n", "<|User|>q<|Assistant|><think>"])
def test_completion_after_an_opened_think_does_not_repeat_it(prompt: str) -> None:
    completion = build_completion(prompt, GPT_TRACE, 0)
    assert THINK_OPEN not in completion
    assert completion == "The fork A <- C -> B explains the correlation.\n\nAnswer: No\n</think>\n\nAnswer: No"
    assert (prompt + completion).count(THINK_OPEN) == 1


def test_completion_opens_think_when_the_prompt_does_not() -> None:
    completion = build_completion("<|User|>q<|Assistant|>", GPT_TRACE, 0)
    assert completion.startswith(THINK_OPEN + "\nThe fork")
    assert completion.count(THINK_OPEN) == 1 and completion.count(THINK_CLOSE) == 1


def test_r1_style_trace_is_unwrapped() -> None:
    completion = build_completion("<|Assistant|><think>\n", R1_TRACE, 0)
    assert completion == "A and B share the cause C.\n</think>\n\nAnswer: No"
    unopened = build_completion("<|Assistant|>", R1_TRACE, 0)
    assert unopened == "<think>\nA and B share the cause C.\n</think>\n\nAnswer: No"


@pytest.mark.parametrize(("gold", "line"), [(1, "Answer: Yes"), (0, "Answer: No")])
def test_answer_line_comes_from_gold(gold: int, line: str) -> None:
    completion = build_completion("<|Assistant|>", "Reasoning without a final line.", gold)
    assert completion.endswith(f"{THINK_CLOSE}\n\n{line}")
