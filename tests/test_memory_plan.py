"""`training.memory_budget_gib`: the estimate on the 32B, and the plan applied in a real tiny training run.

What is proven here: the planner's numbers for DeepSeek-R1-Distill-Qwen-32B's shape and the
production recipe (LoRA parameter count as measured, kept layers growing with the budget, none
below the fixed cost, all of them when memory is plentiful), and, on the CPU through TRL's
`SFTTrainer`, that exactly the planned last layers train without checkpointing, that the losses
and the adapter equal a run with every layer recomputed, and that `null` recomputes every layer.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from tracesft.config import TrainingRecipe
from tracesft.data.ingest import ingest
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.data.verify import verify
from tracesft.train.memory_plan import GIB, HEADROOM, DecoderShape, lora_parameter_count, plan_memory
from tracesft.train import recompute_weights
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.training import prepare_training, train_lora

R1_DISTILL_32B = DecoderShape(hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, vocab=152064)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_BASE_32B = int(17.9 * GIB)  # measured on an H100 (BENCHMARKS.md)


def plan_32b(budget_gib: float, row_tokens: int = 8192):
    return plan_memory(R1_DISTILL_32B, row_tokens, 16, SEVEN, 0.05, NF4_BASE_32B, budget_gib)


def test_lora_parameters_of_the_32b_are_the_measured_134m() -> None:
    assert lora_parameter_count(R1_DISTILL_32B, 16, SEVEN) == 134_217_728


def test_the_32b_keeps_more_layers_as_the_budget_grows_and_stays_within_it() -> None:
    at_40, at_70 = plan_32b(40), plan_32b(70)
    assert (at_40.kept_layers, at_70.kept_layers) == (3, 14)
    assert at_40.estimated_peak_gib <= 40 and at_70.estimated_peak_gib <= 70
    kept = [plan_32b(budget).kept_layers for budget in range(20, 260, 10)]
    assert kept == sorted(kept)
    # Every layer recomputed is about the measured 24.5-26.9 GiB, before the headroom: the estimate errs high.
    everything_recomputed = plan_32b(1)
    assert everything_recomputed.kept_layers == 0 and everything_recomputed.recomputed_layers == 64
    assert 26 < everything_recomputed.estimated_peak_gib / (1 + HEADROOM) < 30
    assert plan_32b(1000).kept_layers == 64
    assert plan_32b(70, row_tokens=4096).kept_layers > at_70.kept_layers  # shorter rows, smaller layers


def test_without_dropout_a_kept_layer_is_smaller() -> None:
    dropped = plan_32b(70)
    plain = plan_memory(R1_DISTILL_32B, 8192, 16, SEVEN, 0.0, NF4_BASE_32B, 70)
    assert plain.kept_layers > dropped.kept_layers


# --- the plan in a real training run -----------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())


@pytest.fixture(scope="module")
def data() -> SFTDataset:
    kept = verify(ingest([str(DATA / "sample_traces")])).kept.records[:4]
    short = [r.model_copy(update={"trace": r.trace[:200]}) for r in kept]
    return SFTDataset(train=short, validation=[], content_hash="0" * 64, validation_fraction=0.15, seed=42)


class SeenInTraining(TrainerCallback):
    """Each logged loss, which layers were checkpointed as each step began, and which of their
    projections keep a recompute's dequantised weight (`tracesft.train.recompute_weights`)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.checkpointed: set[tuple[bool, ...]] = set()
        self.keeping: set[tuple[frozenset[str], ...]] = set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self.checkpointed.add(tuple(layer.gradient_checkpointing for layer in layers))
        self.keeping.add(tuple(frozenset(name.split(".")[-2] for name, module in layer.named_modules()
                                         if module in recompute_weights._KEEPING) for layer in layers))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


def test_the_planned_last_layer_keeps_its_activations_and_trains_as_if_recomputed(model_dir, data, tmp_path) -> None:
    recipe = TrainingRecipe(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=1,
                            gradient_accumulation_steps=1, gradient_checkpointing=True, logging_steps=1,
                            warmup_steps=0, lora_dropout=0.1)
    # A budget with room for one of the tiny model's two layers, from the plan's own terms.
    roomy = prepare_training(data, str(model_dir), recipe, "cpu", tmp_path / "probe").layer_checkpointing.plan
    assert roomy.kept_layers == 2
    terms = roomy.terms_bytes
    per_layer = terms["kept_layer_activations"] / 2
    fixed = sum(terms.values()) - terms["allocator_headroom"] - 2 * per_layer
    budget = (fixed + 1.5 * per_layer) * (1 + HEADROOM) / GIB

    runs = {}
    for name, budget_gib in (("one kept", budget), ("all recomputed", None)):
        seen = SeenInTraining()
        budgeted = TrainingRecipe.model_validate(recipe.model_dump() | {"memory_budget_gib": budget_gib})
        adapter, summary = train_lora(data, str(model_dir), budgeted, "cpu", tmp_path / name.replace(" ", "-"),
                                      callbacks=[seen])
        runs[name] = (seen, summary, load_file(adapter.path / "adapter_model.safetensors"))

    seen, summary, weights = runs["one kept"]
    assert seen.checkpointed == {(True, False)} and summary.recomputed_layers == 1
    assert seen.keeping == {(frozenset(SEVEN) - {"down_proj"}, frozenset())}
    assert summary.memory_plan.kept_layers == 1 and summary.memory_plan.budget_gib == budget
    baseline, baseline_summary, baseline_weights = runs["all recomputed"]
    assert baseline.checkpointed == {(True, True)} and baseline_summary.recomputed_layers == 2
    assert baseline_summary.memory_plan is None
    assert len(seen.losses) == len(baseline.losses) > 2
    assert seen.losses == pytest.approx(baseline.losses, rel=1e-5)  # checkpointing never changes the arithmetic
    for name in weights:
        torch.testing.assert_close(weights[name], baseline_weights[name], rtol=1e-5, atol=1e-6, msg=name)
