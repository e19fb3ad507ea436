"""GPU check: the real 4-bit path (bitsandbytes NF4 + LoRA + paged 8-bit AdamW) on the tiny model.

Skipped without CUDA. On a CUDA machine: `python -m pytest tests/gpu -m gpu -q`. It trains the
tiny model with the production code path, checks that the base really is 4-bit, that the loss
falls, that the adapter saves, and that it loads back onto a 4-bit base for generation.
"""

import pytest
import torch

from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.evaluate.eval_set import EvalProblem
from tracesft.evaluate.evaluation import evaluate
from tracesft.data.ingest import ingest
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import build_sft_dataset
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.training import train_lora
from tracesft.data.verify import verify

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]


def test_qlora_trains_saves_and_reloads_in_4bit(tmp_path):
    from transformers import TrainerCallback

    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    verified = verify(ingest([str(DATA / "sample_traces")])).kept
    dataset = build_sft_dataset(verified, validation_fraction=0.15, seed=42)
    recipe = TrainingRecipe(learning_rate=2e-3, num_train_epochs=4, per_device_train_batch_size=4,
                            gradient_accumulation_steps=1, logging_steps=5)
    losses: list[float] = []

    class LossRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    adapter, summary = train_lora(dataset, str(model_dir), recipe, "cuda", tmp_path / "run", callbacks=[LossRecorder()])

    assert summary.quantized_4bit and summary.optimizer == "paged_adamw_8bit"
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert (adapter.path / "adapter_model.safetensors").stat().st_size > 0
    problems = [EvalProblem(query=r.query, label=r.gold, num_variables=3, template="parent", row=i)
                for i, r in enumerate(dataset.validation[:4])]
    report = evaluate(str(model_dir), problems, EvalSettings(max_new_tokens=8, batch_size=4), recipe, "cuda", adapter.path)
    assert report.model == "fine-tuned" and len(report.predictions) == len(problems)
    print(f"\nGPU check on {torch.cuda.get_device_name()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{summary.global_steps} steps in {summary.train_runtime_s:.1f}s, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def test_quantized_base_is_cached_and_loads_back_identical(tmp_path):
    from tracesft.train.modeling import load_base_model, load_tokenizer, quantized_base_path

    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    recipe = TrainingRecipe(quantized_base_cache=str(tmp_path / "cache"))
    cached = quantized_base_path(str(model_dir), recipe, "cuda")
    built = load_base_model(str(model_dir), recipe, "cuda")
    assert (cached / "config.json").exists() and list(cached.glob("*.safetensors"))
    loaded = load_base_model(str(model_dir), recipe, "cuda")  # now from the cache
    assert built.is_loaded_in_4bit and loaded.is_loaded_in_4bit
    assert loaded.config.quantization_config.bnb_4bit_quant_type == "nf4"
    ids = load_tokenizer(str(model_dir))("Premise: A correlates with B.", return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, built(input_ids=ids).logits, rtol=0, atol=0)


def test_packed_training_uses_varlen_attention_and_liger_when_installed(tmp_path):
    """The project's fast path on CUDA: packed rows, per-example varlen attention, Liger if present."""
    import importlib.util

    from tracesft.train.packing import VARLEN_ATTENTION, _torch_varlen
    from tracesft.train.training import LIGER_KERNELS, prepare_training

    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    verified = verify(ingest([str(DATA / "sample_traces")])).kept
    dataset = build_sft_dataset(verified, validation_fraction=0.15, seed=42)
    recipe = TrainingRecipe(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=1)
    prepared = prepare_training(dataset, str(model_dir), recipe, "cuda", tmp_path / "run")
    assert prepared.trainer.model.config._attn_implementation == VARLEN_ATTENTION
    assert prepared.trainer.args.use_liger_kernel == (importlib.util.find_spec("liger_kernel") is not None)
    if prepared.trainer.args.use_liger_kernel:  # only the kernels TRL accepts: its own LM head computes the loss
        assert prepared.trainer.args.liger_kernel_config == LIGER_KERNELS
    result = prepared.trainer.train()
    print(f"\npacked rows of {prepared.packed_row_length} tokens, torch varlen kernel: {_torch_varlen() is not None}, "
          f"liger: {prepared.trainer.args.use_liger_kernel}, loss {result.training_loss:.3f}")


def _checkpointed_lora_model(tmp_path):
    """The tiny model's real 4-bit base with the recipe's LoRA (B not zero) under non-reentrant
    checkpointing, and a count of the calls of each layer's gate_proj and down_proj base."""
    from peft import LoraConfig, get_peft_model

    from tracesft.train.modeling import load_base_model

    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    recipe = TrainingRecipe()
    model = get_peft_model(load_base_model(str(model_dir), recipe, "cuda"),
                           LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                                      target_modules=recipe.target_modules, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    calls = {"gate_proj": 0, "down_proj": 0}
    for name, module in model.named_modules():
        if name.endswith(".base_layer") and name.split(".")[-2] in calls:
            module.register_forward_hook(lambda *_, k=name.split(".")[-2]: calls.__setitem__(k, calls[k] + 1))
    return model, calls


def _loss_and_gradients(model, calls, ids):
    model.zero_grad()
    torch.manual_seed(3)
    for key in calls:
        calls[key] = 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in model.parameters() if p.requires_grad)], dict(calls)


def _agree_to_bf16_rounding(ours, theirs):
    assert abs(ours[0].item() - theirs[0].item()) <= 1e-3 * abs(theirs[0].item())
    for got, want in zip(ours[1:], theirs[1:], strict=True):
        assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()


def test_lora_training_forward_on_4bit_matches_peft_and_skips_down_proj_recompute(tmp_path):
    """On the real 4-bit base under checkpointing (LoRA's add as the Triton kernel): PEFT's loss and
    gradients to bf16 rounding, and each layer's recompute stops before down_proj's base product."""
    from tracesft.train.lora_forward import use_training_forward

    model, calls = _checkpointed_lora_model(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    peft, peft_calls = _loss_and_gradients(model, calls, ids)
    assert use_training_forward(model) == model.config.num_hidden_layers * len(TrainingRecipe().target_modules)
    ours, our_calls = _loss_and_gradients(model, calls, ids)
    # The kernel rounds the add once where PEFT rounds the product and then the sum: bf16 rounding apart.
    _agree_to_bf16_rounding(ours, peft)
    layers = model.config.num_hidden_layers
    assert peft_calls == {"gate_proj": 2 * layers, "down_proj": 2 * layers}
    assert our_calls == {"gate_proj": 2 * layers, "down_proj": layers}


def test_recomputed_layers_keep_the_recomputes_dequantised_weights_for_their_backward(tmp_path):
    """Layers marked as recomputed (as `LayerCheckpointing` marks them) multiply their 4-bit bases but
    down_proj's with the product that saves its dequantised weight: bitsandbytes' loss and gradients
    to bf16 rounding, gate_proj's base module no longer called, down_proj's still skipped by the recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tracesft.train.lora_forward import use_training_forward
    from tracesft.train.recompute_weights import keep_recomputed_weights

    model, calls = _checkpointed_lora_model(tmp_path)
    use_training_forward(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda")  # rows bitsandbytes dequantises for
    theirs, their_calls = _loss_and_gradients(model, calls, ids)
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            keep_recomputed_weights(layer)
    ours, our_calls = _loss_and_gradients(model, calls, ids)
    _agree_to_bf16_rounding(ours, theirs)
    layers = model.config.num_hidden_layers
    assert their_calls == {"gate_proj": 2 * layers, "down_proj": layers}
    assert our_calls == {"gate_proj": 0, "down_proj": layers}
