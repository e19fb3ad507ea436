"""Training on the tiny model, on the CPU, with the real TRL/PEFT/MLflow code paths.

What is proven here: which tokens carry loss (the prompt none, the reasoning, the answer line and
EOS all), that a tokenizer adding its own BOS (as the R1 distill's does) does not double it, that
a packed row gives each example the loss it has alone, that a run killed mid-way and resumed ends
with the adapter of an uninterrupted run, that training metrics and the loss curve reach a real
MLflow store, and that full fine-tuning produces a model evaluation can score.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.evaluate.eval_set import EvalProblem
from tracesft.evaluate.evaluation import evaluate
from tracesft.data.ingest import ingest
from tracesft.train.modeling import load_tokenizer
from tracesft.train.packing import VARLEN_ATTENTION, packed_row_plan
from tracesft.data.prompting import THINK_CLOSE, build_completion, build_prompt
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.train.tiny_model import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, build_tiny_model
from tracesft.train.training import prepare_training, tokenize_record, train_lora, use_one_gpu
from tracesft.data.verify import verify

# The real R1-distill template's two traps: it writes the BOS itself (and its tokenizer adds one
# too), and it cuts everything up to `</think>` out of assistant turns.
R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER_TOKEN + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '" + ASSISTANT_TOKEN + "' + content + '" + EOS_TOKEN + "' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_TOKEN + "<think>\\n' }}{% endif %}"
)
FAST = dict(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            gradient_checkpointing=False, logging_steps=1, warmup_steps=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())


@pytest.fixture(scope="module")
def r1_model_dir(tmp_path_factory, model_dir) -> Path:
    """The tiny model with an R1-distill-like tokenizer: BOS added on every encode, R1 template."""
    out = tmp_path_factory.mktemp("tiny-r1") / "model"
    out.mkdir()
    for path in model_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    tokenizer_json = json.loads((out / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in tokenizer_json["added_tokens"] if t["content"] == BOS_TOKEN)
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [bos_id], "tokens": [BOS_TOKEN]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(chat_template=R1_TEMPLATE, add_bos_token=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def records():
    """Sample traces, shortened so a CPU step takes a fraction of a second."""
    kept = verify(ingest([str(DATA / "sample_traces")])).kept.records
    return [r.model_copy(update={"trace": r.trace[:300] + f"\n{THINK_CLOSE}\nAnswer: {'Yes' if r.gold else 'No'}"})
            for r in kept[:8]]


def dataset(train, validation=()) -> SFTDataset:
    return SFTDataset(train=list(train), validation=list(validation), content_hash="0" * 64,
                      validation_fraction=0.15, seed=42)


def first_batch(prepared) -> dict[str, torch.Tensor]:
    return next(iter(prepared.trainer.get_train_dataloader()))


# --- completion-only loss, and the BOS ------------------------------------------------------------

def test_r1_tokenizer_variant_really_adds_bos(r1_model_dir) -> None:
    tokenizer = load_tokenizer(str(r1_model_dir))
    prompt = build_prompt(tokenizer, "Premise: A correlates with B.")
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    # The trap TRL falls into with string prompts: template BOS + tokenizer BOS.
    assert tokenizer(prompt)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("which", ["tiny", "r1"])
def test_loss_covers_the_completion_only(which, packing, model_dir, r1_model_dir, records, tmp_path) -> None:
    path = str(model_dir if which == "tiny" else r1_model_dir)
    recipe = TrainingRecipe(**FAST | {"per_device_train_batch_size": 2, "packing": packing})
    prepared = prepare_training(dataset(records[:2]), path, recipe, "cpu", tmp_path)
    tokenizer = prepared.tokenizer
    batch = first_batch(prepared)
    ids, labels = batch["input_ids"], batch["labels"]
    if packing:  # one row, the examples end to end, positions restarting at each
        assert ids.shape[0] == 1 and "attention_mask" not in batch
        starts = batch["cu_seq_lens_q"].tolist()
        segments = [(0, a, b) for a, b in zip(starts[:-1], starts[1:])]
    else:
        segments = [(i, 0, int(batch["attention_mask"][i].sum())) for i in range(ids.shape[0])]
    assert len(segments) == 2
    by_query = {build_prompt(tokenizer, r.query): r for r in records[:2]}
    for row, start, end in segments:
        example, example_labels = ids[row, start:end].tolist(), labels[row, start:end].tolist()
        assert example.count(tokenizer.bos_token_id) == 1 and example[0] == tokenizer.bos_token_id
        trained = [i for i, label in enumerate(example_labels) if label != -100]
        assert all(example_labels[i] == example[i] for i in trained)
        first = trained[0]
        assert trained == list(range(first, len(example)))  # one contiguous run to the end
        prompt_text = tokenizer.decode(example[:first])
        record = by_query[prompt_text]
        assert prompt_text.endswith(ASSISTANT_TOKEN + "<think>\n")
        completion = build_completion(prompt_text, record.trace, record.gold)
        assert tokenizer.decode(example[first:]) == completion + EOS_TOKEN
        assert example[-1] == tokenizer.eos_token_id
        assert "Answer: " in completion and THINK_CLOSE in completion and record.trace[:40].strip() in completion


def test_prompt_ids_are_those_evaluation_generates_from(r1_model_dir, records) -> None:
    tokenizer = load_tokenizer(str(r1_model_dir))
    row = tokenize_record(tokenizer, records[0], 4096)
    prompt_ids = tokenizer(build_prompt(tokenizer, records[0].query), add_special_tokens=False)["input_ids"]
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(row["input_ids"]) - len(prompt_ids))


def test_too_long_example_is_a_clear_error(model_dir, records) -> None:
    from tracesft.errors import TracesftError

    with pytest.raises(TracesftError, match=r"field `trace`.*max_seq_length 50"):
        tokenize_record(load_tokenizer(str(model_dir)), records[0], 50)


def test_a_one_process_run_on_several_gpus_trains_on_one(tmp_path, monkeypatch) -> None:
    """With 4 GPUs visible and no launcher, Trainer would wrap the model in nn.DataParallel."""
    from transformers.training_args import ParallelMode
    from trl import SFTConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    assert args.n_gpu == 4 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED  # nn.DataParallel
    use_one_gpu(args)
    assert args.n_gpu == 1 and args.parallel_mode == ParallelMode.NOT_PARALLEL


@pytest.mark.parametrize("fast_lora", [True, False])
def test_fast_lora_gives_the_projections_the_training_forward_or_leaves_peft_s(fast_lora, model_dir, records,
                                                                               tmp_path) -> None:
    recipe = TrainingRecipe(**FAST, fast_lora=fast_lora)
    model = prepare_training(dataset(records[:2]), str(model_dir), recipe, "cpu", tmp_path).trainer.model
    projections = [m for name, m in model.named_modules() if name.endswith(tuple(recipe.target_modules))]
    assert projections and all(("forward" in vars(m)) == fast_lora for m in projections)


# --- packing --------------------------------------------------------------------------------------

def test_row_plan_keeps_tokens_per_step() -> None:
    assert packed_row_plan([1000] * 10, examples_per_step=8, packing_length=8192) == (8000, 1)
    assert packed_row_plan([1360] * 10, examples_per_step=8, packing_length=8192) == (5440, 2)
    assert packed_row_plan([300, 4096], examples_per_step=1, packing_length=8192) == (4096, 1)


def _per_example_losses(model, ids, labels, starts, **kwargs) -> list[float]:
    logits = model(input_ids=ids, **kwargs).logits[0, :-1]
    token_loss = torch.nn.functional.cross_entropy(logits.float(), labels[0, 1:], reduction="none", ignore_index=-100)
    trained = labels[0, 1:] != -100
    return [float(token_loss[a : b - 1][trained[a : b - 1]].mean()) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("attention", [VARLEN_ATTENTION, "sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_per_example_loss(attention, model_dir, records, tmp_path) -> None:
    recipe = TrainingRecipe(**FAST | {"per_device_train_batch_size": 3, "packing": True})
    prepared = prepare_training(dataset(records[:3]), str(model_dir), recipe, "cpu", tmp_path)
    model = prepared.trainer.model.eval()
    model.set_attn_implementation(attention)
    batch = first_batch(prepared)
    starts = batch["cu_seq_lens_q"].tolist()
    assert len(starts) == 4  # three examples in one row
    with torch.no_grad():
        packed = _per_example_losses(model, batch["input_ids"], batch["labels"], starts,
                                     position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                                     cu_seq_lens_k=batch["cu_seq_lens_k"], max_length_q=batch["max_length_q"],
                                     max_length_k=batch["max_length_k"])
        alone = [_per_example_losses(model, batch["input_ids"][:, a:b], batch["labels"][:, a:b], [0, b - a])[0]
                 for a, b in zip(starts[:-1], starts[1:])]
    assert packed == pytest.approx(alone, abs=1e-5)
    # A plain causal pass over the row (no boundaries) would let examples see each other.
    with torch.no_grad():
        leaked = _per_example_losses(model, batch["input_ids"], batch["labels"], starts)
    assert leaked[1:] != pytest.approx(alone[1:], abs=1e-4)


# --- checkpoints and resume -----------------------------------------------------------------------

class Preempted(RuntimeError):
    pass


class PreemptAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Preempted(f"killed at step {self.step}")


def test_killed_and_resumed_run_ends_with_the_uninterrupted_adapter(model_dir, records, tmp_path) -> None:
    recipe = TrainingRecipe(**FAST | {"save_steps": 2, "num_train_epochs": 2, "lora_dropout": 0.1})
    data = dataset(records[:4])
    full, full_summary = train_lora(data, str(model_dir), recipe, "cpu", tmp_path / "full", checkpoint_dir=tmp_path / "ckpt-full")

    checkpoints = tmp_path / "ckpt-killed"
    with pytest.raises(Preempted):
        train_lora(data, str(model_dir), recipe, "cpu", tmp_path / "first", callbacks=[PreemptAt(5)], checkpoint_dir=checkpoints)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed, summary = train_lora(data, str(model_dir), recipe, "cpu", tmp_path / "second", checkpoint_dir=checkpoints)

    assert summary.resumed_from.endswith("checkpoint-4") and summary.global_steps == full_summary.global_steps > 5
    expected = load_file(full.path / "adapter_model.safetensors")
    got = load_file(resumed.path / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    untrained = prepare_training(data, str(model_dir), recipe, "cpu", tmp_path / "fresh").trainer.model
    b_weight = next(v for k, v in untrained.state_dict().items() if "lora_B" in k)
    assert not torch.equal(b_weight, next(v for k, v in got.items() if "lora_B" in k))  # it did train


def test_persistent_checkpoint_directory_is_keyed_by_the_inputs(tmp_path) -> None:
    from tracesft.train.training import checkpoint_directory

    recipe = TrainingRecipe(checkpoint_dir=str(tmp_path))
    here = checkpoint_directory(recipe, "cpu", "m", None, "a" * 64)
    assert here.parent == tmp_path
    assert checkpoint_directory(recipe.model_copy(update={"save_steps": 7}), "cpu", "m", None, "a" * 64) == here
    assert checkpoint_directory(recipe.model_copy(update={"memory_budget_gib": 70}), "cpu", "m", None, "a" * 64) == here
    assert checkpoint_directory(recipe.model_copy(update={"lora_r": 8}), "cpu", "m", None, "a" * 64) != here
    assert checkpoint_directory(recipe, "cpu", "m", None, "b" * 64) != here
    assert checkpoint_directory(recipe, "cuda", "m", None, "a" * 64) != here  # other precision, other run
    assert checkpoint_directory(TrainingRecipe(), "cpu", "m", None, "a" * 64) is None


# --- tracking -------------------------------------------------------------------------------------

def test_metrics_and_loss_curve_reach_mlflow(model_dir, records, tmp_path, monkeypatch) -> None:
    import mlflow
    from mlflow.artifacts import download_artifacts

    from tracesft.config import RegistrySettings
    from tracesft.train.tracking import mlflow_logging_callback, mlflow_tracking

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    recipe = TrainingRecipe(**FAST | {"eval_steps": 2, "per_device_train_batch_size": 2})
    with (
        mlflow_tracking(RegistrySettings(experiment_name="training-test")) as experiment,
        mlflow.start_run(experiment_id=experiment) as run,
    ):
        train_lora(dataset(records[:6], records[6:8]), str(model_dir), recipe, "cpu", tmp_path / "run",
                   callbacks=[mlflow_logging_callback("cpu")])
    client = mlflow.MlflowClient(tracking_uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    for name in ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert name in metrics, name
    history = client.get_metric_history(run.info.run_id, "tokens_per_s")
    assert len(history) >= 2 and all(m.value > 0 for m in history)
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) >= 1
    png = Path(download_artifacts(run_id=run.info.run_id, artifact_path="loss_curve.png", dst_path=str(tmp_path),
                                  tracking_uri=tracking_uri))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- full fine-tuning -----------------------------------------------------------------------------

def test_full_fine_tuning_saves_a_model_that_evaluation_scores(model_dir, records, tmp_path) -> None:
    recipe = TrainingRecipe(**FAST | {"use_lora": False, "use_4bit": False})
    artifact, summary = train_lora(dataset(records[:3]), str(model_dir), recipe, "cpu", tmp_path)
    assert summary.full_fine_tuning and artifact.metadata["kind"] == "full"
    assert (artifact.path / "config.json").exists() and not (artifact.path / "adapter_config.json").exists()
    problems = [EvalProblem(query=r.query, label=r.gold, num_variables=3, template="parent", row=i)
                for i, r in enumerate(records[:2])]
    report = evaluate(str(model_dir), problems, EvalSettings(max_new_tokens=4, batch_size=2), recipe, "cpu", artifact.path)
    assert report.model == "fine-tuned" and len(report.predictions) == 2


def test_full_fine_tuning_of_a_4bit_base_is_refused() -> None:
    with pytest.raises(ValueError, match="use_4bit false"):
        TrainingRecipe(use_lora=False)
