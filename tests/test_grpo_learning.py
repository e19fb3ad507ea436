"""GRPO moves a tiny model towards the reward, on CPU, through the shipped training function.

What the tiny model can learn, said plainly: not causal reasoning. Its parent is fine-tuned to
write a fixed reasoning line, close `</think>` and answer Yes or No, half and half (it cannot tell
the problems apart). GRPO then trains it on a family whose answer is always No (two-variable
"A directly causes B": correlation alone never proves a direct cause; the solver says 0), so the
learnable thing is one token of the answer line: the mean correctness reward rises as "No"
replaces "Yes".

One change to the tiny model makes that learnable at all: the gain of its final norm is raised
twentyfold. With the tiny model's random output layer (std 0.02 over 64 dimensions, tied to the
embedding, which LoRA does not train) and unit gain, logits cannot differ by more than about 2.6,
so no LoRA can make any token more than ~1% likely: the demo's tiny adapter samples near-uniform
text in which a closed think block and an answer line occur by chance only, and its reward does
not move in a few steps. Measured over three GRPO seeds with these settings, the mean correctness
of the last four steps exceeded that of the first four by 0.30, 0.13 and 0.12.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from tracesft.config import GrpoSettings, ProblemSettings, RewardSettings, TrainingRecipe
from tracesft.data.sample_data import tokenizer_corpus
from tracesft.data.sft_dataset import SFTDataset
from tracesft.data.traces import TraceRecord
from tracesft.rl.grpo import train_grpo
from tracesft.rl.problems import fresh_problems
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.training import train_lora

NORM_GAIN = 20.0
NEVER_VALID = ProblemSettings(count=64, templates=["parent"], min_variables=2, max_variables=2, positive_share=0.0)


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model only loses from threads on a shared CPU
    yield
    torch.set_num_threads(threads)


def _tiny_model_that_can_prefer(directory) -> str:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(directory, tokenizer_corpus())
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.mul_(NORM_GAIN)
    model.save_pretrained(path)
    return str(path)


def test_mean_reward_rises_as_the_model_learns_the_familys_one_token_answer(tmp_path, one_thread):
    base = _tiny_model_that_can_prefer(tmp_path / "tiny")
    queries = [p.query for p in fresh_problems(NEVER_VALID.model_copy(update={"count": 32}), [])]
    records = [TraceRecord(query=q, trace="A correlation fixes no direction.", gold=i % 2, source="test", locator=f"line {i + 1}")
               for i, q in enumerate(queries)]
    recipe = TrainingRecipe(learning_rate=1e-2, num_train_epochs=60, per_device_train_batch_size=8,
                            gradient_accumulation_steps=1, gradient_checkpointing=False, packing=False, warmup_steps=0)
    parent, _ = train_lora(SFTDataset(train=records, validation=[], content_hash="test", validation_fraction=0.1, seed=0),
                           base, recipe, "cpu", tmp_path / "sft")

    settings = GrpoSettings(max_steps=16, num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=1,
                            max_completion_length=32, learning_rate=5e-4, temperature=1.0, top_p=1.0)
    problems = fresh_problems(NEVER_VALID.model_copy(update={"seed": 1}), [])
    adapter, summary = train_grpo(parent, problems, base, None, settings, RewardSettings(), "cpu", tmp_path / "grpo",
                                  callbacks=[logged := LoggedValues()])

    correctness = logged.values("rewards/correctness/mean")
    assert len(correctness) == settings.max_steps
    first, last = sum(correctness[:4]) / 4, sum(correctness[-4:]) / 4
    assert last > first + 0.05, correctness
    assert summary.generation == "engine" and summary.last_reward > summary.first_reward
    metadata = adapter.metadata
    assert metadata["stage"] == "grpo" and metadata["reward"] == RewardSettings().model_dump()
    assert (adapter.path / "adapter_model.safetensors").exists() and not (adapter.path / "ref").exists()


class LoggedValues(TrainerCallback):
    """Every value the trainer logs: what the MLflow callback receives, step by step."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def values(self, key: str) -> list[float]:
        return [float(entry[key]) for entry in self.logs if key in entry]
