"""Training attention on packed rows: the shipped varlen flash kernel against cuDNN's varlen attention (GPU only).

Training spends ~12% of a uniform step in FlashAttention-2's varlen kernels (forward, its recompute,
backward: ~270 and ~225 TFLOP/s on an H200). cuDNN's fused attention reaches about twice that on
Hopper, and torch has an op for it on packed rows (`aten::_cudnn_attention_forward` with
cumulative sequence lengths; torch's own `varlen_attn` keeps that path switched off). This probe
answers whether it is usable and worth it, on the 32B's attention shape (40 query heads, 8 KV
heads, head dim 128, bf16): for rows of 8,192 tokens as 2 x 4,096 (uniform workload) and rows of
log-normal documents (median 1,200): forward + backward milliseconds of each kernel, the first
call of each new row shape (cuDNN builds a plan per shape), and how far cuDNN's output and
gradients are from flash's. GQA is tried natively, then with K/V repeated to 40 heads. Then the same
through cuDNN's own Python API (`nvidia-cudnn-frontend`, its `torch.ops.cudnn.sdpa_fwd` on packed
rows with cumulative lengths), as given and with row shapes bucketed so new rows reuse built graphs.

    python benchmarks/attention_probe.py
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_timing import milliseconds  # noqa: E402

from tracesft.train.packing import _torch_varlen  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128


class CudnnVarlen(torch.autograd.Function):
    """Causal attention within each packed example through cuDNN (forward and backward ops)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset, cu = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seed, offset, torch.empty(0, device=q.device), cu, cu,
            ctx.max_len, ctx.max_len, 0.0, True, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def flash(q, k, v, cu, max_len, scale):
    return _torch_varlen()(q, k, v, cu, cu, max_len, max_len, scale)


def cudnn(q, k, v, cu, max_len, scale):
    return CudnnVarlen.apply(q, k, v, cu.to(torch.int32), max_len, scale)


def cudnn_repeated_kv(q, k, v, cu, max_len, scale):
    repeat = q.shape[1] // k.shape[1]
    return cudnn(q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), cu, max_len, scale)


def cudnn_python(q, k, v, cu, max_len, scale):
    """cuDNN through its own Python API (`nvidia-cudnn-frontend`, whose torch op builds a graph per number of
    documents and longest length), differentiable through the op's registered autograd."""
    import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd)

    out, _ = torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                      max_seqlen_q=max_len, max_seqlen_kv=max_len, return_lse=True)
    return out


def cudnn_python_bucketed(q, k, v, cu, max_len, scale):
    """The same with the longest length rounded up to a multiple of 1,024 and the documents padded with empty
    ones to a power of two, so rows of new shapes mostly reuse a built graph (both are upper bounds only)."""
    documents = cu.numel() - 1
    padded = torch.cat([cu, cu[-1:].expand(2 ** math.ceil(math.log2(documents)) - documents)])
    return cudnn_python(q, k, v, padded, -(-max_len // 1024) * 1024, scale)


KERNELS = {"flash (shipped)": flash, "cudnn": cudnn, "cudnn, K/V repeated": cudnn_repeated_kv,
           "cudnn python API": cudnn_python, "cudnn python API, bucketed shapes": cudnn_python_bucketed}


def inputs(lengths: list[int], seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    tokens = sum(lengths)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q, k, v = randn(tokens, HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM), randn(tokens, KV_HEADS, HEAD_DIM)
    return q, k, v, cu, max(lengths), randn(tokens, HEADS, HEAD_DIM).detach()  # the last: the output's gradient


def run(kernel, q, k, v, cu, max_len, grad):
    out = kernel(q, k, v, cu, max_len, 1 / math.sqrt(HEAD_DIM))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


def rows(seed: int = 1234, count: int = 6, row_tokens: int = 5391) -> list[list[int]]:
    """Rows of log-normal documents (median 1,200, sigma 0.5, in [256, 4096]) filled up to `row_tokens`."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        row: list[int] = []
        while True:
            length = int(torch.exp(math.log(1200) + 0.5 * torch.randn(1, generator=generator)).clamp(256, 4096))
            if sum(row) + length > row_tokens:
                break
            row.append(length)
        out.append(row)
    return out


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("attention_probe.py times CUDA kernels: run it on a GPU machine")
    print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    cases = {"uniform 2 x 4096": [[4096, 4096]], "1 x 8192": [[8192]], "4 x 2048": [[2048] * 4], "8 x 1024": [[1024] * 8],
             "log-normal rows": rows()}
    report = {}
    for case, row_set in cases.items():
        reference = None
        for name, kernel in KERNELS.items():
            result = {}
            try:
                q, k, v, cu, max_len, grad = inputs(row_set[0])  # the same inputs and gradient for every kernel
                got = run(kernel, q, k, v, cu, max_len, grad)
                if name.startswith("flash"):
                    reference = got
                elif reference is not None:
                    result["max_abs_diff"] = [round((a.float() - b.float()).abs().max().item(), 5) for a, b in zip(got, reference)]
                    result["rel_norm_diff"] = [round(((a.float() - b.float()).norm() / b.float().norm()).item(), 6)
                                               for a, b in zip(got, reference)]
                result["fwd_bwd_ms"] = round(milliseconds(lambda: run(kernel, q, k, v, cu, max_len, grad), 10), 3)
                result["fwd_ms"] = round(milliseconds(lambda: kernel(q.detach(), k.detach(), v.detach(), cu, max_len,
                                                                     1 / math.sqrt(HEAD_DIM)), 10), 3)
                forward_flop = sum(2 * length * length * HEADS * HEAD_DIM for length in row_set[0])  # causal: half of 4 L^2 H D
                result["fwd_tflops"] = round(forward_flop / result["fwd_ms"] / 1e9, 1)
                result["fwd_bwd_tflops"] = round(3.5 * forward_flop / result["fwd_bwd_ms"] / 1e9, 1)
                firsts = []
                for lengths in row_set[1:]:  # rows of new shapes: the first call of each, then again
                    q2, k2, v2, cu2, max2, g2 = inputs(lengths, seed=len(firsts) + 1)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    run(kernel, q2, k2, v2, cu2, max2, g2)
                    torch.cuda.synchronize()
                    first = (time.perf_counter() - start) * 1000
                    firsts.append({"tokens": sum(lengths), "docs": len(lengths), "first_ms": round(first, 2),
                                   "again_ms": round(milliseconds(lambda: run(kernel, q2, k2, v2, cu2, max2, g2), 3), 2)})
                if firsts:
                    result["new_shapes"] = firsts
            except Exception as error:  # noqa: BLE001 - a kernel that fails is a result here
                result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            report.setdefault(case, {})[name] = result
            print(case, "|", name, json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
