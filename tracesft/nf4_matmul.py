"""`x @ W.T` with W in bitsandbytes' NF4 layout, dequantised inside a Triton matrix kernel.

Decoding is bound by reading weights: at batch 64 a step of the 32B multiplies each weight with
64 rows only. bitsandbytes' path on an H100 dequantises every weight to a bf16 copy (read 0.5
bytes, write 2, read 2 again) before cuBLAS multiplies; this kernel reads the 0.5 bytes once,
dequantises in registers and feeds the tensor cores, so a step reads 18 GB instead of ~145 GB.

The weight values are bit for bit the ones bitsandbytes multiplies with: each is
`bf16(code[nibble] * absmax)`, computed in float32 and rounded once to the nearest bf16, with the
high nibble of a byte first and one float32 `absmax` per block of 64 consecutive weights of a row
(the double-quantised absmax is expanded once, when the layer is converted). Only the order of
the float32 accumulation differs from cuBLAS.

Narrow layers (the 32B's k/v projections have 1,024 outputs) would leave most of the GPU idle,
so K is split across programs; the partial sums land in a float32 buffer that is summed in a
fixed order, so results are deterministic. `nf4_matmul` is a `torch.library` custom op, so a
compiled decoding step (CUDA graphs) treats it as one opaque kernel.

Run the kernel anywhere with `TRITON_INTERPRET=1` (the CPU tests do, with fixed configurations).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BLOCKSIZE = 64  # weights per absmax: bitsandbytes' default for 4-bit
K_UNIT = 256  # every split of K is a multiple of this, so every BLOCK_K below divides it


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, partial_ptr,
    M, N, K, K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
    ROUND_IN_INTEGERS: tl.constexpr,
):
    """partial[split, m, n] = sum over this program's slice of K of x[m, k] * W[n, k].

    A byte holds the weights of two neighbouring columns, k even in the high nibble. Rather than
    interleave the nibbles back into one tile (a register shuffle), the even and the odd columns
    are two tiles, each multiplied with the matching columns of x: two products per step, with
    the weight tiles built directly in the (K, N) orientation the tensor cores take.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pair = tl.arange(0, BLOCK_K // 2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + step
        even = k0 + 2 * offs_pair
        x_even = tl.load(x_ptr + offs_m[:, None] * K + even[None, :], mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x_ptr + offs_m[:, None] * K + (even + 1)[None, :], mask=m_mask[:, None], other=0.0)
        packed = tl.load(packed_ptr + offs_n[None, :] * (K // 2) + (k0 // 2 + offs_pair)[:, None], mask=n_mask[None, :], other=0)
        scale = tl.load(absmax_ptr + offs_n[None, :] * (K // BLOCKSIZE) + (even // BLOCKSIZE)[:, None], mask=n_mask[None, :], other=0.0)
        high = tl.load(code_ptr + ((packed >> 4) & 0xF).to(tl.int32)) * scale
        low = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale
        if ROUND_IN_INTEGERS:  # Triton's interpreter truncates float32 -> bf16; round to nearest even by hand
            high = _round_to_bf16_in_integers(high)
            low = _round_to_bf16_in_integers(low)
        # Rounded to bf16 as bitsandbytes rounds them (the second cast is a no-op for bf16 inputs;
        # the interpreter tests multiply in float32, since NumPy has no bf16).
        acc = tl.dot(x_even, high.to(tl.bfloat16).to(x_even.dtype), acc)
        acc = tl.dot(x_odd, low.to(tl.bfloat16).to(x_odd.dtype), acc)
    offs_out = pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(partial_ptr + offs_out, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _round_to_bf16_in_integers(value):
    bits = value.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


# Measured candidates for decoding shapes; the autotuner keeps the fastest per (M, N, K, split).
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    for bn, bk, warps, stages in [
        (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3),
        (64, 128, 8, 4), (64, 256, 8, 3), (128, 128, 8, 3), (128, 256, 8, 2),
    ]
]


@functools.cache
def _autotuned_kernel():
    return triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "K_PER_SPLIT", "BLOCK_M"])(_nf4_matmul_kernel)


def supports(in_features: int, blocksize: int, quant_type: str) -> bool:
    """Whether a layer's weights fit the kernel (the 32B's all do)."""
    return quant_type == "nf4" and blocksize == BLOCKSIZE and in_features % K_UNIT == 0


def block_m(rows: int) -> int:
    return min(128, max(16, triton.next_power_of_2(rows)))


def k_splits(rows: int, out_features: int, in_features: int, processors: int) -> int:
    """How many slices K is cut into: enough programs for about two per processor."""
    tiles = triton.cdiv(out_features, 64) * triton.cdiv(rows, block_m(rows))
    wanted = max(1, (2 * processors) // tiles)
    units = in_features // K_UNIT
    return max(d for d in range(1, units + 1) if units % d == 0 and d <= wanted)


@functools.cache
def _processors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
    config: dict[str, int] | None = None, splits: int | None = None,
) -> torch.Tensor:
    """`x @ W.T` in x's dtype, for x of shape (rows, in_features).

    `config` (BLOCK_N, BLOCK_K, and optionally num_warps) and `splits` pin the launch instead of
    autotuning, which is what the interpreter tests do.
    """
    rows, in_features = x.shape
    x = x.contiguous()
    if splits is None:
        splits = k_splits(rows, out_features, in_features, _processors(x.device.index or 0) if x.is_cuda else 4)
    partial = torch.empty((splits, rows, out_features), dtype=torch.float32, device=x.device)
    k_per_split = in_features // splits
    bm = block_m(rows)
    arguments = (x, packed, absmax, code, partial, rows, out_features, in_features, k_per_split)
    if config is None:
        grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(rows, bm), splits)  # noqa: E731
        _autotuned_kernel()[grid](*arguments, BLOCK_M=bm, BLOCKSIZE=BLOCKSIZE, ROUND_IN_INTEGERS=interpreting())
    else:
        grid = (triton.cdiv(out_features, config["BLOCK_N"]), triton.cdiv(rows, bm), splits)
        _nf4_matmul_kernel[grid](*arguments, BLOCK_M=bm, BLOCK_K=config["BLOCK_K"], BLOCK_N=config["BLOCK_N"],
                                 BLOCKSIZE=BLOCKSIZE, ROUND_IN_INTEGERS=interpreting(), num_warps=config.get("num_warps", 4))
    return partial[0] if splits == 1 else partial.sum(dim=0)


@torch.library.custom_op("tracesft::nf4_matmul", mutates_args=())
def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int) -> torch.Tensor:
    """`x @ W.T` summed in float32 (the caller adds its bias and rounds)."""
    return launch(x, packed, absmax, code, out_features)


@nf4_matmul.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
