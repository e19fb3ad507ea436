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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from tracesft.config import TrainingRecipe
from tracesft.data.ingest import ingest
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.data.verify import verify
from tracesft.train.layer_checkpointing import ATTENTION_OUTPUTS_KEPT, attention_kernels
from tracesft.train.memory_plan import GIB, HEADROOM, DecoderShape, lora_parameter_count, plan_memory
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.training import prepare_training, train_lora

R1_DISTILL_32B = DecoderShape(hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, vocab=152064)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_BASE_32B = int(17.9 * GIB)  # measured on an H100 (BENCHMARKS.md)


def plan_32b(budget_gib: float, row_tokens: int = 8192):
    return plan_memory(R1_DISTILL_32B, row_tokens, 16, SEVEN, 0.05, NF4_BASE_32B, budget_gib)


def test_lora_parameters_of_the_32b_are_the_measured_134m() -> None:
    assert lora_parameter_count(R1_DISTILL_32B, 16, SEVEN) == 134_217_728


def test_the_32b_keeps_more_as_the_budget_grows_and_stays_within_it() -> None:
    at_40, at_70 = plan_32b(40), plan_32b(70)
    assert (at_40.kept_layers, at_70.kept_layers) == (1, 13)
    assert at_40.recomputed_keep_attention and at_70.recomputed_keep_attention
    assert at_40.estimated_peak_gib <= 40 and at_70.estimated_peak_gib <= 70
    plans = {budget: plan_32b(budget) for budget in range(20, 260, 5)}
    spending = {budget: plan for budget, plan in plans.items() if plan.kept_layers or plan.recomputed_keep_attention}
    assert all(plan.estimated_peak_gib <= budget for budget, plan in spending.items())  # below, nothing to spend
    # The attention outputs come first (more time saved per byte), then whole layers.
    with_attention = [plan.recomputed_keep_attention for plan in plans.values()]
    assert with_attention == sorted(with_attention) and 0 < sum(with_attention) < len(plans)
    kept = [plan.kept_layers for plan in plans.values() if plan.recomputed_keep_attention]
    assert kept == sorted(kept)
    attention_bytes = 64 - at_40.kept_layers, at_40.terms_bytes["recomputed_attention_outputs"]
    assert attention_bytes == (63, 63 * 8192 * (5120 * 2 + 4 * 40))
    # Every layer recomputed is about the measured 24.5-26.9 GiB, before the headroom: the estimate errs high.
    everything_recomputed = plan_32b(1)
    assert everything_recomputed.kept_layers == 0 and everything_recomputed.recomputed_layers == 64
    assert not everything_recomputed.recomputed_keep_attention
    assert 26 < everything_recomputed.estimated_peak_gib / (1 + HEADROOM) < 30
    assert plan_32b(1000).kept_layers == 64 and plan_32b(1000).terms_bytes["recomputed_attention_outputs"] == 0
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
    """Each logged loss, and which layers were checkpointed as each step began."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.checkpointed: set[tuple[bool, ...]] = set()
        self.attention_kept: set[tuple[bool, ...]] = set()  # recomputed layers given selective checkpointing

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self.checkpointed.add(tuple(m.gradient_checkpointing for m in layers))
        self.attention_kept.add(tuple(getattr(m._gradient_checkpointing_func, "keywords", {}).get("context_fn")
                                      is ATTENTION_OUTPUTS_KEPT for m in layers))

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
    assert summary.memory_plan.kept_layers == 1 and summary.memory_plan.budget_gib == budget
    baseline, baseline_summary, baseline_weights = runs["all recomputed"]
    assert baseline.checkpointed == {(True, True)} and baseline_summary.recomputed_layers == 2
    assert baseline_summary.memory_plan is None
    assert len(seen.losses) == len(baseline.losses) > 2
    assert seen.losses == pytest.approx(baseline.losses, rel=1e-5)  # checkpointing never changes the arithmetic
    for name in weights:
        torch.testing.assert_close(weights[name], baseline_weights[name], rtol=1e-5, atol=1e-6, msg=name)


class AttentionKernelRuns(TorchDispatchMode):
    """How many times an attention kernel really runs (selective checkpointing's cache answers below it)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.kernels = attention_kernels()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs += func in self.kernels
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep", [True, False])
def test_a_recompute_with_attention_outputs_kept_skips_the_kernel(keep) -> None:
    """The policy itself, on the CPU's flash kernel (on CUDA: torch's varlen op; tests/gpu checks it)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 8, requires_grad=True)

    def attention(x):
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(x * 2, x * 3, x, is_causal=True)[0]
        return (out * x).sum()

    context = {"context_fn": ATTENTION_OUTPUTS_KEPT} if keep else {}
    with AttentionKernelRuns() as counter:
        checkpoint(attention, x, use_reentrant=False, **context).backward()
    assert counter.runs == (1 if keep else 2)  # forward only, or forward and its recompute
    gradient = x.grad.clone()
    x.grad = None
    attention(x).backward()
    torch.testing.assert_close(gradient, x.grad)


def test_recomputed_layers_keep_attention_outputs_and_train_as_before(model_dir, data, tmp_path) -> None:
    recipe = TrainingRecipe(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=1,
                            gradient_accumulation_steps=1, gradient_checkpointing=True, logging_steps=1,
                            warmup_steps=0)
    roomy = prepare_training(data, str(model_dir), recipe, "cpu", tmp_path / "probe").layer_checkpointing.plan
    terms, layers = roomy.terms_bytes, roomy.layers
    per_layer = terms["kept_layer_activations"] / layers
    fixed = sum(terms.values()) - terms["allocator_headroom"] - terms["kept_layer_activations"]
    hidden = 128  # the tiny model's
    row_tokens = terms["checkpointed_layer_inputs"] / (layers * hidden * 4)
    attention = row_tokens * (hidden * 4 + 4 * 4)  # fp32 output and log-sum-exp of its 4 heads
    budget = (fixed + layers * attention + 0.5 * (per_layer - attention)) * (1 + HEADROOM) / GIB

    runs = {}
    for name, budget_gib in (("attention kept", budget), ("all recomputed", None)):
        seen = SeenInTraining()
        budgeted = TrainingRecipe.model_validate(recipe.model_dump() | {"memory_budget_gib": budget_gib})
        _, summary = train_lora(data, str(model_dir), budgeted, "cpu", tmp_path / name.replace(" ", "-"),
                                callbacks=[seen])
        runs[name] = (summary, seen)

    summary, seen = runs["attention kept"]
    assert summary.memory_plan.recomputed_keep_attention and summary.recomputed_layers == layers
    assert seen.attention_kept == {(True,) * layers}
    baseline_summary, baseline = runs["all recomputed"]
    assert baseline.attention_kept == {(False,) * layers}
    assert seen.losses == pytest.approx(baseline.losses, rel=1e-5)
