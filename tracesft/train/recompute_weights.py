"""A recomputed layer's 4-bit weights, dequantised by its recompute, kept for its backward.

bitsandbytes' 4-bit product (`MatMul4Bit`) keeps the packed weight for its backward and
dequantises it again there. In a decoder layer that gradient checkpointing recomputes, each
projection's weight is therefore dequantised three times a micro-batch: in the forward, in the
recompute, and in the backward that follows the recompute at once. Here the product saves its
dequantised weight for the backward the way a checkpointed layer saves anything: the forward's
copy is dropped by the checkpoint, and the recompute's is handed to the backward. So the
projections a Qwen2 layer's recompute runs dequantise twice instead of three times. NF4
dequantisation is 5.1% of a log-normal training step on an H200 (BENCHMARKS.md, eleventh
session); a third of it in the recomputed layers is what this can save. Measured on an H200
(`benchmarks/train_throughput.py --ablations recompute-weights`): 1.5% more tokens/s on
log-normal rows, none on uniform 4,096-token ones (their products dwarf the dequantisation), the
peak unchanged.

Only the projections of recomputed layers take this product (`keep_recomputed_weights`, called
for each by `tracesft.train.layer_checkpointing`): in a layer that keeps its activations, a saved
weight would stay in memory from the forward to the backward. And not the last projection,
`down_proj`: the recompute stops before its base product (`tracesft.train.lora_forward`), which a
saved weight would make it run. The price is the other projections' weights in bf16 while the
layer's backward runs (0.69 GB on the 32B), which the memory plan counts
(`tracesft.train.memory_plan`).

Hand-written because bitsandbytes (0.50) offers no 4-bit product that saves its dequantised weight.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.nn import functional as F

# The recompute stops before this projection's base product; its weight is never dequantised there.
LAST_PROJECTION = "down_proj"

# bitsandbytes (0.50) multiplies up to this many rows with a kernel of its own that never writes the
# dequantised weight out; past it, it dequantises and calls cuBLAS, as the product here does.
BITSANDBYTES_FUSED_ROWS = 1536

_KEEPING: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # base layers of recomputed layers' projections


def keep_recomputed_weights(layer: torch.nn.Module) -> None:
    """Have the LoRA projections of `layer`, a decoder layer its checkpoint recomputes, save their
    dequantised 4-bit weight for the backward (all but `LAST_PROJECTION`)."""
    for name, module in layer.named_modules():
        projection, _, leaf = name.rpartition(".")
        if leaf == "base_layer" and projection.rpartition(".")[2] != LAST_PROJECTION:
            _KEEPING.add(module)


def base_output(base_layer: torch.nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """`base_layer(x, *args)`; for a plain 4-bit base of a recomputed layer, multiplying more rows than
    bitsandbytes' own kernel takes, the product that saves its dequantised weight."""
    if (args or base_layer not in _KEEPING or not torch.is_grad_enabled()
            or x.numel() <= BITSANDBYTES_FUSED_ROWS * x.shape[-1] or not _plain_4bit(base_layer)):
        return base_layer(x, *args)
    weight = base_layer.weight
    return _SavedWeightProduct.apply(x.to(base_layer.compute_dtype), weight, weight.quant_state).to(x.dtype)


def _plain_4bit(layer: torch.nn.Module) -> bool:
    """bitsandbytes' `Linear4bit` without a bias, its compute dtype set by a first forward."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes, no 4-bit base
        return False
    return (type(layer) is Linear4bit and layer.bias is None and layer.compute_type_is_set
            and layer.compute_dtype is not None and getattr(layer.weight, "quant_state", None) is not None)


class _SavedWeightProduct(torch.autograd.Function):
    """`x @ dequantise(weight).T` with the dequantised weight saved for the backward; the weight is
    frozen, so only `x`'s gradient is computed, as bitsandbytes does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, quant_state: Any) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        dequantised = dequantize_4bit(weight, quant_state).to(x.dtype)
        ctx.save_for_backward(dequantised)
        return F.linear(x, dequantised)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (dequantised,) = ctx.saved_tensors
        return (grad_output @ dequantised if ctx.needs_input_grad[0] else None), None, None
