"""Supervised fine-tuning with TRL's `SFTTrainer`: QLoRA by default, full fine-tuning on request.

Each record becomes token ids and a completion mask, tokenized here rather than by TRL so the
prompt's ids are exactly those evaluation generates from (`build_prompt`, no special tokens
added: the chat template writes the BOS itself, and a tokenizer that also adds one, as the R1
distill's does, would double it). The completion is the `<think>` reasoning, the answer line and
EOS; TRL turns the mask into labels, so the loss covers the completion only.

Fast by default: examples are packed into long rows with attention kept inside each example
(`tracesft.train.packing`), and with `device` cuda Liger's kernels replace RMSNorm, SwiGLU and RoPE
(`LIGER_KERNELS`). The loss head is TRL's own: `SFTTrainer` computes the log-probabilities over the
152k vocabulary in chunks, never building the full logits. With `fast_lora`, LoRA's projections run
their adapter branch before the frozen base and add once (`tracesft.train.lora_forward`): fewer
passes over each output, and a recompute that skips each layer's last 4-bit product. `packing:
false` trains with the seed's batching exactly. With gradient checkpointing, the last layers that
`memory_budget_gib` has room for keep their activations instead of being recomputed
(`tracesft.train.layer_checkpointing`). With `device` cuda the base is 4-bit NF4, the precision
bf16 and the optimizer the seed's paged 8-bit AdamW;
with `device` cpu, where none of these exists, the base stays in float32 and AdamW is used: same
code path, same recipe otherwise. Checkpoints go to a persistent directory keyed by everything that determines the
result, so a preempted run started again with the same inputs resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tracesft.train.adapter import LoraAdapter, save_adapter, write_metadata
from tracesft.config import Device, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.train.layer_checkpointing import LayerCheckpointing, training_memory_plan
from tracesft.train.lora_forward import use_training_forward
from tracesft.train.memory_plan import MemoryPlan
from tracesft.train.modeling import load_base_model, load_tokenizer
from tracesft.train.packing import packed_row_plan, register_varlen_attention
from tracesft.data.prompting import build_completion, build_prompt
from tracesft.train.reporting import reporting_callbacks
from tracesft.data.sft_dataset import SFTDataset
from tracesft.data.traces import TraceRecord

logger = logging.getLogger(__name__)

# The Liger kernels `training.liger_kernels` turns on. Not Liger's fused linear cross-entropy: it
# replaces the model's forward, and TRL 1.16's `SFTTrainer` refuses it for its own chunked LM head
# (which never builds the full logits either); left to itself TRL would switch it off silently.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}

# Trainer settings (SFT and GRPO) under which the training loop does not read the device after each
# micro-batch. Either read makes the host wait until the GPU has run the whole backward, so the
# host's own work before the next forward (on the 32B, tens of ms of Python a micro-batch, mostly
# `model.train()` and the FLOP count walking every module) leaves the GPU idle. With neither, that
# work overlaps the backward wherever the host is ahead of the GPU: on an H200, 1.5% more tokens/s
# on uniform 4,096-token examples; none on log-normal rows, whose backward ends with the host
# behind (`benchmarks/train_throughput.py --ablations micro-batch-waits`). What they cost: a NaN or
# infinite loss shows in the logged loss rather than being replaced by the running mean (training
# itself is the same either way: the filter only ever touched the log), and the Trainer's own token
# count (`num_input_tokens_seen`) is not kept; TRL's is, logged as `num_tokens`.
NO_DEVICE_READS_BETWEEN_MICRO_BATCHES = {"logging_nan_inf_filter": False, "include_num_input_tokens_seen": "no"}


class TrainingSummary(BaseModel):
    train_loss: float
    eval_loss: float | None
    global_steps: int
    train_runtime_s: float
    train_examples: int
    validation_examples: int
    quantized_4bit: bool
    optimizer: str
    full_fine_tuning: bool = False
    packed_row_length: int | None = None
    resumed_from: str | None = None
    recomputed_layers: int | None = None  # decoder layers checkpointed (recomputed in backward) as training ran
    memory_plan: MemoryPlan | None = None  # training.memory_budget_gib's estimate, where it applied


def tokenize_record(tokenizer: Any, record: TraceRecord, max_seq_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + completion + EOS, and a mask that is 1 on the completion only."""
    prompt = build_prompt(tokenizer, record.query)
    completion = build_completion(prompt, record.trace, record.gold)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    if len(ids) > max_seq_length:
        raise TracesftError(
            f"{record.where}: field `trace`: prompt and trace are {len(ids)} tokens, more than max_seq_length "
            f"{max_seq_length}; raise training.max_seq_length or drop the record (validation should have caught it)."
        )
    return {"input_ids": ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def tokenized_rows(records: list[TraceRecord], tokenizer: Any, max_seq_length: int) -> list[dict[str, list[int]]]:
    return [tokenize_record(tokenizer, record, max_seq_length) for record in records]


def checkpoint_directory(
    recipe: TrainingRecipe, device: Device, base_model: str, revision: str | None, content_hash: str
) -> Path | None:
    """This run's directory under the persistent `checkpoint_dir`: the same inputs, the same directory.

    The root should outlive the machine (a volume mounted on the training pod), so a preempted
    step, retried by the orchestrator with the same inputs, finds its checkpoints and resumes.
    Without a root, checkpoints stay in the step's scratch directory and die with it.
    """
    if recipe.checkpoint_dir is None:
        return None
    # The budget decides which layers recompute, never the arithmetic: a run may resume under another.
    how_it_runs = {"checkpoint_dir", "save_steps", "quantized_base_cache", "memory_budget_gib"}
    determining = recipe.model_dump(exclude=how_it_runs)
    key = json.dumps([determining, device, base_model, revision, content_hash], sort_keys=True, default=str)
    return Path(recipe.checkpoint_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class PreparedTraining:
    """An `SFTTrainer` ready to train, and what the summary reports about how it was set up."""

    trainer: Any
    tokenizer: Any
    checkpoints: Path
    packed_row_length: int | None
    quantized: bool
    optimizer: str
    train_examples: int
    validation_examples: int
    layer_checkpointing: LayerCheckpointing


def prepare_training(
    dataset: SFTDataset,
    base_model: str,
    recipe: TrainingRecipe,
    device: Device,
    output_dir: Path,
    revision: str | None = None,
    callbacks: list[Any] | None = None,
    checkpoint_dir: Path | None = None,
) -> PreparedTraining:
    """Tokenize, plan the packed rows, load the model and build the trainer; nothing is trained yet."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_model, revision)
    train_rows = tokenized_rows(dataset.train, tokenizer, recipe.max_seq_length)
    validation_rows = tokenized_rows(dataset.validation, tokenizer, recipe.max_seq_length)
    if recipe.packing:
        lengths = [len(row["input_ids"]) for row in train_rows]
        examples_per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
        row_length, rows_per_step = packed_row_plan(lengths, examples_per_step, recipe.packing_length)
        batching = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
                    "gradient_accumulation_steps": rows_per_step, "max_length": row_length,
                    "packing": True, "packing_strategy": "bfd", "padding_free": True}
        attention = register_varlen_attention()
    else:
        row_length, attention = None, None
        batching = {"per_device_train_batch_size": recipe.per_device_train_batch_size,
                    "per_device_eval_batch_size": recipe.per_device_train_batch_size,
                    "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
                    "max_length": recipe.max_seq_length}

    model = load_base_model(base_model, recipe, device, revision, attn_implementation=attention)
    quantized = getattr(model, "is_loaded_in_4bit", False)
    on_cuda = device == "cuda"
    optimizer = recipe.optim if on_cuda else "adamw_torch"
    if optimizer != recipe.optim:
        logger.info("device cpu: using %s instead of %s (bitsandbytes optimizers need a GPU).", optimizer, recipe.optim)
    liger = recipe.liger_kernels and on_cuda and importlib.util.find_spec("liger_kernel") is not None
    if recipe.liger_kernels and on_cuda and not liger:
        logger.warning("liger_kernels is on but liger-kernel is not installed: training without it.")

    row_tokens = row_length or recipe.per_device_train_batch_size * recipe.max_seq_length
    layer_checkpointing = LayerCheckpointing(training_memory_plan(model, recipe, row_tokens, optimizer))

    train = Dataset.from_list(train_rows)
    validation = Dataset.from_list(validation_rows) if validation_rows else None
    checkpoints = (checkpoint_dir or checkpoint_directory(recipe, device, base_model, revision, dataset.content_hash)
                   or output_dir / "checkpoints")
    args = SFTConfig(
        output_dir=str(checkpoints),
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs,
        # transformers 5's names for the recipe's gradient checkpointing (the old ones warn).
        activation_checkpointing=recipe.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=optimizer,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        logging_steps=recipe.logging_steps,
        eval_strategy="no" if validation is None else ("steps" if recipe.eval_steps else "epoch"),
        eval_steps=recipe.eval_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,
        bf16=on_cuda,
        use_cpu=not on_cuda,  # otherwise Trainer moves a cpu run onto any GPU it sees
        dataloader_pin_memory=on_cuda,  # pinned host memory only speeds copies to a GPU; torch warns without one
        use_liger_kernel=liger,
        liger_kernel_config=LIGER_KERNELS if liger else None,
        completion_only_loss=True,
        **NO_DEVICE_READS_BETWEEN_MICRO_BATCHES,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to="none",
        disable_tqdm=False,
        **batching,
    )
    use_one_gpu(args)
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
        peft_config=lora if recipe.use_lora else None,
        callbacks=[*(callbacks or []), *reporting_callbacks(recipe), layer_checkpointing],
    )
    if recipe.fast_lora:
        use_training_forward(trainer.model)
    return PreparedTraining(trainer, tokenizer, checkpoints, row_length, quantized, optimizer,
                            len(train_rows), len(validation_rows), layer_checkpointing)


def train_lora(
    dataset: SFTDataset,
    base_model: str,
    recipe: TrainingRecipe,
    device: Device,
    output_dir: Path,
    revision: str | None = None,
    callbacks: list[Any] | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[LoraAdapter, TrainingSummary]:
    """Train, resuming from the last checkpoint if one is there, and save the adapter (or, with
    `use_lora: false`, the whole model) under `output_dir / "adapter"`."""
    from transformers.trainer_utils import get_last_checkpoint

    prepared = prepare_training(dataset, base_model, recipe, device, output_dir, revision, callbacks, checkpoint_dir)
    trainer, tokenizer, checkpoints = prepared.trainer, prepared.tokenizer, prepared.checkpoints
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        logger.info("Resuming from %s.", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None

    adapter_dir = output_dir / "adapter"
    save_adapter(trainer, adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    summary = TrainingSummary(
        train_loss=result.training_loss,
        eval_loss=None if eval_loss is None or math.isnan(eval_loss) else float(eval_loss),
        global_steps=result.global_step,
        train_runtime_s=result.metrics["train_runtime"],
        train_examples=prepared.train_examples,
        validation_examples=prepared.validation_examples,
        quantized_4bit=prepared.quantized,
        optimizer=prepared.optimizer,
        full_fine_tuning=not recipe.use_lora,
        packed_row_length=prepared.packed_row_length,
        resumed_from=resume,
        recomputed_layers=prepared.layer_checkpointing.recomputed_layers,
        memory_plan=prepared.layer_checkpointing.plan,
    )
    adapter = write_metadata(
        adapter_dir,
        {
            "kind": "lora" if recipe.use_lora else "full",
            "base_model": base_model,
            "base_model_revision": revision,
            "traces_content_hash": dataset.content_hash,
            "recipe": recipe.model_dump(),
            "device": device,
            "training": summary.model_dump(),
        },
    )
    return adapter, summary


def use_one_gpu(args: Any) -> None:
    """Make a one-process run train on its one GPU, however many the machine shows.

    With several GPUs visible and no launcher, Trainer counts them all (`args.n_gpu`) and wraps
    the model in `nn.DataParallel`, which TRL's SFTTrainer refuses. Our model sits whole on the
    current device (`load_base_model`'s device map), where one GPU is all it can use. The public
    remedy, showing the process one GPU through `CUDA_VISIBLE_DEVICES`, works only before CUDA
    starts, i.e. in whoever starts the process, and a one-process run trains inside the pipeline
    step's own process. transformers 5.24 and accelerate 1.15 offer no setting for the GPU count,
    so this sets Trainer's private count as Trainer itself does for a model spread by a device map.
    """
    if args.n_gpu > 1:
        args._n_gpu = 1
