"""The model evaluation decodes with, and what identifies it for the generation cache.

Training sees the base through NF4 and the adapter as a separate low-rank update; evaluation must
compute the same function, or promotion would rest on scores of another model. The seed decodes
with exactly those modules, PEFT around bitsandbytes' `Linear4bit`, at 248 tokens/s on an H100:
its linear products take ~70 ms of a ~200 ms step at batch 64, the rest is Python and the launch
of thousands of small kernels, a good part of it in PEFT's wrappers.

`prepare_for_inference` keeps every product as it is and removes what stands around them: each
LoRA layer becomes a `LoraLinear`, the very same base layer (the NF4 `Linear4bit`) plus the adapter,
unmerged, computed with PEFT's arithmetic, so teacher-forced logits are bit for bit the seed's; and
the PEFT wrapper goes. On the 32B architecture (H200), at batch 128, it generated 1.9x the tokens/s
the seed path did at its measured batch of 64 (2.4x in the decoding phase); the seed at 128 was not
measured, so part of that is the batch.

Measured and rejected (BENCHMARKS.md): merging the adapter into bf16 weights (rounds every weight
once more: logits moved by 14%); a Triton kernel dequantising NF4 inside the product (bit-exact,
but 2-13x slower per product than bitsandbytes on an H100); a static KV cache with the step
compiled into CUDA graphs (identical values, but slower than the dynamic cache: 471 vs 532 tokens/s).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tracesft.config import Device, EvalSettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.train.modeling import load_base_model, quantization_config

# Files over this size are fingerprinted by size, head and tail instead of read whole: hashing the
# 64 GB of a 32B checkpoint on every evaluation would cost minutes for no gain.
_FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20


class LoraLinear(nn.Module):
    """`base(x)` plus an unmerged LoRA update, computed in the order PEFT computes it.

    The update runs in the adapter's dtype; PEFT's bitsandbytes LoRA layers round it to the output
    dtype before adding, its plain one adds first and rounds the sum (`round_update_first`).
    """

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, round_update_first: bool) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)
        self.scaling = scaling
        self.round_update_first = round_update_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        if self.round_update_first:
            return result + update.to(result.dtype)
        return (result + update).to(result.dtype)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer of `model` by a `LoraLinear`, in place (see the module's docstring).

    Returns the underlying transformers model, without the PEFT wrapper.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]:
        _replace(base, name, _lora_linear(base.get_submodule(name)))
    return base


def _lora_linear(lora: Any) -> LoraLinear:
    base_layer = lora.get_base_layer()
    if not isinstance(base_layer, nn.Linear):  # bitsandbytes' Linear4bit is one too
        raise TracesftError(f"fast inference supports LoRA on linear layers only, not on a {type(base_layer).__name__}.")
    adapters = [name for name in lora.active_adapters if name in lora.lora_A]
    if len(adapters) != 1:
        raise TracesftError(f"fast inference needs exactly one active LoRA adapter, found {adapters}; "
                            "set `evaluation.fast_inference: false`.")
    (adapter,) = adapters
    if lora.use_dora.get(adapter) or lora.fan_in_fan_out:
        raise TracesftError("DoRA and fan-in-fan-out adapters are not supported by fast inference; "
                            "set `evaluation.fast_inference: false`.")
    return LoraLinear(
        base_layer,
        lora.lora_A[adapter].weight.detach(),
        lora.lora_B[adapter].weight.detach(),
        lora.scaling[adapter],
        # Which LoRA class PEFT picked (its bitsandbytes classes only where bitsandbytes has a GPU
        # backend; a 4-bit layer on a CPU gets the plain one), not the base layer, decides the order.
        round_update_first=type(lora).__module__ == "peft.tuners.lora.bnb",
    )


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
    device: Device,
    adapter_path: Path | None = None,
    revision: str | None = None,
) -> nn.Module:
    """The base (plus adapter) as training saw it, rewritten for fast decoding when asked to.

    A fully fine-tuned model (`use_lora: false`) is its own directory and is loaded as the model.
    """
    if adapter_path is not None and is_full_model(adapter_path):
        model = load_base_model(str(adapter_path), recipe, device)
    else:
        model = load_base_model(base_model, recipe, device, revision)
    if adapter_path is not None and not is_full_model(adapter_path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    if settings.fast_inference:
        model = prepare_for_inference(model)
    return model.eval()


def engine_name(recipe: TrainingRecipe, settings: EvalSettings, device: Device) -> str:
    """How logits are computed: part of the cache key, since it changes the last bits of them."""
    quantized = quantization_config(recipe, device) is not None
    base = f"{recipe.bnb_4bit_quant_type}{'-dq' if recipe.use_double_quant else ''}" if quantized else "dense"
    dtype = "bf16" if device == "cuda" else "fp32"
    return f"{base}-{'fast' if settings.fast_inference else 'peft'}-{dtype}"


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
