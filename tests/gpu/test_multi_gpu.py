"""GPU check of the production multi-GPU path: 4-bit tiny model, 2 GPUs, ddp and fsdp_qlora.

Skipped without 2 CUDA devices. On such a machine: `python -m pytest tests/gpu/test_multi_gpu.py -m gpu -q -s`.
For each strategy, `tracesft.train.distributed.train` trains the same global batch on 1 GPU (in this
process) and on 2 GPUs (`accelerate launch`, the worker, `train_lora` with NF4 + paged 8-bit
AdamW); the loss curves must agree within bf16 noise, and rank 0's adapter must load.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tracesft.config import DistributedSettings, TrainingRecipe
from tracesft.train.distributed import LOG_HISTORY_FILE, train
from tracesft.data.ingest import ingest
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import build_sft_dataset
from tracesft.train.tiny_model import build_tiny_model
from tracesft.data.verify import verify

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp_qlora"])
def test_two_gpus_follow_the_one_gpu_loss_curve(tmp_path, strategy) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    dataset = build_sft_dataset(verify(ingest([str(DATA / "sample_traces")])).kept, validation_fraction=0.15, seed=42)
    dataset = dataset.model_copy(update={"train": dataset.train[:32]})

    def recipe(processes: int) -> TrainingRecipe:
        return TrainingRecipe(learning_rate=2e-3, num_train_epochs=1, per_device_train_batch_size=4 // processes,
                              gradient_accumulation_steps=1, lora_dropout=0.0, logging_steps=1,
                              distributed=DistributedSettings(num_processes=processes, strategy=strategy))

    one_gpu: list[float] = []

    class LossRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                one_gpu.append(float(logs["loss"]))

    _, single = train(dataset, str(model_dir), recipe(1), "cuda", tmp_path / "one", callbacks=[LossRecorder()])
    adapter, double = train(dataset, str(model_dir), recipe(2), "cuda", tmp_path / "two")
    rank_zero_log = json.loads((tmp_path / "two" / LOG_HISTORY_FILE).read_text())
    two_gpus = [entry["loss"] for entry in rank_zero_log if "loss" in entry]

    print(f"\n{strategy} on {torch.cuda.get_device_name()}: 1 GPU {one_gpu}\n2 GPUs {two_gpus}")
    assert double.quantized_4bit and double.optimizer == "paged_adamw_8bit"
    assert double.global_steps == single.global_steps
    assert two_gpus == pytest.approx(one_gpu, rel=0.02)
    weights = load_file(adapter.path / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)  # trained, not just saved
