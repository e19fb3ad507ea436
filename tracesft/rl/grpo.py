"""GRPO with TRL's `GRPOTrainer`, continuing a registered LoRA adapter on its own base.

Each step the policy answers every problem `num_generations` times; each answer is scored by
`tracesft.rl.reward` (the solver decides correctness), and the advantage of an answer is its
reward against its group's mean, so no value model is needed. The loss is TRL's (its default,
DAPO's token-level normalisation); with `beta` above 0 a KL term to the parent adapter is added,
TRL keeping a frozen copy of it beside the trained one.

The model is the parent's base loaded exactly as SFT loads it (`load_base_model`: NF4 on cuda
when the parent's recipe says so, fp32 on the CPU) with the parent's adapter on it, trainable:
the same LoRA continues, same rank and modules. Optimizer and gradient checkpointing follow the
parent's recipe as well (AdamW on the CPU, where bitsandbytes' optimizers do not exist), and
the LoRA projections train with SFT's forward (`tracesft.train.lora_forward`).

Generation goes through the project's engine (`tracesft.rl.rollout`, via TRL's `rollout_func`)
unless `grpo.generation` is `trl` or the engine does not support the architecture; then TRL's
transformers backend (HF `generate`) is used, on the same prompts (`prompt_messages`, rendered
by TRL with the same chat template). TRL logs per step what the run is judged by: `reward`, each
part's `rewards/<part>/mean`, `completions/mean_length` (and min, max, clipped ratio), `kl` when
`beta` is on; the callbacks passed in (the MLflow one) receive them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tracesft.config import Device, GrpoSettings, RewardSettings, TrainingRecipe
from tracesft.data.prompting import prompt_messages
from tracesft.generate.engine import supports
from tracesft.rl.problems import GrpoProblem
from tracesft.rl.reward import REWARD_PARTS, reward_weights
from tracesft.rl.rollout import engine_rollout
from tracesft.train.adapter import LoraAdapter, write_metadata
from tracesft.train.lora_forward import use_training_forward
from tracesft.train.modeling import load_base_model, load_tokenizer
from tracesft.train.training import NO_DEVICE_READS_BETWEEN_MICRO_BATCHES, use_one_gpu

logger = logging.getLogger(__name__)


class GrpoSummary(BaseModel):
    train_loss: float  # TRL's GRPO loss, averaged over the run
    steps: int
    train_runtime_s: float
    problems: int
    generation: str  # "engine" or "trl": which backend generated
    first_reward: float | None  # mean reward of the first logged step
    last_reward: float | None  # and of the last
    quantized_4bit: bool
    optimizer: str


def parent_recipe(parent: LoraAdapter) -> TrainingRecipe:
    """The recipe the parent adapter was trained with: how its base is loaded and its LoRA shaped."""
    recorded = parent.metadata.get("recipe")
    return TrainingRecipe.model_validate(recorded) if recorded else TrainingRecipe()


def train_grpo(
    parent: LoraAdapter,
    problems: list[GrpoProblem],
    base_model: str,
    revision: str | None,
    settings: GrpoSettings,
    reward: RewardSettings,
    device: Device,
    output_dir: Path,
    callbacks: list[Any] | None = None,
) -> tuple[LoraAdapter, GrpoSummary]:
    """Continue `parent` with GRPO on `problems`; the new adapter is saved under `output_dir / "adapter"`."""
    trainer, generation, recipe = prepare_grpo(parent, problems, base_model, revision, settings, reward, device,
                                               output_dir, callbacks)
    result = trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    adapter_dir = output_dir / "adapter"
    # Only the trained adapter: with `beta` on, TRL keeps the frozen parent beside it as "ref".
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    trainer.processing_class.save_pretrained(adapter_dir)
    summary = GrpoSummary(
        train_loss=result.training_loss,
        steps=result.global_step,
        train_runtime_s=result.metrics["train_runtime"],
        problems=len(problems),
        generation=generation,
        first_reward=rewards[0] if rewards else None,
        last_reward=rewards[-1] if rewards else None,
        quantized_4bit=getattr(trainer.model, "is_loaded_in_4bit", False),
        optimizer=trainer.args.optim,
    )
    metadata = parent.metadata | {
        "kind": "lora",
        "stage": "grpo",
        "base_model": base_model,
        "base_model_revision": revision,
        "recipe": recipe.model_dump(),
        "device": device,
        "grpo": settings.model_dump(),
        "reward": reward.model_dump(),
        "training": summary.model_dump() | {"train_examples": len(problems)},
    }
    return write_metadata(adapter_dir, metadata), summary


def prepare_grpo(
    parent: LoraAdapter,
    problems: list[GrpoProblem],
    base_model: str,
    revision: str | None,
    settings: GrpoSettings,
    reward: RewardSettings,
    device: Device,
    output_dir: Path,
    callbacks: list[Any] | None = None,
) -> tuple[Any, str, TrainingRecipe]:
    """A `GRPOTrainer` ready to train, which generation backend it uses, and the parent's recipe."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import GRPOConfig, GRPOTrainer

    recipe = parent_recipe(parent)
    tokenizer = load_tokenizer(str(parent.path)) if (parent.path / "tokenizer_config.json").exists() \
        else load_tokenizer(base_model, revision)
    base = load_base_model(base_model, recipe, device, revision)
    model = PeftModel.from_pretrained(base, str(parent.path), is_trainable=True)
    on_cuda = device == "cuda"
    optimizer = recipe.optim if on_cuda else "adamw_torch"
    generation = "engine" if settings.generation == "engine" and supports(base) else "trl"
    if generation != settings.generation:
        logger.warning("The engine does not decode %s models: GRPO generates with TRL's transformers backend.",
                       base.config.model_type)
    args = GRPOConfig(
        output_dir=str(output_dir / "checkpoints"),
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        beta=settings.beta,
        reward_weights=reward_weights(reward),
        logging_steps=settings.logging_steps,
        optim=optimizer,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=on_cuda,
        use_cpu=not on_cuda,
        save_strategy="no",
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        **NO_DEVICE_READS_BETWEEN_MICRO_BATCHES,
    )
    use_one_gpu(args)
    dataset = Dataset.from_list([{"prompt": prompt_messages(p.query), "query": p.query} for p in problems])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=list(REWARD_PARTS),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        rollout_func=engine_rollout(tokenizer, settings) if generation == "engine" else None,
    )
    if recipe.fast_lora:
        use_training_forward(trainer.model)
    return trainer, generation, recipe
