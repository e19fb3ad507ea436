"""The decode step's element-wise work, each piece one Triton kernel with the torch ops' exact bits.

Why: a decoding step of the 32B at 256 rows runs about 5,000 kernels, 50 of them per layer
element-wise (the LoRA update's rounding and add, the rotary embedding's nine products, slices and
sums, SiLU and the gate product, the residual adds and the RMS norms' eight ops each), each reading
and writing whole activations: about a fifth of a layer's GPU time in the 256-row profile
(BENCHMARKS.md). torch does not fuse them outside
`torch.compile`, whose compile time per fresh process costs about what it would save here.

Each kernel performs the same operations as the torch code it replaces, in the same order, with
the same roundings (fp32 arithmetic, round to nearest even into the activation dtype, libdevice's
`expf` and IEEE division for SiLU as PyTorch's CUDA kernel computes it) and no contraction of a
product and a sum into one fused multiply-add. The results are therefore the same bits
(`tests/gpu/test_fused_ops_cuda.py` checks with `torch.equal`), and the engine's logits stay
identical to the seed path's. The RMS norm's mean stays torch's own reduction (another order
would change its last bits); only the element-wise work around it is fused (`add_rms_norm`).

Every function takes the torch reference's inputs and runs the reference itself off CUDA, or for
inputs a kernel does not cover (non-contiguous, fp32 activations), so callers need no branch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

try:  # Triton ships with CUDA builds of torch; CPU installs have none and never need it.
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None

_HALF_DTYPES = (torch.bfloat16, torch.float16)
# RMS norms whose forward is Llama's (checked bit for bit on the GPU against the module).
_LLAMA_RMS_NORMS = ("Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
# Elements per program of the flat kernels: whole 128-byte lines, a few per thread.
_BLOCK = 1024
# Kernel options: a product followed by a sum stays two roundings, as in torch.
_EXACT = {"enable_fp_fusion": False}


def _on_triton(*tensors: torch.Tensor) -> bool:
    return triton is not None and all(t.is_cuda and t.is_contiguous() for t in tensors)


def add_update(result: torch.Tensor, update: torch.Tensor, scaling: float, round_update_first: bool) -> torch.Tensor:
    """A base layer's output plus its LoRA update (in the adapter's dtype), as PEFT combines them:
    scaled unless the scaling is 1, then either rounded to the output dtype and added (PEFT's
    bitsandbytes layers) or added and the sum rounded (its plain layer)."""
    if not (_on_triton(result, update) and result.dtype in _HALF_DTYPES and update.dtype == torch.float32
            and result.shape == update.shape):
        if scaling != 1.0:
            update = update * scaling
        if round_update_first:
            return result + update.to(result.dtype)
        return (result + update).to(result.dtype)
    out = torch.empty_like(result)
    count = result.numel()
    _add_update_kernel[(triton.cdiv(count, _BLOCK),)](
        result, update, out, count, scaling, scaling != 1.0, round_update_first, _BLOCK, **_EXACT
    )
    return out


def rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           reference: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding (`x * cos + rotate_half(x) * sin`, each product and the sum rounded
    to the activation dtype) of `query` and `key`, shaped (rows, heads, head_dim), with `cos` and
    `sin` (rows, head_dim); `reference` is the model's own `apply_rotary_pos_emb`."""
    if not (_on_triton(query, key, cos, sin) and query.dtype in _HALF_DTYPES
            and query.dtype == key.dtype == cos.dtype == sin.dtype and query.shape[-1] % 2 == 0):
        return reference(query, key, cos, sin, unsqueeze_dim=1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, the gated MLP's middle, each step rounded to the activation dtype."""
    if not (_on_triton(gate, up) and gate.dtype in _HALF_DTYPES and gate.dtype == up.dtype and gate.shape == up.shape):
        return torch.nn.functional.silu(gate) * up
    out = torch.empty_like(gate)
    count = gate.numel()
    _silu_mul_kernel[(triton.cdiv(count, _BLOCK),)](gate, up, out, count, _BLOCK, **_EXACT)
    return out


def add_rms_norm(hidden: torch.Tensor, update: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`hidden + update` (the residual stream; `hidden` itself when `update` is None) and the
    model's RMS norm of it, `norm(hidden + update)`, in three kernels instead of nine.

    The norm is Llama's (`weight * (x32 * rsqrt(mean(x32 ** 2) + eps)).to(dtype)`, x32 the input
    in fp32), as Qwen2, Llama and Mistral define it: one kernel adds and squares, torch's own `mean`
    reduces the squares (the same tensor it reduced before, so the same bits), one kernel scales
    and multiplies by the weight. `rsqrt` is libdevice's, the same approximate instruction torch's
    CUDA kernel calls.
    """
    fused = (_on_triton(hidden, norm.weight) and hidden.dtype in _HALF_DTYPES and norm.weight.dtype == hidden.dtype
             and type(norm).__name__ in _LLAMA_RMS_NORMS)
    if update is not None:
        fused = fused and _on_triton(update) and update.dtype == hidden.dtype and update.shape == hidden.shape
    if not fused:
        if update is not None:
            hidden = hidden + update
        return hidden, norm(hidden)
    count = hidden.numel()
    width = hidden.shape[-1]
    summed = hidden if update is None else torch.empty_like(hidden)
    squares = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(count, _BLOCK),)
    _add_square_kernel[grid](hidden, hidden if update is None else update, summed, squares, count,
                             update is not None, _BLOCK, **_EXACT)
    variance = squares.mean(-1, keepdim=True)
    out = torch.empty_like(hidden)
    _rms_scale_kernel[grid](summed, variance, norm.weight, out, count, width, norm.variance_epsilon, _BLOCK, **_EXACT)
    return summed, out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rows, heads, dim = x.shape
    out = torch.empty_like(x)
    _rotary_kernel[(rows,)](x, cos, sin, out, heads, dim // 2, triton.next_power_of_2(heads),
                            triton.next_power_of_2(dim // 2), **_EXACT)
    return out


if triton is not None:

    @triton.jit
    def _add_update_kernel(result_ptr, update_ptr, out_ptr, count, scaling,
                           SCALED: tl.constexpr, ROUND_UPDATE_FIRST: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        result = tl.load(result_ptr + offsets, mask=inside).to(tl.float32)
        update = tl.load(update_ptr + offsets, mask=inside)
        if SCALED:
            update = update * scaling
        if ROUND_UPDATE_FIRST:
            update = update.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out_ptr + offsets, (result + update).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, half,
                       HEADS: tl.constexpr, HALF: tl.constexpr):
        # One row: all its heads. rotate_half(x) = cat(-x2, x1), so
        # out1 = x1*cos1 + (-x2)*sin1 and out2 = x2*cos2 + x1*sin2, each product rounded, then the sum.
        row = tl.program_id(0)
        head = tl.arange(0, HEADS)[:, None]
        lane = tl.arange(0, HALF)[None, :]
        inside = (head < heads) & (lane < half)
        at = row * heads * 2 * half + head * 2 * half + lane
        dtype = out_ptr.dtype.element_ty
        x1 = tl.load(x_ptr + at, mask=inside).to(tl.float32)
        x2 = tl.load(x_ptr + at + half, mask=inside).to(tl.float32)
        angle_at = row * 2 * half + lane
        cos1 = tl.load(cos_ptr + angle_at, mask=lane < half).to(tl.float32)
        cos2 = tl.load(cos_ptr + angle_at + half, mask=lane < half).to(tl.float32)
        sin1 = tl.load(sin_ptr + angle_at, mask=lane < half).to(tl.float32)
        sin2 = tl.load(sin_ptr + angle_at + half, mask=lane < half).to(tl.float32)
        first = (x1 * cos1).to(dtype, fp_downcast_rounding="rtne").to(tl.float32) + (-x2 * sin1).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        second = (x2 * cos2).to(dtype, fp_downcast_rounding="rtne").to(tl.float32) + (x1 * sin2).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out_ptr + at, first.to(dtype, fp_downcast_rounding="rtne"), mask=inside)
        tl.store(out_ptr + at + half, second.to(dtype, fp_downcast_rounding="rtne"), mask=inside)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gate_ptr + offsets, mask=inside).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=inside).to(tl.float32)
        # PyTorch's CUDA SiLU: x / (1 + expf(-x)) in fp32, IEEE division.
        silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out_ptr + offsets, (silu * up).to(dtype, fp_downcast_rounding="rtne"), mask=inside)

    @triton.jit
    def _add_square_kernel(hidden_ptr, update_ptr, summed_ptr, squares_ptr, count, ADD: tl.constexpr, BLOCK: tl.constexpr):
        # summed = hidden + update rounded to the activation dtype (torch's add), then its fp32
        # square (torch's pow(2) of a float is x * x).
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        value = tl.load(hidden_ptr + offsets, mask=inside).to(tl.float32)
        if ADD:
            value = value + tl.load(update_ptr + offsets, mask=inside).to(tl.float32)
            value = value.to(summed_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(summed_ptr + offsets, value, mask=inside)
            value = value.to(tl.float32)
        tl.store(squares_ptr + offsets, value * value, mask=inside)

    @triton.jit
    def _rms_scale_kernel(x_ptr, variance_ptr, weight_ptr, out_ptr, count, width, eps, BLOCK: tl.constexpr):
        # weight * (x32 * rsqrt(variance + eps)).to(dtype), each product rounded as torch rounds it.
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
        variance = tl.load(variance_ptr + offsets // width, mask=inside)
        weight = tl.load(weight_ptr + offsets % width, mask=inside).to(tl.float32)
        scaled = (x * libdevice.rsqrt(variance + eps)).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out_ptr + offsets, (weight * scaled).to(dtype, fp_downcast_rounding="rtne"), mask=inside)
