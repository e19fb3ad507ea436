"""Evaluation end to end on the tiny model: fast inference computes the seed path's function, an
evaluation resumes from its cache, and the comparison reaches the report page, MLflow and
`tracesft score`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tracesft.train.adapter import LoraAdapter, write_metadata
from tracesft.cli import main
from tracesft.evaluate.comparison import compare_models
from tracesft.config import EvalSettings, RegistrySettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.evaluate.eval_report import render_evaluation_html
from tracesft.evaluate.eval_set import load_eval_set, validation_problems
from tracesft.evaluate.eval_tracking import ARTIFACT_DIR, log_evaluation_run
from tracesft.evaluate.evaluation import EvalReport, Prediction, evaluate, score_predictions
from tracesft.generate.batching import GenerationStats
from tracesft.generate.inference import LoraLinear, prepare_for_inference, project
from tracesft.train.modeling import load_base_model
from tracesft.data.sample_data import DATA, EVAL_CSV, tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.train.tiny_model import build_tiny_model
from tracesft.data.traces import TraceRecord

EVAL_PATH = Path(str(DATA / EVAL_CSV))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())


def _random_lora(model: nn.Module, seed: int = 0, lora_alpha: int = 8) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return peft_model.eval()


# --- fast inference --------------------------------------------------------------------------


@pytest.mark.parametrize("lora_alpha", [8, 12])  # scaling 2 (folded into lora_B) and 3 (applied as PEFT does)
def test_fast_inference_keeps_the_function_of_a_lora_model(model_dir: Path, lora_alpha: int) -> None:
    model = _random_lora(load_base_model(str(model_dir), TrainingRecipe(), "cpu"), lora_alpha=lora_alpha)
    ids = torch.randint(5, 500, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        prepared = prepare_for_inference(model)
        after = prepared(input_ids=ids).logits
        plain = load_base_model(str(model_dir), TrainingRecipe(), "cpu")(input_ids=ids).logits
    assert type(prepared).__name__ == "Qwen2ForCausalLM"
    assert sum(isinstance(m, LoraLinear) for m in prepared.modules()) == 3 * 2  # q, v, down of both layers
    assert torch.equal(before, after)  # PEFT's arithmetic, op for op
    assert not torch.allclose(plain, after, atol=1e-3)  # the adapter did change the function


@pytest.mark.parametrize("round_update_first", [True, False])
def test_sibling_projections_share_one_cast_and_keep_every_bit(round_update_first: bool) -> None:
    """`project` (the engine's q/k/v and gate/up) equals calling the modules one by one, also when
    one of them has no adapter (then it is exactly that)."""
    torch.manual_seed(0)
    siblings = [LoraLinear(nn.Linear(32, width, dtype=torch.bfloat16), torch.randn(4, 32) * 0.1, torch.randn(width, 4) * 0.1,
                           scaling, round_update_first) for width, scaling in ((48, 2.0), (16, 3.0))]
    x = torch.randn(5, 32).to(torch.bfloat16)
    for modules in (siblings, [*siblings, nn.Linear(32, 8, dtype=torch.bfloat16)]):
        assert all(torch.equal(got, module(x)) for got, module in zip(project(x, modules), modules, strict=True))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_fast_inference_keeps_nf4_layers_and_peft_arithmetic(compute_dtype: torch.dtype) -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = bnb.nn.Linear4bit(64, 128, bias=True, compute_dtype=compute_dtype, quant_type="nf4")
            self.down = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=compute_dtype, quant_type="nf4")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = Tiny()
    for layer in (model.up, model.down):
        weight = torch.randn(layer.out_features, layer.in_features) * 0.1
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
        layer.bias = None if layer.bias is None else nn.Parameter(torch.randn(layer.out_features).to(compute_dtype), requires_grad=False)
    up, down = model.up, model.down
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["up"]))
    with torch.no_grad():
        peft_model.base_model.model.up.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(5, 64).to(compute_dtype)
    with torch.inference_mode():
        expected = peft_model(x)
        prepared = prepare_for_inference(peft_model)
        assert isinstance(prepared.up, LoraLinear) and prepared.up.base is up
        assert prepared.down is down  # no adapter there: untouched
        assert torch.equal(prepared(x), expected)


# --- evaluate: three sets, one cache ---------------------------------------------------------


def test_evaluate_scores_three_sets_and_resumes_from_its_cache(model_dir: Path, tmp_path: Path) -> None:
    problems = load_eval_set(EVAL_PATH)[:6]
    validation = problems[:2]
    settings = EvalSettings(max_new_tokens=6, batch_size=4, cache_dir=str(tmp_path / "cache"), fast_inference=True)
    report = evaluate(str(model_dir), problems, settings, TrainingRecipe(), "cpu", validation=validation)
    assert report.model == "base" and report.scores.n == 6
    assert report.renamed is not None and report.renamed.scores.n == 6
    assert report.validation is not None and report.validation.scores.n == 2
    assert report.robustness_f1_drop == pytest.approx(report.scores.f1 - report.renamed.scores.f1)
    assert "Z" in report.renamed.predictions[0].input and report.predictions[0].input == problems[0].query
    assert report.generation.generated == 14 and report.generation.from_cache == 0
    assert report.generation.engine == "dense-engine-fp32"
    # What generation cost, counted by the engine: 14 answers of at most 6 new tokens.
    assert report.generation.seconds > 0 and 14 <= report.generation.generated_tokens <= 14 * 6
    assert report.generation.tokens_per_s == round(report.generation.generated_tokens / report.generation.seconds, 1)
    assert report.generation.preemptions == 0 and "tokens_per_s" in report.generation.model_dump()

    again = evaluate(str(model_dir), problems, settings, TrainingRecipe(), "cpu", validation=validation)
    assert again.generation.generated == 0 and again.generation.from_cache == 14
    assert again.generation.generated_tokens == 0  # all from the cache
    assert [p.output for p in again.predictions] == [p.output for p in report.predictions]
    assert "robustness_f1_drop" in again.model_dump()

    seed_path = evaluate(str(model_dir), problems, settings.model_copy(update={"fast_inference": False}), TrainingRecipe(), "cpu")
    assert seed_path.generation.generated == 12  # another engine: its own cache entries
    assert seed_path.generation.generated_tokens is None and seed_path.generation.tokens_per_s is None  # not counted by HF
    assert [p.output for p in seed_path.predictions] == [p.output for p in report.predictions]


# --- comparison, report page, MLflow -----------------------------------------------------------


def _report(model: str, answers: list[str]) -> EvalReport:
    problems = load_eval_set(EVAL_PATH)[: len(answers)]
    texts = {"yes": "Answer: Yes", "no": "Answer: No", "none": "?"}
    predictions = [
        Prediction(row=p.row, label=p.label, template=p.template, num_variables=p.num_variables,
                   output=texts[a], answer=a, input=p.query)
        for p, a in zip(problems, answers)
    ]
    from tracesft.evaluate.evaluation import SetResult

    renamed = SetResult(scores=score_predictions(predictions[::-1][: len(predictions)]), predictions=predictions)
    generation = GenerationStats(examples=len(answers), from_cache=0, generated=len(answers), final_batch_size=4,
                                 engine="nf4-dq>bf16-engine-bf16", seconds=2.0, generated_tokens=50, preemptions=0)
    return EvalReport(model=model, scores=score_predictions(predictions), predictions=predictions, renamed=renamed,
                      generation=generation)


def test_compare_models_and_its_report(tmp_path: Path) -> None:
    labels = [p.label for p in load_eval_set(EVAL_PATH)[:20]]
    base = _report("base", ["no"] * 20)
    tuned = _report("fine-tuned", ["yes" if y else "no" for y in labels])
    comparison = compare_models(base, tuned, EvalSettings(bootstrap_resamples=500))
    assert comparison.problems == 20 and comparison.finetuned_f1 == 1.0 and comparison.base_f1 == 0.0
    assert comparison.f1_difference.observed == 1.0 and comparison.f1_difference.low > 0
    assert {"f1_difference", "f1_difference_ci_low", "f1_difference_ci_high"} <= set(comparison.metrics())
    page = render_evaluation_html(base, tuned, comparison)
    assert "data:image/png;base64," in page and "By relation template" in page and "renamed variables" in page
    assert "+1.000" in page
    # Each confusion matrix: its table with its picture beside it.
    assert page.count("alt='confusion matrix, ") == 2
    assert re.search(r"<div style='display:flex[^>]*><table><tr><th>fine-tuned</th>.*?</table><img alt='confusion matrix, fine-tuned'", page)

    with pytest.raises(TracesftError, match="not on the same problems"):
        compare_models(base, _report("fine-tuned", ["no"] * 19), EvalSettings())


def test_figures_render_without_pyplot_or_a_process_wide_backend() -> None:
    """The plots are bare matplotlib Figures: drawing them chooses no backend for the process."""
    code = (
        "import sys\n"
        "from tracesft.evaluate.eval_report import figure_png\n"
        "from tracesft.train.tracking import loss_curve\n"
        "png = figure_png(loss_curve([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.0, 'eval_loss': 1.5}]))\n"
        "assert png.startswith(bytes([0x89]) + b'PNG'), png[:8]\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluation_is_logged_into_the_training_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from tracesft.train.tracking import mlflow_tracking

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    settings = RegistrySettings(experiment_name="eval-test")
    with mlflow_tracking(settings) as experiment, mlflow.start_run(experiment_id=experiment) as training_run:
        mlflow.log_metric("train_loss", 0.5)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    adapter = write_metadata(adapter_dir, {"mlflow_run_id": training_run.info.run_id})
    base, tuned = _report("base", ["no", "yes", "none", "no"]), _report("fine-tuned", ["yes", "no", "no", "no"])
    comparison = compare_models(base, tuned, EvalSettings(bootstrap_resamples=200))

    run_id = log_evaluation_run(adapter, base, tuned, comparison, settings)
    assert run_id == training_run.info.run_id
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["finetuned_f1"] == pytest.approx(tuned.scores.f1)
    assert metrics["f1_difference_ci_low"] == pytest.approx(comparison.f1_difference.low)
    assert "base_renamed_f1" in metrics and "finetuned_robustness_f1_drop" in metrics
    assert any(name.startswith("finetuned_f1_template_") for name in metrics)
    assert metrics["base_generation_s"] == 2.0 and metrics["finetuned_generation_tokens_per_s"] == 25.0
    artifacts = {a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)}
    assert {f"{ARTIFACT_DIR}/report.html", f"{ARTIFACT_DIR}/f1_by_template.png", f"{ARTIFACT_DIR}/comparison.json",
            f"{ARTIFACT_DIR}/base_eval_predictions.json", f"{ARTIFACT_DIR}/finetuned_renamed_predictions.json"} <= artifacts
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{ARTIFACT_DIR}/finetuned_eval_predictions.json")
    answers = [row[table["columns"].index("answer")] for row in table["data"]]
    assert answers == ["yes", "no", "no", "no"] and "output" in table["columns"]


# --- tracesft score --------------------------------------------------------------------------


def _write_predictions(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _gold(tmp_path: Path) -> Path:
    path = tmp_path / "gold.csv"
    path.write_text(
        "input,label,num_variables,template\n"
        '"Premise: p1.\nHypothesis: h1.",1,3,parent\n'
        '"Premise: p2.\nHypothesis: h2.",1,4,parent\n'
        '"Premise: p3.\nHypothesis: h3.",0,4,child\n'
        '"Premise: p4.\nHypothesis: h4.",0,3,child\n'
    )
    return path


def test_score_hand_computed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    predictions = _write_predictions(tmp_path / "p.jsonl", [
        {"input": "Premise: p1.  Hypothesis: h1.", "output": "<think>...</think>\nAnswer: Yes"},  # tp (whitespace differs)
        {"input": "Premise: p2.\nHypothesis: h2.", "output": "<think>never closed"},  # unparseable: fn
        {"input": "Premise: p3.\nHypothesis: h3.", "output": "Answer: Yes"},  # fp
        {"input": "Premise: p4.\nHypothesis: h4.", "output": "Answer: No"},  # tn
    ])
    assert main(["score", "--gold", str(_gold(tmp_path)), "--predictions", str(predictions), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert (result["f1"], result["precision"], result["recall"], result["accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    assert result["parse_failure_rate"] == 0.25
    assert result["by_template"]["parent"]["recall"] == 0.5 and result["by_template"]["child"]["precision"] == 0.0
    assert result["by_num_variables"]["3"]["accuracy"] == 1.0 and result["by_num_variables"]["4"]["accuracy"] == 0.0


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"input": "Premise: p1.\\nHypothesis: h1.", "output": "Yes"', ], ["line 1", "not valid JSON"]),
        ([["a list"]], ["line 1", "JSON object"]),
        ([{"input": "Premise: p1.\nHypothesis: h1."}], ["line 1", "'output' is missing"]),
        ([{"input": "Premise: p1.\nHypothesis: h1.", "output": 1}], ["line 1", "'output' must be a string"]),
        ([{"input": "Premise: nowhere.", "output": "Yes"}], ["not a problem of", "lines 1"]),
        ([{"input": "Premise: p1.\nHypothesis: h1.", "output": "Yes"}], ["no prediction for 3 of 4", "--allow-missing"]),
        (
            [{"input": "Premise: p1.\nHypothesis: h1.", "output": "Yes"}, {"input": "Premise: p1.\nHypothesis: h1.", "output": "No"}],
            ["line 2", "second, different output", "line 1"],
        ),
        ([""], ["no predictions"]),
    ],
)
def test_score_errors_name_the_line(tmp_path: Path, capsys: pytest.CaptureFixture, lines: list, expected: list[str]) -> None:
    predictions = _write_predictions(tmp_path / "p.jsonl", lines)
    assert main(["score", "--gold", str(_gold(tmp_path)), "--predictions", str(predictions), "--json"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "Traceback" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_score_allow_missing_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    predictions = _write_predictions(tmp_path / "p.jsonl", [{"input": "Premise: p1.\nHypothesis: h1.", "output": "Answer: Yes"}])
    gold = _gold(tmp_path)
    assert main(["score", "--gold", str(gold), "--predictions", str(predictions), "--allow-missing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1
    assert main(["score", "--gold", str(gold), "--predictions", str(tmp_path / "absent.jsonl")]) == 2
    assert "predictions file not found" in capsys.readouterr().err
    assert main(["score", "--gold", str(tmp_path / "absent.csv"), "--predictions", str(predictions)]) == 2
    assert "eval set not found" in capsys.readouterr().err
    assert main(["score", "--gold", str(gold), "--predictions", str(predictions), "--allow-missing"]) == 0
    assert "1 problems: F1 1.000" in capsys.readouterr().out
