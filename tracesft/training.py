"""QLoRA supervised fine-tuning with TRL's `SFTTrainer` and PEFT LoRA.

Each record becomes a prompt (the base model's chat template, via `build_prompt`) and a
completion (the `<think>` reasoning and the answer line); TRL masks the prompt, so the loss
covers the completion only. On CUDA the base is 4-bit NF4 and the optimizer the seed's paged
8-bit AdamW; on a CPU, where neither exists, the base stays in float32 and AdamW is used: same
code path, same recipe otherwise.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tracesft.adapter import LoraAdapter, save_adapter, write_metadata
from tracesft.config import TrainingRecipe
from tracesft.modeling import load_base_model, load_tokenizer, uses_cuda
from tracesft.prompting import build_completion, build_prompt
from tracesft.reporting import reporting_callbacks
from tracesft.sft_dataset import SFTDataset
from tracesft.traces import TraceRecord

logger = logging.getLogger(__name__)


class TrainingSummary(BaseModel):
    train_loss: float
    eval_loss: float | None
    global_steps: int
    train_runtime_s: float
    train_examples: int
    validation_examples: int
    quantized_4bit: bool
    optimizer: str


def prompt_completion_rows(records: list[TraceRecord], tokenizer: Any) -> list[dict[str, str]]:
    rows = []
    for record in records:
        prompt = build_prompt(tokenizer, record.query)
        rows.append({"prompt": prompt, "completion": build_completion(prompt, record.trace, record.gold)})
    return rows


def train_lora(
    dataset: SFTDataset,
    base_model: str,
    recipe: TrainingRecipe,
    output_dir: Path,
    revision: str | None = None,
    callbacks: list[Any] | None = None,
) -> tuple[LoraAdapter, TrainingSummary]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_model, revision)
    model = load_base_model(base_model, recipe, revision)
    quantized = getattr(model, "is_loaded_in_4bit", False)
    optimizer = recipe.optim if uses_cuda() else "adamw_torch"
    if optimizer != recipe.optim:
        logger.info("No CUDA: using %s instead of %s (bitsandbytes optimizers need a GPU).", optimizer, recipe.optim)

    train = Dataset.from_list(prompt_completion_rows(dataset.train, tokenizer))
    validation = Dataset.from_list(prompt_completion_rows(dataset.validation, tokenizer)) if dataset.validation else None
    args = SFTConfig(
        output_dir=str(output_dir / "trainer"),
        learning_rate=recipe.learning_rate,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        num_train_epochs=recipe.num_train_epochs,
        max_length=recipe.max_seq_length,
        gradient_checkpointing=recipe.gradient_checkpointing,
        optim=optimizer,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        logging_steps=recipe.logging_steps,
        eval_strategy="epoch" if validation is not None else "no",
        save_strategy="no",
        bf16=uses_cuda(),
        completion_only_loss=True,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to="none",
        disable_tqdm=False,
    )
    lora = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[*(callbacks or []), *reporting_callbacks(recipe)],
    )
    result = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"] if validation is not None else None

    adapter_dir = output_dir / "adapter"
    save_adapter(trainer, adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    summary = TrainingSummary(
        train_loss=result.training_loss,
        eval_loss=None if eval_loss is None or math.isnan(eval_loss) else float(eval_loss),
        global_steps=result.global_step,
        train_runtime_s=result.metrics["train_runtime"],
        train_examples=len(train),
        validation_examples=len(validation) if validation is not None else 0,
        quantized_4bit=quantized,
        optimizer=optimizer,
    )
    adapter = write_metadata(
        adapter_dir,
        {
            "base_model": base_model,
            "base_model_revision": revision,
            "traces_content_hash": dataset.content_hash,
            "recipe": recipe.model_dump(),
            "training": summary.model_dump(),
        },
    )
    return adapter, summary
