"""The NF4 decoding kernel, run by Triton's interpreter on the CPU (no GPU needed).

The interpreter reads `TRITON_INTERPRET` when the kernel is defined, so the checks run in a
fresh interpreter process. They pin launch configurations (tile sizes, K splits, masked edges)
instead of autotuning, and compare against bitsandbytes' own dequantisation:
- one-hot rows pick single weights out, so the product equals the dequantised bf16 weight bit
  for bit (layout: nibble order, absmax blocks, split K);
- random rows agree with `x @ dequantize_4bit(W).T` to float32 rounding.
The same comparison on a GPU, with the compiled kernel and its autotuner, is tests/gpu/test_nf4_cuda.py.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tracesft.nf4_matmul import K_UNIT, block_m, k_splits, supports

ROOT = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent(
    """
    import torch, bitsandbytes.functional as F
    from tracesft.nf4_matmul import launch

    torch.manual_seed(0)
    out_features, in_features = 80, 768  # 80: the last 64-wide tile is half masked
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    dense = F.dequantize_4bit(packed, state).float()
    code = state.code.float()
    for config, splits in [({"BLOCK_N": 32, "BLOCK_K": 128}, 1), ({"BLOCK_N": 64, "BLOCK_K": 256}, 3),
                           ({"BLOCK_N": 64, "BLOCK_K": 128}, 2)]:
        for start in range(0, in_features, 128):
            one_hot = torch.zeros(128, in_features)
            one_hot[torch.arange(128), start + torch.arange(128)] = 1
            picked = launch(one_hot, packed, absmax, code, out_features, config=config, splits=splits)
            assert torch.equal(picked.T, dense[:, start:start + 128]), (config, splits, start)
        x = torch.randn(5, in_features).to(torch.bfloat16).float()  # bf16 values; NumPy has no bf16
        product = launch(x, packed, absmax, code, out_features, config=config, splits=splits)
        assert product.shape == (5, out_features)
        torch.testing.assert_close(product, x @ dense.T, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_kernel_multiplies_with_the_weights_bitsandbytes_dequantises() -> None:
    environment = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    completed = subprocess.run([sys.executable, "-c", CHECK], env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("ok")


def test_k_is_split_for_narrow_layers_only() -> None:
    sms = 132  # an H100
    assert k_splits(64, 27648, 5120, sms) == 1  # gate/up projections: 432 tiles already fill the GPU
    assert k_splits(64, 1024, 5120, sms) == 10  # k/v projections: 16 tiles, K cut in 10 slices of 512
    assert k_splits(64, 5120, 27648, sms) == 3  # down projection
    for rows, out_features, in_features in [(1, 5120, 5120), (128, 1024, 5120), (256, 5120, 27648)]:
        splits = k_splits(rows, out_features, in_features, sms)
        assert in_features % splits == 0 and (in_features // splits) % K_UNIT == 0


def test_only_layers_the_kernel_fits_take_it() -> None:
    assert supports(5120, 64, "nf4") and supports(27648, 64, "nf4")
    assert not supports(5120, 64, "fp4") and not supports(5120, 128, "nf4") and not supports(128, 64, "nf4")
    assert block_m(1) == 16 and block_m(48) == 64 and block_m(300) == 128
