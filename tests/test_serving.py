"""Loading, exporting and merging a real LoRA adapter on the tiny model (CPU): the merged export
must answer like the unmerged adapter, say how far it is from it, and refuse beyond the bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tracesft.train.adapter import LoraAdapter
from tracesft.errors import TracesftError
from tracesft.data.prompting import build_prompt
from tracesft.registry.serving import (
    EXPORT_INFO_FILE,
    MERGED_INFO_FILE,
    export_adapter,
    export_merged,
    merged_deviation,
    parse_model_uri,
)

from tests.registry_support import QUERY, tiny_adapter, tiny_base


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> LoraAdapter:
    root = tmp_path_factory.mktemp("serving")
    return tiny_adapter(tiny_base(root), root / "adapter", seed=1)


def _logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(build_prompt(tokenizer, QUERY) + "<think>\nA and C", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits.float()


def _unmerged_logits(adapter: LoraAdapter) -> torch.Tensor:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(adapter.metadata["base_model"], dtype=torch.float32)
    plain = _logits(base, AutoTokenizer.from_pretrained(adapter.path))
    unmerged = PeftModel.from_pretrained(base, str(adapter.path)).eval()
    logits = _logits(unmerged, AutoTokenizer.from_pretrained(adapter.path))
    assert (logits - plain).abs().max() > 1e-2  # the adapter really changes the model
    return logits


def test_float32_merge_matches_the_unmerged_adapter(adapter: LoraAdapter, tmp_path: Path) -> None:
    out, deviation = export_merged(adapter, tmp_path / "merged", "cpu", dtype="float32", source="models:/x/1")
    assert deviation < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, AutoTokenizer.from_pretrained(out)), _unmerged_logits(adapter), atol=1e-4, rtol=1e-4)
    info = json.loads((out / MERGED_INFO_FILE).read_text())
    assert info["merged_from"] == "models:/x/1" and info["dtype"] == "float32"
    assert info["max_logit_deviation"] == deviation


def test_bf16_merge_is_bf16_and_close_to_the_unmerged_adapter(adapter: LoraAdapter, tmp_path: Path) -> None:
    recorded = []
    out, deviation = export_merged(adapter, tmp_path / "merged", "cpu", record=recorded.append)
    assert recorded == [deviation] and 1e-4 < deviation < 0.05  # bf16 rounding, measured and handed over
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.bfloat16
    reference = _unmerged_logits(adapter)
    logits = _logits(merged, AutoTokenizer.from_pretrained(out))
    # bf16 keeps 8 bits of mantissa: the error is bounded relative to the logits' scale.
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_merged_export_above_the_bound_is_refused_and_still_recorded(adapter: LoraAdapter, tmp_path: Path) -> None:
    bf16 = merged_deviation(adapter, "cpu")
    recorded = []
    with pytest.raises(TracesftError, match=r"registry\.max_merged_logit_deviation 0\.0001; export the adapter with its base"):
        export_merged(adapter, tmp_path / "merged", "cpu", source="models:/x/1", max_deviation=1e-4, record=recorded.append)
    assert recorded == [pytest.approx(bf16)] and not (tmp_path / "merged").exists()


def test_adapter_export_is_the_adapter_and_the_exact_base(adapter: LoraAdapter, tmp_path: Path) -> None:
    out = export_adapter(adapter, tmp_path / "export", source="models:/x/1")
    assert {p.name for p in adapter.files()} <= {p.name for p in out.iterdir()}
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["exported_from"] == "models:/x/1" and info["base_model"] == adapter.metadata["base_model"]
    assert info["base_identity"].startswith("dir:") and len(info["base_identity"]) == 4 + 64  # the local base's fingerprint
    assert info["base_loaded_as"]["lora"] == "unmerged"


def test_export_refuses_a_non_empty_directory(adapter: LoraAdapter, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(TracesftError, match="not empty"):
        export_merged(adapter, tmp_path / "busy", "cpu")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/m@champion", ("m", "champion", None)),
        ("models:/m/3", ("m", None, "3")),
        ("m", ("m", "champion", None)),  # a bare name means its champion
    ],
)
def test_parse_model_uri(uri: str, expected: tuple) -> None:
    assert parse_model_uri(uri) == expected


def test_parse_model_uri_rejects_alias_and_version() -> None:
    with pytest.raises(TracesftError, match="not both"):
        parse_model_uri("m", alias="champion", version="2")
