"""LoRA's forward for training: the adapter's branch before the frozen base, and one add.

PEFT's LoRA projection computes `base(x)`, then `lora_B(lora_A(dropout(x))) * scaling` and adds
the two. Over a projection's output (up to 27,648 wide on the 32B, for every token of a row) that
is several passes besides the products: PEFT's 4-bit layer first clones the base's output (a
defensive copy its comment keeps for old torch versions), the scaling is one more pass, the add
another, and in backward the scaling is a pass again. This forward folds the scaling into B's
weight (r x out, tiny) and adds once: the same function. For a scaling that is a power of two (the
recipe's alpha / r = 32 / 16 = 2) the forward's values are PEFT's to the bit, since scaling by a
power of two is exact; gradients agree to rounding (autograd adds an input's gradient from the
adapter and from the base in the other order). Dropout draws the same masks: the base draws none.

The order pays a second time under gradient checkpointing. torch's non-reentrant checkpoint stops
a layer's recompute at the moment the last tensor its backward saved is saved again, and a
product saves its inputs before it runs (bitsandbytes' 4-bit product saves none through autograd
at all). With the base product after the adapter's, each decoder layer's recompute ends at
`down_proj`'s adapter branch: the layer's last base product (29% of a Qwen2 layer's weights) and
its dequantisation are never run a second time.

On CUDA the second product and the add run as one kernel (`tracesft.train.lora_add_kernel`),
which rounds the sum once: there the forward is PEFT's to bf16 rounding rather than to the bit.
In a recompute, a 4-bit base keeps its dequantised weight for the backward that follows
(`tracesft.train.recompute_weights`).

Hand-written because neither PEFT (0.21) nor TRL offers it; `benchmarks/train_throughput.py
--ablations` measures its share ("project, PEFT's LoRA forward"). Only the plain case is taken
over: one active LoRA adapter without a variant (DoRA), its B a plain linear without a bias (not
wrapped or sharded, as FSDP's units are), not merged, not disabled, no per-call adapter names.
Everything else goes through PEFT's own forward unchanged.
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch
from torch.nn import functional as F

from tracesft.train import lora_add_kernel
from tracesft.train.recompute_weights import base_output

logger = logging.getLogger(__name__)


def _lora_classes() -> tuple[type, ...]:
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
    classes = _lora_classes()
    count = 0
    for module in model.modules():
        if type(module) in classes:
            module.forward = MethodType(training_forward, module)
            count += 1
    logger.debug("LoRA training forward on %d projections.", count)
    return count


def training_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`self`'s LoRA forward, adapter branch first; PEFT's own where the case is not the plain one."""
    adapter = _plain_adapter(self)
    if adapter is None or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
    # As PEFT's 4-bit layer: under autocast the products cast for themselves.
    lora_input = x if torch.is_autocast_enabled() else self._cast_input_dtype(x, lora_A.weight.dtype)
    a = lora_A(self.lora_dropout[adapter](lora_input))
    if lora_add_kernel.applies(a):
        return lora_add_kernel.AddLowRank.apply(base_output(self.base_layer, x, *args), a, lora_B.weight,
                                                self.scaling[adapter])
    update = F.linear(a, lora_B.weight * self.scaling[adapter])  # before the base: the recompute stops here
    result = base_output(self.base_layer, x, *args)
    return (result + update).to(result.dtype)


def _plain_adapter(layer: Any) -> str | None:
    """The one active, vanilla LoRA adapter of `layer`, or None if its forward is anything else."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant:
        return None
    # This forward reads B's weight without calling B, so B must be a plain linear without a bias: FSDP
    # wraps B as its own unit (PEFT's wrap policy) and gathers its weight only when B itself is called.
    lora_B = layer.lora_B[adapter]
    return adapter if type(lora_B) is torch.nn.Linear and lora_B.bias is None else None
