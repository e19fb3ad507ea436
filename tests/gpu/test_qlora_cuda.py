"""GPU check: the real 4-bit path (bitsandbytes NF4 + LoRA + paged 8-bit AdamW) on the tiny model.

Skipped without CUDA. On a CUDA machine: `python -m pytest tests/gpu -m gpu -q`. It trains the
tiny model with the production code path, checks that the base really is 4-bit, that the loss
falls, that the adapter saves, and that it loads back onto a 4-bit base for generation.
"""

import pytest
import torch

from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.eval_set import EvalProblem
from tracesft.evaluation import evaluate
from tracesft.ingest import ingest
from tracesft.sample_data import DATA, tokenizer_corpus
from tracesft.sft_dataset import build_sft_dataset
from tracesft.tiny_model import build_tiny_model
from tracesft.training import train_lora
from tracesft.verify import verify

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]


def test_qlora_trains_saves_and_reloads_in_4bit(tmp_path):
    from transformers import TrainerCallback

    model_dir = build_tiny_model(tmp_path / "tiny", tokenizer_corpus())
    verified = verify(ingest([str(DATA / "sample_traces")])).kept
    dataset = build_sft_dataset(verified, validation_fraction=0.15, seed=42)
    recipe = TrainingRecipe(learning_rate=2e-3, num_train_epochs=4, per_device_train_batch_size=4,
                            gradient_accumulation_steps=1, logging_steps=5)
    losses: list[float] = []

    class LossRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    adapter, summary = train_lora(dataset, str(model_dir), recipe, tmp_path / "run", callbacks=[LossRecorder()])

    assert summary.quantized_4bit and summary.optimizer == "paged_adamw_8bit"
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert (adapter.path / "adapter_model.safetensors").stat().st_size > 0
    problems = [EvalProblem(query=r.query, label=r.gold, num_variables=3, template="parent", row=i)
                for i, r in enumerate(dataset.validation[:4])]
    report = evaluate(str(model_dir), problems, EvalSettings(max_new_tokens=8, batch_size=4), recipe, adapter.path)
    assert report.model == "fine-tuned" and len(report.predictions) == len(problems)
    print(f"\nGPU check on {torch.cuda.get_device_name()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{summary.global_steps} steps in {summary.train_runtime_s:.1f}s, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
