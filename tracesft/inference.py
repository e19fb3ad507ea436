"""The model evaluation decodes with, and what identifies it for the generation cache.

Training sees the base through NF4 and the adapter as a separate low-rank update. Decoding that
way (the seed's path) pays, at every step, for dequantising each 4-bit weight and for seven extra
small matrix products per layer, and was measured at 248 tokens/s on an H100. The same function
can be computed once and for all: dequantise each NF4 weight to the compute dtype (exactly the
values the 4-bit kernels multiply with), add the adapter's update in float32, round once, and
decode with plain dense layers. The 32B base in bf16 is 64 GB and fits one 80 GB card; the LoRA
is gone from the graph, and a static KV cache lets transformers compile the step.

`merge_for_inference` does that rewrite in place, layer by layer, so the peak is the dense model
plus one layer's float32 scratch (each 4-bit weight is freed as its layer is replaced). It works on any `PeftModel` whose LoRA layers wrap `nn.Linear`
or bitsandbytes' `Linear4bit` (what `load_base_model` builds) and on the benchmark's model built
on the meta device alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.modeling import load_base_model, quantization_config, uses_cuda

# Files over this size are fingerprinted by size, head and tail instead of read whole: hashing the
# 64 GB of a 32B checkpoint on every evaluation would cost minutes for no gain.
_FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight `layer` multiplies with, in float32: dequantised for bitsandbytes 4-bit layers."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype `layer`'s matrix product runs in (bnb 4-bit layers keep it apart from storage)."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def merge_for_inference(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer (and every remaining 4-bit layer) by one dense `nn.Linear`.

    Returns the underlying transformers model, with the PEFT wrapper and any quantisation record
    gone, so `generate` treats it as a plain dense model (and may compile it).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged: list[str] = []
    # Names, not modules: holding every module while replacing them would keep each replaced
    # 4-bit weight alive to the end, and the 32B's NF4 copy (18 GB) beside its bf16 one overflows 80 GB.
    for name in [name for name, _ in base.named_modules()]:
        if any(name.startswith(f"{done}.") for done in merged):
            continue  # inside a LoRA layer already replaced: its base layer went with it
        module = base.get_submodule(name)
        if isinstance(module, LoraLayer):
            _replace(base, name, _merged_linear(module))
            merged.append(name)
        elif getattr(getattr(module, "weight", None), "quant_state", None) is not None:  # a bare 4-bit layer
            _replace(base, name, _dense_linear(module, dense_weight(module)))
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:  # what transformers' own `dequantize()` clears, so compilation is allowed
        quantizer.remove_quantization_config(base)
    return base


def _merged_linear(lora: Any) -> nn.Linear:
    base_layer = lora.get_base_layer()
    if not isinstance(base_layer, nn.Linear) and type(base_layer).__name__ != "Linear4bit":
        raise TracesftError(f"cannot merge a LoRA adapter on a {type(base_layer).__name__} layer; only linear layers are supported.")
    weight = dense_weight(base_layer)
    for adapter in lora.active_adapters:
        if adapter not in lora.lora_A:
            continue
        if lora.use_dora.get(adapter):
            raise TracesftError("DoRA adapters are not supported by fast inference; set `evaluation.fast_inference: false`.")
        delta = lora.lora_B[adapter].weight.float() @ lora.lora_A[adapter].weight.float() * lora.scaling[adapter]
        weight = weight + (delta.T if lora.fan_in_fan_out else delta)  # never into the caller's tensor
    return _dense_linear(base_layer, weight)


def _dense_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    dtype = compute_dtype(layer)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def is_full_model(path: Path) -> bool:
    """A fully fine-tuned model's directory (weights + config), as opposed to a LoRA adapter's."""
    return not (Path(path) / "adapter_config.json").exists() and (Path(path) / "config.json").exists()


def load_for_inference(
    base_model: str,
    recipe: TrainingRecipe,
    settings: EvalSettings,
    adapter_path: Path | None = None,
    revision: str | None = None,
) -> nn.Module:
    """The base (plus adapter) as training saw it, merged into dense layers when asked to.

    A fully fine-tuned model (`use_lora: false`) is its own directory and is loaded as the model.
    """
    if adapter_path is not None and is_full_model(adapter_path):
        model = load_base_model(str(adapter_path), recipe)
    else:
        model = load_base_model(base_model, recipe, revision)
    if adapter_path is not None and not is_full_model(adapter_path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    if settings.fast_inference:
        model = merge_for_inference(model)
    return model.eval()


def engine_name(recipe: TrainingRecipe, settings: EvalSettings) -> str:
    """How logits are computed: part of the cache key, since it changes the last bits of them."""
    quantized = quantization_config(recipe) is not None
    base = f"{recipe.bnb_4bit_quant_type}{'-dq' if recipe.use_double_quant else ''}" if quantized else "dense"
    dtype = "bf16" if uses_cuda() else "fp32"
    return f"{base}-{'merged' if settings.fast_inference else 'unmerged'}-{dtype}"


def model_identity(base_model: str, revision: str | None) -> str:
    """A hub id with its revision, or a fingerprint of a local model directory's files."""
    path = Path(base_model)
    if not path.is_dir():
        return f"hub:{base_model}@{revision or 'main'}"
    return f"dir:{directory_fingerprint(path)}"


def directory_fingerprint(path: Path) -> str:
    """SHA-256 over every file's relative path and content (large files: size, head and tail)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with file.open("rb") as handle:
            if size <= _FULL_HASH_LIMIT:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_SAMPLE))
                handle.seek(size - _SAMPLE)
                digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()
