"""A recomputed layer's 4-bit weights kept from its recompute for its backward, on bitsandbytes' CPU 4-bit path.

What is proven here: under torch's non-reentrant checkpoint a recomputed layer's plain NF4 linear
dequantises twice a forward and backward instead of three times, with bitsandbytes' output and
input gradient to the bit; a layer not marked as recomputed runs as itself; which projections of a
recomputed layer are marked; and the memory plan counts the kept weights.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from tracesft.train import recompute_weights
from tracesft.train.memory_plan import DecoderShape, plan_memory, recompute_kept_weights
from tracesft.train.recompute_weights import base_output, keep_recomputed_weights

bitsandbytes = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    layer = bitsandbytes.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                       compress_statistics=True)
    layer.load_state_dict({"weight": torch.randn(128, 256)})
    layer = layer.to("cpu")  # quantises
    layer(torch.randn(2, 256, dtype=torch.bfloat16))  # sets its compute dtype, as training's first forward does
    return layer


@pytest.fixture
def recomputed(layer):
    """`layer` as the base of a projection in a recomputed decoder layer."""
    decoder_layer = torch.nn.Module()
    decoder_layer.q_proj = torch.nn.Module()
    decoder_layer.q_proj.base_layer = layer
    keep_recomputed_weights(decoder_layer)
    yield layer
    recompute_weights._KEEPING.discard(layer)


class Dequantisations(TorchDispatchMode):
    """bitsandbytes' ops that dequantise a 4-bit weight (its product dequantises inside its own op)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(("bitsandbytes.gemm_4bit", "bitsandbytes.dequantize_4bit"))
        return func(*args, **(kwargs or {}))


def forward_and_backward(function, x, checkpointed):
    x = x.detach().requires_grad_()
    with Dequantisations() as dequantisations:
        out = checkpoint(function, x, use_reentrant=False) if checkpointed else function(x)
        out.float().square().sum().backward()
    return out.detach(), x.grad, dequantisations.count


def test_a_recompute_keeps_its_dequantised_weight_for_the_backward(recomputed):
    layer = recomputed
    # `sin` saves the product's output, so the recompute runs the product (as a decoder layer's norms and
    # attention make it run its projections).
    x = torch.randn(2048, 256, dtype=torch.bfloat16)  # more rows than bitsandbytes' own kernel takes
    theirs = forward_and_backward(lambda t: layer(t).sin(), x, checkpointed=True)
    ours = forward_and_backward(lambda t: base_output(layer, t).sin(), x, checkpointed=True)
    assert (theirs[2], ours[2]) == (3, 2)  # forward, recompute, backward; the backward reuses the recompute's
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_a_layer_not_recomputed_runs_as_itself(layer):
    x = torch.randn(2048, 256, dtype=torch.bfloat16)  # more rows than bitsandbytes' own kernel takes
    theirs = forward_and_backward(layer, x, checkpointed=False)
    ours = forward_and_backward(lambda t: base_output(layer, t), x, checkpointed=False)
    assert ours[2] == theirs[2] == 2  # no weight saved from the forward for the backward
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_a_recomputed_layer_marks_every_projection_but_the_last():
    decoder_layer = torch.nn.Module()
    for name in ("q_proj", "gate_proj", "down_proj"):
        projection = torch.nn.Module()
        projection.base_layer = torch.nn.Linear(2, 2)
        setattr(decoder_layer, name, projection)
    keep_recomputed_weights(decoder_layer)
    marked = {name for name in ("q_proj", "gate_proj", "down_proj")
              if getattr(decoder_layer, name).base_layer in recompute_weights._KEEPING}
    assert marked == {"q_proj", "gate_proj"}


def test_rows_bitsandbytes_multiplies_with_its_own_kernel_stay_with_it(recomputed):
    x = torch.randn(recompute_weights.BITSANDBYTES_FUSED_ROWS, 256, dtype=torch.bfloat16)
    theirs = forward_and_backward(lambda t: recomputed(t).sin(), x, checkpointed=True)
    ours = forward_and_backward(lambda t: base_output(recomputed, t).sin(), x, checkpointed=True)
    assert ours[2] == theirs[2] == 3 and torch.equal(ours[1], theirs[1])


def test_the_memory_plan_counts_the_weights_a_recompute_keeps():
    shape = DecoderShape(hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, vocab=152064)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert recompute_kept_weights(shape, targets) == 2 * 5120 * 5120 + 2 * 5120 * 1024 + 2 * 5120 * 27648
    plain, keeping = (plan_memory(shape, 8192, 16, targets, 0.05, 18 * 2**30, 40, kept_weight_bytes=size)
                      for size in (0, 2))
    assert keeping.terms_bytes["recomputed_layer"] - plain.terms_bytes["recomputed_layer"] == 2 * 346_030_080
