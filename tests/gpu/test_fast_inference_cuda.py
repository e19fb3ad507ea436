"""GPU check of fast inference: the prepared model computes the seed's function bit for bit, compiled.

Skipped without CUDA. On a CUDA machine: `python -m pytest tests/gpu/test_fast_inference_cuda.py -m gpu -q -s`.
A PEFT LoRA layer on a bitsandbytes NF4 `Linear4bit` of the 32B's shapes and its
`prepare_for_inference` rewrite return identical outputs at decoding sizes (1 and 64 rows, where
bitsandbytes runs its own kernels) and at prompt sizes (512 rows: dequantise, then cuBLAS); and the
rewrite, compiled as `generate` compiles a static-cache step, gives the same values.
"""

import pytest
import torch

from tracesft.generate.inference import LoraLinear, prepare_for_inference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]


@pytest.mark.parametrize("shape", [(1024, 5120), (27648, 5120), (5120, 27648)])  # k/v, gate/up, down
def test_prepared_lora_layer_is_the_peft_layer_bit_for_bit(shape) -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    out_features, in_features = shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda")
    layer.bias = torch.nn.Parameter(torch.randn(out_features, device="cuda", dtype=torch.bfloat16) * 0.02, requires_grad=False)
    peft_model = get_peft_model(torch.nn.Sequential(layer), LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.02)
    inputs = {rows: torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16) for rows in (1, 64, 512)}
    with torch.inference_mode():
        expected = {rows: peft_model(x) for rows, x in inputs.items()}
        prepared = prepare_for_inference(peft_model)
        assert isinstance(prepared[0], LoraLinear) and prepared[0].base is layer
        compiled = torch.compile(prepared, fullgraph=False)
        for rows, x in inputs.items():
            assert torch.equal(prepared(x), expected[rows]), (shape, rows)
            error = float((compiled(x).float() - expected[rows].float()).norm() / expected[rows].float().norm())
            print(f"{shape} rows {rows}: compiled relative error {error:.1e}")
            assert error < 1e-2  # inductor may fuse the LoRA update's scale and cast differently
