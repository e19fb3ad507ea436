"""LoRA's forward for training: the adapter's first product before the frozen base, its second added in one GEMM.

PEFT's LoRA projection computes `base(x)`, then `lora_B(lora_A(dropout(x))) * scaling` and adds
the two. Over a projection's output (up to 27,648 wide on the 32B, for every token of a row) that
is several passes besides the products: PEFT's 4-bit layer first clones the base's output (a
defensive copy its comment keeps for old torch versions), B's product writes an output as wide,
the scaling is one more pass, the add another, and in backward the scaling is a pass again. Here
B's product adds itself to the base's output in one GEMM (`torch.addmm` with `alpha=scaling`):
one read and one write of the output. The same function, rounded once where PEFT rounds the
product, the scaled product and the sum; with B at zero (an untrained adapter) the output is the
base's to the bit. Dropout draws the same masks: the base draws none.

The order pays a second time under gradient checkpointing. torch's non-reentrant checkpoint stops
a layer's recompute at the moment the last tensor its backward saved is saved again, and a
product saves its inputs before it runs (bitsandbytes' 4-bit product saves none through autograd
at all; the GEMM that adds B's product keeps its two small inputs on the autograd context). With
A's product first, each decoder layer's recompute ends at `down_proj`'s A product: the layer's
last base product (29% of a Qwen2 layer's weights) and its dequantisation are never run a second
time.

Hand-written because neither PEFT (0.21) nor TRL offers it; `benchmarks/train_throughput.py
--ablations` measures its share ("project, PEFT's LoRA forward"). Only the plain case is taken
over: one active LoRA adapter without a variant (DoRA) or a bias on B, not merged, not disabled,
no per-call adapter names. Everything else goes through PEFT's own forward unchanged.
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch

logger = logging.getLogger(__name__)


def lora_classes() -> tuple[type, ...]:
    """PEFT's LoRA projections this forward replaces: on a plain linear base, and on a 4-bit one."""
    from peft.tuners.lora import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed: PEFT defines no 4-bit layer
        return (Linear,)
    return (Linear, Linear4bit)


def use_training_forward(model: Any) -> int:
    """Give every LoRA projection of `model` the training forward; how many were given it.

    Exact classes only: a subclass of PEFT's layers may compute something else.
    """
    classes = lora_classes()
    count = 0
    for module in model.modules():
        if type(module) in classes:
            module.forward = MethodType(training_forward, module)
            count += 1
    logger.debug("LoRA training forward on %d projections.", count)
    return count


def training_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`self`'s LoRA forward, adapter's first product before the base; PEFT's own where the case is not the plain one."""
    adapter = _plain_adapter(self)
    if adapter is None or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    lora_A = self.lora_A[adapter]
    # As PEFT's 4-bit layer: under autocast the products cast for themselves.
    lora_input = x if torch.is_autocast_enabled() else self._cast_input_dtype(x, lora_A.weight.dtype)
    a = lora_A(self.lora_dropout[adapter](lora_input))
    return AddScaledProduct.apply(self.base_layer(x, *args), a, self.lora_B[adapter].weight, self.scaling[adapter])


class AddScaledProduct(torch.autograd.Function):
    """`base + scaling * a @ weight.T` in one GEMM whose epilogue reads `base` (addmm), in `base`'s dtype.

    `a` and `weight` stay on the autograd context instead of being saved through autograd's hooks
    (as bitsandbytes keeps its 4-bit weight): gradient checkpointing's recompute, which stops at the
    last saved tensor, then stops before the base product it comes after. `a` is r wide (16 values
    a token for each projection), so keeping it from forward to backward at every layer costs
    ~0.1 GB on the 32B at 8,192-token rows.
    """

    @staticmethod
    def forward(ctx: Any, base: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.a, ctx.weight, ctx.scaling = a.detach(), weight.detach(), scaling
        rows = base.reshape(-1, base.shape[-1])
        return torch.addmm(rows, a.reshape(-1, a.shape[-1]).to(base.dtype), weight.to(base.dtype).t(),
                           alpha=scaling).view(base.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, weight, scaling = ctx.a, ctx.weight, ctx.scaling
        rows = grad.reshape(-1, grad.shape[-1])
        grad_a = (rows @ weight.to(grad.dtype)).mul_(scaling).view(a.shape) if ctx.needs_input_grad[1] else None
        grad_weight = ((rows.t() @ a.reshape(-1, a.shape[-1]).to(grad.dtype)).mul_(scaling)
                       if ctx.needs_input_grad[2] else None)
        return grad, grad_a, grad_weight, None


def _plain_adapter(layer: Any) -> str | None:
    """The one active, vanilla LoRA adapter of `layer`, or None if its forward is anything else."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or layer.lora_B[adapter].bias is not None:
        return None
    return adapter
