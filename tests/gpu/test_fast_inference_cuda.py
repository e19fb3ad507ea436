"""GPU check of fast inference's NF4 kernel (tracesft/nf4_matmul.py) and of the layers around it.

Skipped without CUDA. On a CUDA machine: `python -m pytest tests/gpu/test_nf4_cuda.py -m gpu -q -s`.
On the 32B architecture's layer shapes, with weights quantised by bitsandbytes on the GPU:
- one-hot rows make the compiled, autotuned kernel return single weights, which must equal
  bitsandbytes' CUDA dequantisation bit for bit;
- a PEFT LoRA layer on a bitsandbytes `Linear4bit` and its `prepare_for_inference` rewrite
  agree within bf16 rounding at decoding sizes (the kernel) and at prompt sizes (dequantise then
  multiply), with the kernel's result deterministic from call to call.
"""

import pytest
import torch

from tracesft.inference import FUSED_MAX_ROWS, LoraLinear, NF4Linear, prepare_for_inference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]

SHAPES = [(1024, 5120), (5120, 5120), (27648, 5120), (5120, 27648)]  # k/v, q/o, gate/up, down


def _quantized(out_features: int, in_features: int, bias: bool):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, device="cuda", dtype=torch.bfloat16) * 0.02, requires_grad=False)
    return layer


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_multiplies_with_bitsandbytes_weights_exactly(shape) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = _quantized(*shape, bias=False)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    prepared = NF4Linear(layer)
    assert prepared.fused
    out_features, in_features = shape
    for start in (0, in_features // 2, in_features - 64):
        one_hot = torch.zeros(64, in_features, device="cuda", dtype=torch.bfloat16)
        one_hot[torch.arange(64), start + torch.arange(64)] = 1
        picked = torch.ops.tracesft.nf4_matmul(one_hot, prepared.packed, prepared.absmax, prepared.code, out_features)
        assert torch.equal(picked.T.to(torch.bfloat16), dense[:, start:start + 64]), (shape, start)


@pytest.mark.parametrize("shape", SHAPES)
def test_prepared_lora_layer_computes_what_peft_computes(shape) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(_quantized(*shape, bias=True))
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.02)
    inputs = {rows: torch.randn(rows, shape[1], device="cuda", dtype=torch.bfloat16) for rows in (1, 64, 128, FUSED_MAX_ROWS, 512)}
    with torch.inference_mode():
        expected = {rows: peft_model(x) for rows, x in inputs.items()}
        prepared = prepare_for_inference(peft_model)
        assert isinstance(prepared[0], LoraLinear) and isinstance(prepared[0].base, NF4Linear)
        for rows, x in inputs.items():
            got = prepared(x)
            error = float((got.float() - expected[rows].float()).norm() / expected[rows].float().norm())
            print(f"{shape} rows {rows}: relative error {error:.2e}")
            assert error < 1e-2, (shape, rows, error)  # bf16 rounding of the outputs: ~2e-3 to 4e-3
            assert torch.equal(got, prepared(x))  # deterministic: fixed K split, summed in order
