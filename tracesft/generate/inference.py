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

Decoding is then memory-bound on the weights: at a batch of 128 the NF4 layers dequantise every
weight on every step. `dequantize_base` does it once, keeping bf16 copies (64 GB for the 32B)
where the GPU has room for them and a useful KV cache beside them: bitsandbytes itself computes
these products by dequantising to bf16 and multiplying, so above its few-row fused kernels (up to
~64 rows on an H200) the logits are the same bits. `load_for_inference` chooses and logs.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tracesft.config import Device, EvalSettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.generate.fused_ops import add_update
from tracesft.train.modeling import load_base_model, quantization_config

logger = logging.getLogger(__name__)

# Files over this size are fingerprinted by size, head and tail instead of read whole: hashing the
# 64 GB of a 32B checkpoint on every evaluation would cost minutes for no gain.
_FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20
# Layers dequantised between garbage collections (one collection takes ~0.1 s beside a 32B model).
_COLLECT_EVERY = 32


class LoraLinear(nn.Module):
    """`base(x)` plus an unmerged LoRA update, computed in the order PEFT computes it.

    The update runs in the adapter's dtype; PEFT's bitsandbytes LoRA layers round it to the output
    dtype before adding, its plain one adds first and rounds the sum (`round_update_first`).

    A power-of-two `scaling` (the recipe's alpha 32 / r 16 = 2) is folded into `lora_B` once:
    multiplying by a power of two only shifts exponents, so every product and partial sum of
    `x A (2^k B)` is exactly 2^k times that of `x A B` (no overflow or subnormals at these
    magnitudes) and the result is bit-identical, one element-wise kernel per projection fewer
    (448 a decoding step on the 32B). Other scalings are applied as PEFT applies them.
    """

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, round_update_first: bool) -> None:
        super().__init__()
        self.base = base
        folded = _is_power_of_two(scaling)
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B * scaling if folded else lora_B, requires_grad=False)
        self.scaling = 1.0 if folded else scaling
        self.round_update_first = round_update_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.base(x), self.update(x.to(self.lora_A.dtype)))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank update of `x`, already in the adapter's dtype (scaled only where the scaling
        was folded into `lora_B`; `combine` applies any other)."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def combine(self, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """The base layer's `result` plus the `update`, scaled and rounded as PEFT does it
        (one fused kernel on a GPU: `fused_ops.add_update`)."""
        return add_update(result, update, self.scaling, self.round_update_first)


def project(x: torch.Tensor, modules: Sequence[nn.Module], side_stream: torch.cuda.Stream | None = None) -> list[torch.Tensor]:
    """`[module(x) for module in modules]`, bit for bit, for projections that read the same input
    (a layer's query, key and value; its gate and up).

    Where all of them are `LoraLinear`s with one adapter dtype, `x` is cast to that dtype once
    instead of once per module, and on a GPU, given `side_stream`, the LoRA branches run on it
    beside the base products: the branch's products are tiny (rank 16; 11-17 us each for ~4
    blocks of threads in the 256-row decode profile), so where the base products leave most of the
    GPU idle (decoding a few rows) they hide behind them; where the base products fill it they
    only slow them down (the engine's `SIDE_STREAM_BELOW_ROWS`). Every kernel is the same as in
    `module(x)`, so are the results. The side stream waits for the main stream before it starts
    and the main stream for it before the updates are added: memory either stream frees is reused
    only after both reached that point, also inside a captured CUDA graph.
    """
    dtypes = {module.lora_A.dtype for module in modules if isinstance(module, LoraLinear)}
    if len(dtypes) != 1 or not all(isinstance(module, LoraLinear) for module in modules):
        return [module(x) for module in modules]
    (dtype,) = dtypes
    if side_stream is not None:
        side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # no stream: this stream
        cast = x.to(dtype)
        updates = [module.update(cast) for module in modules]
    results = [module.base(x) for module in modules]
    if side_stream is not None:
        torch.cuda.current_stream().wait_stream(side_stream)
    return [module.combine(result, update) for module, result, update in zip(modules, results, updates)]


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


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


def dequantize_base(model: nn.Module) -> int:
    """Replace every bitsandbytes 4-bit layer (plain or inside a `LoraLinear`) by a bf16 `nn.Linear`
    holding its dequantised weight, layer by layer so memory never holds both in full. Returns the
    number of layers replaced.

    Only names are listed up front (a list of the modules would keep every 4-bit layer alive to
    the end), and the garbage collector runs every `_COLLECT_EVERY` layers: replaced 4-bit layers
    sit in reference cycles, and without it their 15 GiB stayed allocated on the 32B (H200)."""
    import bitsandbytes as bnb

    replaced = 0
    names = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    for name in names:
        module = model.get_submodule(name)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        dense.weight = nn.Parameter(weight.to(module.compute_dtype or torch.bfloat16), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.data, requires_grad=False)
        _replace(model, name, dense)
        del module
        replaced += 1
        if replaced % _COLLECT_EVERY == 0:
            gc.collect()
    return replaced


def dequantized_size_increase(model: nn.Module) -> int:
    """Bytes that `dequantize_base` would add: bf16 weights minus their packed 4-bit form."""
    import bitsandbytes as bnb

    return sum(
        module.in_features * module.out_features * 2 - module.weight.data.numel() * module.weight.data.element_size()
        for module in model.modules()
        if isinstance(module, bnb.nn.Linear4bit)
    )


def room_to_dequantize(model: nn.Module, settings: EvalSettings) -> bool:
    """Whether bf16 weights leave room for a KV cache of `min(batch_size, 64)` full-length answers
    (1,024 prompt tokens each) and 8 GiB of working memory."""
    from tracesft.generate.engine import free_gpu_bytes, kv_bytes_per_position

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    free = free_gpu_bytes(device)
    slots = min(settings.batch_size, 64)
    kv = slots * (1024 + settings.max_new_tokens) * kv_bytes_per_position(model.config, torch.bfloat16)
    return free - dequantized_size_increase(model) >= kv + 8 * 2**30


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
        model = for_decoding(model, settings)
    return model.eval()


def for_decoding(model: nn.Module, settings: EvalSettings) -> nn.Module:
    """The fast decoding form of a loaded model: PEFT's wrappers gone (`prepare_for_inference`),
    and its 4-bit layers dequantised once where the GPU has room (`room_to_dequantize`)."""
    model = prepare_for_inference(model)
    if has_4bit_layers(model):
        if room_to_dequantize(model, settings):
            logger.info("Dequantised %d 4-bit layers to bf16 once: decoding reads bf16 weights.", dequantize_base(model))
        else:
            logger.info("Not enough GPU memory for bf16 weights beside the KV cache: decoding keeps the NF4 layers.")
    return model


def has_4bit_layers(model: nn.Module) -> bool:
    """Whether bitsandbytes 4-bit layers are left (by class name: importing bitsandbytes on a
    CPU-only machine prints warnings for nothing)."""
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def engine_name(model: nn.Module, recipe: TrainingRecipe, settings: EvalSettings, device: Device) -> str:
    """How the loaded `model` computes its logits and decodes: part of the generation cache key,
    since each choice can change the last bits of the logits (and so, rarely, a greedy token).

    E.g. `nf4-dq>bf16-engine-bf16`: NF4 with double quantisation, dequantised once to bf16,
    decoded by the continuous-batching engine, bf16 activations.
    """
    quantized = quantization_config(recipe, device) is not None
    weights = f"{recipe.bnb_4bit_quant_type}{'-dq' if recipe.use_double_quant else ''}" if quantized else "dense"
    if quantized and not has_4bit_layers(model):
        weights += ">bf16"
    from tracesft.generate.engine import supports

    decoder = "engine" if settings.fast_inference and supports(model) else "hf"
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[model.get_input_embeddings().weight.dtype]
    return f"{weights}-{decoder}-{dtype}"


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
