"""GPU check: exporting a QLoRA adapter merged into its dequantised 4-bit base.

Skipped without CUDA. On a CUDA machine: `python -m pytest tests/gpu -m gpu -q`. On a CPU the
base never loads in 4-bit, so `tests/test_serving.py` covers only the unquantised merge; this
covers the `dequantize()` branch of `tracesft.registry.serving.merge_adapter`: the merged bf16 model must
answer like the unmerged adapter on the 4-bit base it was trained against.
"""

import pytest
import torch

from tracesft.config import TrainingRecipe
from tracesft.train.modeling import load_base_model
from tracesft.data.prompting import build_prompt
from tracesft.registry.serving import export_merged

from tests.registry_support import QUERY, tiny_adapter, tiny_base

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]


def test_merged_export_of_a_4bit_base_matches_the_unmerged_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tiny_adapter(tiny_base(tmp_path), tmp_path / "adapter", seed=3)
    recipe = TrainingRecipe.model_validate(adapter.metadata["recipe"])
    base = load_base_model(adapter.metadata["base_model"], recipe, "cuda")
    assert getattr(base, "is_loaded_in_4bit", False)
    unmerged = PeftModel.from_pretrained(base, str(adapter.path)).eval()
    out, deviation = export_merged(adapter, tmp_path / "merged", "cuda")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto", device_map={"": 0})
    assert merged.dtype == torch.bfloat16

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(build_prompt(tokenizer, QUERY), return_tensors="pt", add_special_tokens=False).to("cuda")
    with torch.no_grad():
        reference = unmerged(**inputs).logits.float()
        logits = merged(**inputs).logits.float()
    error = (logits - reference).abs().max().item()
    print(f"\nmerged vs unmerged (4-bit base) on {torch.cuda.get_device_name()}: max |logit diff| {error:.4f}, "
          f"logit scale {reference.abs().max().item():.3f}; the export measured {deviation:.4f}")
    assert error <= 0.05 * reference.abs().max().item()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
