"""The run's `device`: stated in the configuration, never guessed from the machine.

What is proven here: asking for cuda where no GPU is visible stops every entry point at once
(the CLI before ZenML starts, a step before it loads anything, the model loader before it reads
a weight) with one line that says how to run on the CPU; cpu gives the unquantised fp32 recipe
with AdamW even though the recipe asks for NF4 and paged 8-bit AdamW; and the setting accepts
cuda or cpu only. These run on any machine: "no GPU" is simulated where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tracesft.config import EvalSettings, RegistrySettings, RunConfig, TrainingRecipe, embedded_config_path, load_run_config
from tracesft.data.sample_data import tokenizer_corpus
from tracesft.device import require_device
from tracesft.errors import TracesftError
from tracesft.train.modeling import load_base_model, quantization_config
from tracesft.train.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
NO_GPU = "device is cuda but no CUDA GPU is visible"


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to read a model fails the test: the refusal must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


# --- the check ------------------------------------------------------------------------------------

def test_cuda_without_a_gpu_is_refused_naming_the_config(no_gpu) -> None:
    with pytest.raises(TracesftError) as excinfo:
        require_device("cuda", "zenml_config.yaml")
    message = str(excinfo.value)
    assert message.startswith(NO_GPU) and "\n" not in message
    assert "set `device: cpu` in zenml_config.yaml" in message


def test_cpu_needs_no_gpu(no_gpu) -> None:
    require_device("cpu")


def test_model_loader_refuses_before_reading_a_weight(no_gpu, nothing_loads) -> None:
    with pytest.raises(TracesftError, match=NO_GPU):
        load_base_model("any/model", TrainingRecipe(), "cuda")


def test_gpu_steps_refuse_before_loading_anything(no_gpu, nothing_loads) -> None:
    """`zenml pipeline run` on a pod without its GPU: the step stops at its first line."""
    from steps.evaluate_model import evaluate_model
    from steps.train_adapter import train_adapter

    with pytest.raises(TracesftError, match=NO_GPU):
        train_adapter.entrypoint(None, "any/model", None, TrainingRecipe(), "cuda", RegistrySettings())
    with pytest.raises(TracesftError, match=NO_GPU):
        evaluate_model.entrypoint([], "any/model", None, EvalSettings(), TrainingRecipe(), "cuda")


@pytest.mark.parametrize("command", [["run"], ["retrain", "--traces", "."]])
def test_cli_refuses_in_seconds_before_zenml_starts(command: list[str], tmp_path: Path) -> None:
    """The production configuration on a machine without a GPU: one line, exit 2, nothing started."""
    config = REPO / "zenml_config.yaml"
    environment = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    started = time.monotonic()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tracesft"), *command, "--config", str(config)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {NO_GPU}"), result.stderr
    assert f"set `device: cpu` in {config}" in lines[0]
    assert elapsed < 30, f"took {elapsed:.1f} s: something was loaded or started before the check"
    assert list(tmp_path.iterdir()) == []  # no ZenML or MLflow state was created


# --- what the device decides ----------------------------------------------------------------------

def test_cpu_trains_the_seed_recipe_unquantised_in_fp32_with_adamw(tmp_path: Path) -> None:
    """The recipe's defaults ask for NF4, paged 8-bit AdamW and Liger; device cpu overrides all three."""
    from tracesft.data.ingest import ingest
    from tracesft.data.sample_data import DATA
    from tracesft.data.sft_dataset import SFTDataset
    from tracesft.data.verify import verify
    from tracesft.train.training import prepare_training

    model_dir = build_tiny_model(tmp_path / "model", tokenizer_corpus())
    records = verify(ingest([str(DATA / "sample_traces")])).kept.records[:2]
    dataset = SFTDataset(train=records, validation=[], content_hash="0" * 64, validation_fraction=0.15, seed=42)
    recipe = TrainingRecipe(max_seq_length=8192, gradient_checkpointing=False)
    assert recipe.use_4bit and recipe.optim == "paged_adamw_8bit" and recipe.liger_kernels

    prepared = prepare_training(dataset, str(model_dir), recipe, "cpu", tmp_path / "run")
    model, args = prepared.trainer.model, prepared.trainer.args
    assert not prepared.quantized and prepared.optimizer == "adamw_torch"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not args.bf16 and args.use_cpu and not args.use_liger_kernel


def test_device_not_the_machine_decides_quantisation() -> None:
    recipe = TrainingRecipe()
    assert quantization_config(recipe, "cpu") is None
    assert quantization_config(recipe, "cuda").bnb_4bit_quant_type == "nf4"  # even where no GPU is visible


# --- the setting ----------------------------------------------------------------------------------

def test_configurations_state_their_device() -> None:
    assert RunConfig(traces=["t"], eval_set="e.csv").device == "cuda"  # the production default
    assert load_run_config(embedded_config_path()).device == "cpu"
    for production in ("zenml_config.yaml", "configs/production-scheduled.yaml"):
        assert load_run_config(REPO / production).device == "cuda"


def test_an_unknown_device_is_refused_with_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("parameters:\n  traces: [t]\n  eval_set: e.csv\n  device: tpu\n", encoding="utf-8")
    with pytest.raises(TracesftError) as excinfo:
        load_run_config(path)
    message = str(excinfo.value)
    assert str(path) in message and "parameters.device" in message and "'cuda' or 'cpu'" in message
