"""LoRA's add in training: torch's ops against `tracesft.train.lora_add_kernel.AddLowRank` (GPU only).

On the 32B's projection widths (27,648 / 5,120 / 1,024; rank 16; rows of 8,192 tokens, bf16), times
what a training step does with LoRA's B per projection:
- forward: `base + F.linear(a, scaling * B)` (the product then the add, as the training forward
  runs it off CUDA), `torch.addmm(base, a, B.T, alpha=scaling)`, and the kernel;
- forward and backward together through autograd: the product then the add, and the kernel.
Prints milliseconds, the bytes the forward must move at the least over its time (GB/s), and the
kernel's error against an fp32 reference (output, then the gradients of a and B).

    python benchmarks/lora_add_probe.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_timing import milliseconds  # noqa: E402

from tracesft.train.lora_add_kernel import AddLowRank  # noqa: E402

ROWS, RANK, SCALING = 8192, 16, 2.0
WIDTHS = (27648, 5120, 1024)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).norm() / want.norm()).item(), 6)


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("lora_add_probe.py times CUDA kernels: run it on a GPU machine")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device="cuda", generator=generator) * std).to(torch.bfloat16)

    for width in WIDTHS:
        base, grad = randn(ROWS, width).requires_grad_(), randn(ROWS, width)
        a, weight = randn(ROWS, RANK).requires_grad_(), randn(width, RANK, std=0.02).requires_grad_()
        moved = 2 * ROWS * width * 2  # base read and the output written, bf16
        row = {"width": width}
        with torch.no_grad():
            forward = {
                "product then add": lambda: base + F.linear(a, weight * SCALING),
                "addmm": lambda: torch.addmm(base, a, weight.t(), alpha=SCALING),
                "kernel": lambda: AddLowRank.apply(base, a, weight, SCALING),
            }
            for name, fn in forward.items():
                ms = milliseconds(fn, 20)
                row[f"forward {name} ms"] = round(ms, 3)
                row[f"forward {name} GB/s"] = round(moved / ms / 1e6)
        both = {
            "product then add": lambda: torch.autograd.grad(base + F.linear(a, weight * SCALING), (a, weight), grad),
            "kernel": lambda: torch.autograd.grad(AddLowRank.apply(base, a, weight, SCALING), (a, weight), grad),
        }
        for name, fn in both.items():
            row[f"forward and backward {name} ms"] = round(milliseconds(fn, 20), 3)
        leaves = [t.detach().float().requires_grad_() for t in (base, a, weight)]
        reference = leaves[0] + SCALING * leaves[1] @ leaves[2].t()
        reference.backward(grad.float())
        out = AddLowRank.apply(base, a, weight, SCALING)
        row["kernel error"] = [relative_error(out, reference.detach()),
                               *(relative_error(got, leaf.grad) for got, leaf in
                                 zip(torch.autograd.grad(out, (a, weight), grad), leaves[1:], strict=True))]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
