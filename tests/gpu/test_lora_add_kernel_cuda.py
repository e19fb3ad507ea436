"""GPU check: LoRA's add kernel (`tracesft.train.lora_add_kernel`) against an fp32 reference.

Skipped without CUDA. Shapes that do not divide the kernel's blocks; ranks 16 and 32; bf16 and fp16;
a base in fp32 (the product stays in the first product's dtype); outputs and gradients within the
activation dtype's rounding.
"""

import pytest
import torch

from tracesft.train.lora_add_kernel import AddLowRank, applies

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]


@pytest.mark.parametrize(("dtype", "base_dtype"),
                         [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize(("rows", "width", "rank"), [(8192, 1024, 16), (77, 300, 16), (130, 5120, 32)])
def test_output_and_gradients_match_an_fp32_reference(dtype, base_dtype, rows, width, rank):
    torch.manual_seed(0)
    base = torch.randn(1, rows, width, device="cuda", dtype=base_dtype, requires_grad=True)
    a = torch.randn(1, rows, rank, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(width, rank, device="cuda") * 0.02).to(dtype).requires_grad_()
    assert applies(a)
    out = AddLowRank.apply(base, a, weight, 2.0)
    assert out.dtype == base_dtype
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().float().requires_grad_() for t in (base, a, weight)]
    reference = leaves[0] + 2.0 * leaves[1] @ leaves[2].t()
    reference.backward(grad.float())
    for got, want in zip((out, base.grad, a.grad, weight.grad), (reference, *(t.grad for t in leaves)), strict=True):
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_only_half_precision_power_of_two_ranks_on_cuda():
    def first_product(rank, dtype=torch.bfloat16, device="cuda"):
        return torch.zeros(4, rank, device=device, dtype=dtype)

    assert applies(first_product(16)) and applies(first_product(64)) and applies(first_product(16, torch.float16))
    assert not applies(first_product(16, torch.float32))  # fp32 would round through tf32
    assert not applies(first_product(8)) and not applies(first_product(24))
    assert not applies(first_product(16, device="cpu"))
