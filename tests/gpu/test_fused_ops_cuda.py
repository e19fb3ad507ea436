"""GPU check that the decode step's fused kernels give the torch ops' exact bits.

Skipped without CUDA. On a CUDA machine: `python -m pytest tests/gpu/test_fused_ops_cuda.py -m gpu -q -s`.
Each Triton kernel of `tracesft.generate.fused_ops` (the residual add with the RMS norm included)
is compared with `torch.equal` against the torch code it replaces, at the 32B's decode shapes and odd ones; `inference.project` with the LoRA
branches on a side stream (eagerly and replayed from a CUDA graph) against the modules called
one by one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from tracesft.generate.fused_ops import add_rms_norm, add_update, rotary, silu_mul
from tracesft.generate.inference import LoraLinear, project

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]

SHAPES = [(256, 5120), (8, 27648), (3, 7), (128, 1024)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", [1.0, 0.75])
@pytest.mark.parametrize("round_update_first", [True, False])
def test_add_update_is_peft_arithmetic(dtype, scaling, round_update_first) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    for shape in SHAPES:
        result = torch.randn(shape, device="cuda", generator=generator).to(dtype)
        update = torch.randn(shape, device="cuda", generator=generator) * 0.05
        scaled = update * scaling if scaling != 1.0 else update
        expected = result + scaled.to(dtype) if round_update_first else (result + scaled).to(dtype)
        assert torch.equal(add_update(result, update, scaling, round_update_first), expected), shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_is_the_models_own(dtype) -> None:
    generator = torch.Generator("cuda").manual_seed(1)
    for rows, heads, kv_heads, dim in [(256, 40, 8, 128), (5, 4, 2, 16), (1, 3, 1, 64)]:
        query = torch.randn(rows, heads, dim, device="cuda", generator=generator).to(dtype)
        key = torch.randn(rows, kv_heads, dim, device="cuda", generator=generator).to(dtype)
        angles = torch.rand(rows, dim, device="cuda", generator=generator) * 100
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        got = rotary(query, key, cos, sin, apply_rotary_pos_emb)
        expected = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (rows, heads, dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_is_torch_silu_times_up(dtype) -> None:
    generator = torch.Generator("cuda").manual_seed(2)
    for shape in SHAPES:
        gate = (torch.randn(shape, device="cuda", generator=generator) * 6).to(dtype)
        gate.view(-1)[:4] = torch.tensor([0.0, -80.0, 80.0, 1e-4], dtype=dtype)
        up = torch.randn(shape, device="cuda", generator=generator).to(dtype)
        assert torch.equal(silu_mul(gate, up), F.silu(gate) * up), shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm_is_the_residual_add_and_the_models_norm(dtype) -> None:
    generator = torch.Generator("cuda").manual_seed(4)
    for rows, width in [(256, 5120), (8, 5120), (3, 7), (8192, 512)]:
        norm = Qwen2RMSNorm(width, eps=1e-6).to("cuda", dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(width, device="cuda", generator=generator) * 2)
        hidden = (torch.randn(rows, width, device="cuda", generator=generator) * 4).to(dtype)
        update = torch.randn(rows, width, device="cuda", generator=generator).to(dtype)
        with torch.inference_mode():
            summed, normed = add_rms_norm(hidden, update, norm)
            assert torch.equal(summed, hidden + update) and torch.equal(normed, norm(hidden + update)), (rows, width)
            alone, normed = add_rms_norm(hidden, None, norm)
            assert alone is hidden and torch.equal(normed, norm(hidden)), (rows, width)


def _siblings(rows: int) -> tuple[torch.Tensor, list[LoraLinear]]:
    torch.manual_seed(3)
    modules = []
    for out_features in (640, 128, 128):
        base = nn.Linear(512, out_features, bias=True, device="cuda", dtype=torch.bfloat16)
        modules.append(LoraLinear(base, torch.randn(16, 512, device="cuda") * 0.05,
                                  torch.randn(out_features, 16, device="cuda") * 0.05, 2.0, round_update_first=True))
    return torch.randn(rows, 512, device="cuda").to(torch.bfloat16), modules


@torch.inference_mode()
def test_project_on_a_side_stream_equals_the_modules_one_by_one() -> None:
    x, modules = _siblings(256)
    expected = [module(x) for module in modules]
    side = torch.cuda.Stream()
    assert all(torch.equal(a, b) for a, b in zip(project(x, modules, side), expected))

    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        project(static, modules, side)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = project(static, modules, side)
    fresh = torch.randn_like(x)
    static.copy_(fresh)
    graph.replay()
    assert all(torch.equal(a, module(fresh)) for a, module in zip(outputs, modules))
