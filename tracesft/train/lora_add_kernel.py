"""LoRA's second product and its add to the base output as one Triton kernel (CUDA, forward).

`base + scaling * a @ B.T`, where `a` is the first product (rows x r) and B is out x r: the kernel
reads `base` once and writes the output once; `a` and B are tiny. torch runs it as a product then an
add (the product written, then read with `base`) and cuBLAS's addmm runs this shape (K = r = 16)
at ~1.5 TB/s. `benchmarks/lora_add_probe.py` times the three on the 32B's widths: on an H200 the
kernel moved 3.5 TB/s at width 27,648 against 1.9 TB/s for the product then the add.

The sum is rounded once, where torch rounds the product and then the sum: the output is PEFT's to
bf16 rounding rather than to the bit. Backward stays with cuBLAS (`grad @ B` and `grad.T @ a`): a
one-pass Triton backward measured slower than cuBLAS's two products, which read `grad` at ~3.9
TB/s between them (BENCHMARKS.md, tenth session).

`a` and B stay on the autograd context rather than in autograd's saved tensors (as bitsandbytes
keeps its 4-bit weight): gradient checkpointing's non-reentrant recompute, which stops once the
last saved tensor is back, then still stops before the base product this add follows
(`tracesft.train.lora_forward`).

Hand-written because neither PEFT (0.21) nor torch offers a fused low-rank add;
`benchmarks/train_throughput.py --ablations lora-add-kernel` measures its share in training.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # Triton ships with CUDA builds of torch; CPU installs have none and never need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None

BLOCK_ROWS = 64
BLOCK_COLUMNS = 128


def applies(a: torch.Tensor) -> bool:
    """Whether the kernel takes this first product `a` (rows x r): bf16 or fp16 on CUDA (fp32 would
    round through tf32 in tl.dot), r a power of two from 16 (tl.dot's least)."""
    rank = a.shape[-1]
    return (triton is not None and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
            and rank >= 16 and rank & (rank - 1) == 0)


class AddLowRank(torch.autograd.Function):
    """`base + scaling * a @ weight.T` in `base`'s dtype, rounded once; the product in `a`'s dtype."""

    @staticmethod
    def forward(ctx: Any, base: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.a, ctx.weight, ctx.scaling = a.detach(), weight.detach(), scaling
        rows = base.reshape(-1, base.shape[-1]).contiguous()
        low = a.reshape(-1, a.shape[-1]).contiguous()
        out = torch.empty_like(rows)
        grid = (triton.cdiv(rows.shape[0], BLOCK_ROWS), triton.cdiv(rows.shape[1], BLOCK_COLUMNS))
        _add_low_rank_kernel[grid](rows, low, weight.to(a.dtype).contiguous(), out, rows.shape[0], rows.shape[1],
                                   scaling, low.shape[1], BLOCK_ROWS, BLOCK_COLUMNS)
        return out.view(base.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, weight = ctx.a, ctx.weight
        rows = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        grad_a = rows @ (weight * ctx.scaling).to(a.dtype)
        grad_weight = (rows.t() @ a.reshape(-1, a.shape[-1])) * ctx.scaling
        return grad, grad_a.view(a.shape), grad_weight.to(weight.dtype), None


if triton is not None:

    @triton.jit
    def _add_low_rank_kernel(base_ptr, a_ptr, b_ptr, out_ptr, M, N, scaling,
                             R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rank = tl.arange(0, R)
        row_ok = rows < M
        col_ok = cols < N
        a = tl.load(a_ptr + rows[:, None] * R + rank[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * R + rank[None, :], mask=col_ok[:, None], other=0.0)
        product = tl.dot(a, tl.trans(b))
        where = rows.to(tl.int64)[:, None] * N + cols[None, :]  # past 2**31 elements at 77,672 rows of 27,648
        ok = row_ok[:, None] & col_ok[None, :]
        base = tl.load(base_ptr + where, mask=ok, other=0.0)
        tl.store(out_ptr + where, (base.to(tl.float32) + scaling * product).to(base.dtype), mask=ok)
