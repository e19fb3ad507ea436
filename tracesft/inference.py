"""The model evaluation decodes with, and what identifies it for the generation cache.

Training sees the base through NF4 and the adapter as a separate low-rank update; evaluation must
compute the same function, or promotion would rest on scores of another model. The seed decodes
with exactly those modules (PEFT around bitsandbytes' `Linear4bit`), measured at 248 tokens/s on
an H100: every step pays Python and launch overhead for ~1,500 small kernels, and bitsandbytes
dequantises each weight to a bf16 copy before multiplying.

`prepare_for_inference` keeps the function and changes how it is computed:
- each 4-bit weight becomes an `NF4Linear`, which reads the same packed NF4 bytes and multiplies
  with bit-identical bf16 weight values, dequantised inside a Triton kernel for decoding-sized
  inputs (`tracesft.nf4_matmul`) and through bitsandbytes' own dequantisation for prompts;
- each LoRA layer becomes a `LoraLinear` with PEFT's arithmetic (adapter in its own dtype, its
  update rounded and added as PEFT adds it), unmerged: merging into bf16 weights would round every
  weight once more, which on the 32B architecture moved the logits by 14% (BENCHMARKS.md);
- the PEFT wrapper and the quantisation record go, so `generate` sees a plain model and, with a
  static KV cache, compiles the decoding step into CUDA graphs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.modeling import load_base_model, quantization_config, uses_cuda

# Files over this size are fingerprinted by size, head and tail instead of read whole: hashing the
# 64 GB of a 32B checkpoint on every evaluation would cost minutes for no gain.
_FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20
# Inputs of up to this many rows (decoding: one row per sequence of the batch) take the fused
# kernel; longer ones (prompts) are compute-bound, and dequantise-then-multiply suits them.
FUSED_MAX_ROWS = 256


class NF4Linear(nn.Module):
    """A bitsandbytes NF4 linear layer for inference, with the double-quantised absmax expanded once."""

    def __init__(self, layer: nn.Module) -> None:
        import bitsandbytes as bnb

        super().__init__()
        packed, state = layer.weight.data, layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes repacked it for CPU inference: undo
            packed, state = bnb.nn.modules._convert_weight_packed_for_cpu_inverse(packed, state)
        absmax = state.absmax
        if state.nested:  # as bitsandbytes' dequantize_4bit expands it, before every product
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.dtype = getattr(layer, "compute_dtype", None) or state.dtype
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax.float())
        self.register_buffer("code", state.code.float())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.fused = self.packed.is_cuda and _fused_kernel_supports(self.in_features, self.blocksize, self.quant_type)

    def dequantized(self) -> torch.Tensor:
        return torch.ops.bitsandbytes.dequantize_4bit(
            self.packed, self.absmax, self.blocksize, self.quant_type, [self.out_features, self.in_features], self.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype, x = x.dtype, x.to(self.dtype)
        rows = x.numel() // self.in_features
        if self.fused and rows <= FUSED_MAX_ROWS:
            out = torch.ops.tracesft.nf4_matmul(x.reshape(rows, self.in_features), self.packed, self.absmax,
                                                self.code, self.out_features)
            if self.bias is not None:
                out = out + self.bias  # in float32, rounded once below, as cuBLAS adds a bias
            out = out.to(self.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.dequantized(), self.bias)
        return out.to(input_dtype)


class LoraLinear(nn.Module):
    """`base(x)` plus an unmerged LoRA update, computed in the order PEFT computes it.

    The update runs in the adapter's dtype; on a 4-bit base PEFT rounds it to the output dtype
    before adding, on a plain one it adds first and rounds the sum (`round_update_first`).
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


def _fused_kernel_supports(in_features: int, blocksize: int, quant_type: str) -> bool:
    try:
        from tracesft import nf4_matmul  # registers the op; needs Triton, which CUDA installs of torch bring
    except ImportError:
        return False
    return nf4_matmul.supports(in_features, blocksize, quant_type)


def _is_4bit(layer: nn.Module) -> bool:
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Rewrite every LoRA layer and every 4-bit layer of `model` in place (see the module's docstring).

    Returns the underlying transformers model, with the PEFT wrapper and any quantisation record
    gone, so `generate` treats it as a plain model (and may compile it).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    replaced: list[str] = []
    # Names, not modules: holding every module while replacing them would keep each replaced layer alive.
    for name in [name for name, _ in base.named_modules()]:
        if any(name.startswith(f"{done}.") for done in replaced):
            continue  # inside a LoRA layer already replaced: its base layer went with it
        module = base.get_submodule(name)
        if isinstance(module, LoraLayer):
            _replace(base, name, _lora_linear(module))
            replaced.append(name)
        elif _is_4bit(module):
            _replace(base, name, NF4Linear(module))
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:  # what transformers' own `dequantize()` clears, so compilation is allowed
        quantizer.remove_quantization_config(base)
    return base


def _lora_linear(lora: Any) -> LoraLinear:
    base_layer = lora.get_base_layer()
    quantized = _is_4bit(base_layer)
    if not (quantized or isinstance(base_layer, nn.Linear)):
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
        NF4Linear(base_layer) if quantized else base_layer,
        lora.lora_A[adapter].weight.detach(),
        lora.lora_B[adapter].weight.detach(),
        lora.scaling[adapter],
        round_update_first=quantized,
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
    adapter_path: Path | None = None,
    revision: str | None = None,
) -> nn.Module:
    """The base (plus adapter) as training saw it, rewritten for fast decoding when asked to.

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
        model = prepare_for_inference(model)
    return model.eval()


def engine_name(recipe: TrainingRecipe, settings: EvalSettings) -> str:
    """How logits are computed: part of the cache key, since it changes the last bits of them."""
    quantized = quantization_config(recipe) is not None
    base = f"{recipe.bnb_4bit_quant_type}{'-dq' if recipe.use_double_quant else ''}" if quantized else "dense"
    dtype = "bf16" if uses_cuda() else "fp32"
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
