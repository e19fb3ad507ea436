"""QLoRA training throughput of the shipped training function against the seed's setup, on the 32B architecture.

- project: `tracesft.train.distributed.train`, the function the `train_adapter` step calls, with
  the production recipe (`TrainingRecipe()` defaults) on device cuda: examples packed into rows of
  at most 8,192 tokens with attention kept inside each example (varlen kernel), Liger's RMSNorm,
  SwiGLU and RoPE, and what TRL's `SFTTrainer` itself does to a 4-bit base (LoRA weights in bf16,
  its chunked LM head, which never builds the 152k-wide logits).
- seed: TRL's `SFTTrainer` as the seed's script configures it: batch 1, gradient accumulation 8,
  no packing, SDPA attention, paged 8-bit AdamW, bf16, gradient checkpointing, the recipe's LoRA,
  learning rate and schedule. The same TRL, so it gets the same bf16 LoRA and LM head.

Both load the base with the shipped loader and train on the same examples. The base has random
weights (speed and memory do not depend on them; `random_32b`), quantised to NF4 as the recipe
says and written once into the recipe's `quantized_base_cache`, beside a base directory holding
the 32B's config.json and the tiny model's tokenizer (the token ids are arbitrary anyway): the
shipped `load_base_model` then loads it as it would a real checkpoint's cache.

Nothing of the training loop is copied: a `TrainerCallback` asks each Trainer for its own
evaluation before the first update (the loss check), lets one optimizer step pass as a warm-up
(allocations, paged optimizer state, Triton compilation), times the next `--steps` and stops.
Each run trains in a process of its own, so no run inherits another's allocator state, built
kernels or patched modules. Workloads: (a) lengths drawn log-normally, median 1,200 tokens,
sigma 0.5, clipped to [256, 4096], fixed seed; (b) every example 4,096 tokens. Reported: real
tokens/s (the tokens of the model's training forwards; neither path pads), peak GiB (what tensors
held; the JSON also has what the allocator held, `peak_reserved_gib`), the ratios, and both
paths' loss on the same 8 held-out examples of one length before any update (LoRA B starts at
zero, so both compute the base's function; one length makes per-row and per-example means the
same estimator).

`--ablations` runs, on workload (a) unless `--workload` says, the production path with one piece
taken out at a time (every piece, or those named: `--ablations lora-forward`), to give each
piece's share: packing (and with it the varlen attention, which only packed rows use), the varlen
attention (packed rows on SDPA with transformers' block-diagonal mask), Liger's layers, bf16 LoRA
(back to fp32 under bf16 autocast, as PEFT makes them and the seed's TRL kept them), the LoRA
training forward (`tracesft.train.lora_forward`; `fast_lora: false`, PEFT's own forward), its add kernel
(`tracesft.train.lora_add_kernel`; a product then an add instead), the loop's freedom from device
reads between micro-batches (`training.NO_DEVICE_READS_BETWEEN_MICRO_BATCHES`; the Trainer's loss
filter and token count back on), the recomputed layers' dequantised weights kept for their backward
(`tracesft.train.recompute_weights`; bitsandbytes' product, which dequantises again).

`--budgets 40 70` runs, on workload (a), the production path with every layer recomputed
(`memory_budget_gib: null`) and then at each `training.memory_budget_gib`: tokens/s, the measured
peak, and the plan's kept layers and estimated peak (`tracesft.train.memory_plan`), to calibrate it.
`--packing-lengths 8192 4096` runs the production path at each `training.packing_length`: rows
hold the same tokens per optimizer step either way, shorter rows leave the budget room for more
kept layers. `--gpu-idle` traces the timed steps (`gpu_idle.py`): how much of the window the GPU
was busy, the kernels it waited to be given, and what the host was doing meanwhile. `--workload
uniform_4096` runs any of these (or `--profile`) on one workload only.

    python benchmarks/train_throughput.py               # one H200, ~6 min: results/train_throughput.json
    python benchmarks/train_throughput.py --ablations   # one H200, ~6 min: results/train_throughput_ablations.json
    python benchmarks/train_throughput.py --budgets 40 70  # one H200: results/train_throughput_budgets.json
    python benchmarks/train_throughput.py --budgets 40 70 --workload uniform_4096  # ..._budgets_uniform_4096.json
    python benchmarks/train_throughput.py --profile --layers 8  # one H200: top kernels of the project path, workload (b)
    python benchmarks/train_throughput.py --gpu-idle --workload lognormal_1200  # one H200: the GPU's idle gaps
    python benchmarks/train_throughput.py --tiny        # CPU plumbing check, tiny Qwen2: *_tiny.json (git-ignored)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import ValidationError
from transformers import AttentionInterface, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_idle import GarbageCollectionMarks, idle_report, mark_methods, profiled_intervals  # noqa: E402
from random_32b import add_model_arguments, library_versions, qwen2_config, random_base, runs_tiny  # noqa: E402

from tracesft.config import Device, TrainingRecipe  # noqa: E402
from tracesft.data.sample_data import tokenizer_corpus  # noqa: E402
from tracesft.data.sft_dataset import SFTDataset  # noqa: E402
from tracesft.data.traces import TraceRecord  # noqa: E402
from tracesft.train import layer_checkpointing, lora_add_kernel, training  # noqa: E402
from tracesft.train.distributed import train  # noqa: E402
from tracesft.train.modeling import (  # noqa: E402
    load_base_model,
    load_tokenizer,
    quantization_config,
    quantized_base_path,
    save_quantized_base,
)
from tracesft.train.packing import VARLEN_ATTENTION, varlen_attention_forward  # noqa: E402
from tracesft.train.tiny_model import build_tiny_model  # noqa: E402
from tracesft.train.training import tokenize_record, tokenized_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED_PATH = "tracesft.train.distributed.train"
WORKLOADS = ("lognormal_1200", "uniform_4096")
PROFILED = [torch.profiler.ProfilerActivity.CPU, *([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
Profile = Literal["kernels", "idle"]  # top kernels and ops by input shape; the GPU's idle gaps and their causes
CHECK_LENGTH = {"lognormal_1200": 1200, "uniform_4096": 4096}  # tokens of each loss-check example
CHECK_EXAMPLES = 8
# Examples for this many optimizer steps beyond the trained ones, so no epoch (and the evaluation
# the recipe runs at its end) ends inside the timed steps.
SPARE_STEPS = 2
TINY_SCALE = 2  # --tiny: every length halved (the prompt frame alone is ~100 tokens)
# A pad token of its own: the Trainer counts tokens that are not padding, and the tiny tokenizer
# pads with EOS, which every example ends with.
PAD_TOKEN = "<｜▁pad▁｜>"


# --- the paths ----------------------------------------------------------------------------------------

def train_seed(dataset: SFTDataset, base_model: str, recipe: TrainingRecipe, device: Device, output_dir: Path,
               callbacks: list[Any]) -> None:
    """The seed's script: TRL's `SFTTrainer` on one example per forward, no packing, SDPA.

    The base is loaded by the shipped loader, the same `from_pretrained` of the same 4-bit
    checkpoint the seed's script makes (loading is not timed), and the examples tokenized as the
    shipped path tokenizes them, so both paths train on the same ids.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_model)
    rows = lambda records: Dataset.from_list(tokenized_rows(records, tokenizer, recipe.max_seq_length))  # noqa: E731
    on_cuda = device == "cuda"
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        max_length=recipe.max_seq_length,
        packing=False,
        optim=recipe.optim if on_cuda else "adamw_torch",
        bf16=on_cuda,
        use_cpu=not on_cuda,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        logging_steps=recipe.logging_steps,
        completion_only_loss=True,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
    )
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.target_modules, bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=load_base_model(base_model, recipe, device, attn_implementation="sdpa"),
        args=args,
        train_dataset=rows(dataset.train),
        eval_dataset=rows(dataset.validation),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )
    trainer.train()


def packed_rows_on_sdpa(model: Any) -> None:
    """Packed rows through SDPA: transformers builds a block-diagonal causal mask from the position ids."""
    model.set_attn_implementation("sdpa")


def without_lora_add_kernel() -> Callable[[], None]:
    """LoRA's second product then the add (cuBLAS, then torch's add) instead of `tracesft.train.lora_add_kernel`."""
    applies = lora_add_kernel.applies
    lora_add_kernel.applies = lambda a: False
    return lambda: setattr(lora_add_kernel, "applies", applies)


def device_reads_between_micro_batches() -> Callable[[], None]:
    """The Trainer's NaN filter of the logged loss and its own token count back on, as the project
    trained before: each reads the device after every micro-batch."""
    settings = training.NO_DEVICE_READS_BETWEEN_MICRO_BATCHES
    training.NO_DEVICE_READS_BETWEEN_MICRO_BATCHES = {"logging_nan_inf_filter": True,
                                                      "include_num_input_tokens_seen": "non_padding"}
    return lambda: setattr(training, "NO_DEVICE_READS_BETWEEN_MICRO_BATCHES", settings)


def dequantised_again_in_backward() -> Callable[[], None]:
    """bitsandbytes' 4-bit product in every layer: a recomputed layer's backward dequantises its weights again."""
    keep = layer_checkpointing.keep_recomputed_weights
    layer_checkpointing.keep_recomputed_weights = lambda layer: None
    return lambda: setattr(layer_checkpointing, "keep_recomputed_weights", keep)


def lora_in_fp32(model: Any) -> None:
    """LoRA weights back in fp32, under the Trainer's bf16 autocast (TRL casts them to bf16 on a 4-bit base)."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


@dataclass(frozen=True)
class TrainingPath:
    """One way of training: the seed's setup, or the shipped function with recipe fields changed."""

    name: str
    seed: bool = False
    recipe: dict[str, Any] = field(default_factory=dict)
    change: Callable[[Any], None] | None = None  # applied to the model as training begins
    # Switches a module of the process for the whole run (the model loaded after it); returns how to undo it.
    switch: Callable[[], Callable[[], None]] | None = None

    def recipe_of(self, recipe: TrainingRecipe) -> TrainingRecipe:
        """`recipe` with this path's fields changed, validated as a user's recipe is (a packing
        length below max_seq_length would otherwise be stretched silently): one line if not."""
        try:
            return TrainingRecipe.model_validate(recipe.model_dump() | self.recipe)
        except ValidationError as error:
            raise SystemExit(f"path {self.name!r}: {error.errors()[0]['msg']}") from None

    def uses_liger(self, recipe: TrainingRecipe, device: Device) -> bool:
        import importlib.util

        return (not self.seed and device == "cuda" and self.recipe_of(recipe).liger_kernels
                and importlib.util.find_spec("liger_kernel") is not None)


SEED = TrainingPath("seed", seed=True)
PROJECT = TrainingPath("project")
ABLATIONS = {  # by the piece taken out, as `--ablations` names it
    "packing": TrainingPath("project without packing", recipe={"packing": False}),
    "varlen": TrainingPath("project, packed rows on SDPA", change=packed_rows_on_sdpa),
    "liger": TrainingPath("project without Liger", recipe={"liger_kernels": False}),
    "bf16-lora": TrainingPath("project, fp32 LoRA", change=lora_in_fp32),
    "lora-forward": TrainingPath("project, PEFT's LoRA forward", recipe={"fast_lora": False}),
    "lora-add-kernel": TrainingPath("project without the LoRA add kernel", switch=without_lora_add_kernel),
    "micro-batch-waits": TrainingPath("project, device reads between micro-batches",
                                      switch=device_reads_between_micro_batches),
    "recompute-weights": TrainingPath("project, weights dequantised again in backward",
                                      switch=dequantised_again_in_backward),
}
EVERY_LAYER_RECOMPUTED = TrainingPath("project, every layer recomputed", recipe={"memory_budget_gib": None})


def packing_paths(lengths: list[int]) -> tuple[TrainingPath, ...]:
    """The project at each `training.packing_length` (default budget): longer rows amortise per-row
    work, shorter ones leave the budget room for more layers that keep their activations."""
    return tuple(TrainingPath(f"project, rows of <= {length}", recipe={"packing_length": length}) for length in lengths)


def budget_paths(budgets: list[float]) -> tuple[TrainingPath, ...]:
    """The project with every layer recomputed, then at each memory budget."""
    return (EVERY_LAYER_RECOMPUTED,
            *(TrainingPath(f"project, budget {gib:g} GiB", recipe={"memory_budget_gib": gib}) for gib in budgets))


# --- measuring ----------------------------------------------------------------------------------------

def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Loss before any update, then optimizer steps 2 to 1 + `steps` timed, then training stopped."""

    def __init__(self, steps: int, change: Callable[[Any], None] | None, profile: Profile | None = None) -> None:
        self.steps, self.change, self.profile = steps, change, profile
        self.result: dict[str, Any] = {"packed_attention_calls": 0}
        self._start: float | None = None
        self._tokens: list[torch.Tensor | int] = []
        self._profiler = None if profile is None else torch.profiler.profile(
            activities=PROFILED, record_shapes=profile == "kernels")
        self._collections = GarbageCollectionMarks()
        self._unmark_phases: Callable[[], Any] = lambda: None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.change is not None:
            self.change(model)
        model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        # The Trainer reads `eval_on_start` right after this event: its own evaluation, on the
        # validation split, with this path's batching and kernels, before the first update.
        args.eval_on_start = True

        # Packed attention calls that carry the example boundaries: a patched forward that dropped
        # them would let attention span examples without a sound. Wraps what `prepare_training`
        # registered under the same name.
        def counted(module, query, key, value, attention_mask, *rest, **kwargs):
            self.result["packed_attention_calls"] += kwargs.get("cu_seq_lens_q") is not None
            return varlen_attention_forward(module, query, key, value, attention_mask, *rest, **kwargs)

        AttentionInterface.register(VARLEN_ATTENTION, counted)
        trained = [p for p in model.parameters() if p.requires_grad]
        self.result["setup"] = {
            "attention": model.config._attn_implementation,
            "lora_dtype": str(trained[0].dtype).removeprefix("torch."),
            "trainable_parameters": sum(p.numel() for p in trained),
            "optimizer": args.optim,
            "bf16_autocast": args.bf16,
            "liger": args.liger_kernel_config if args.use_liger_kernel else None,
            "rows_per_optimizer_step": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "row_tokens_at_most": args.max_length,
            "packing": args.packing,
        }

    def _count_tokens(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The real tokens of each training forward while the clock runs, counted the same way on
        every path, whether its Trainer counts them or not: a padding mask's sum, left on the device
        until the clock stops so that counting reads nothing from the GPU, or the ids of a padding-free row."""
        if self._start is not None and model.training:
            mask = kwargs.get("attention_mask")
            self._tokens.append(mask.sum() if mask is not None else kwargs["input_ids"].numel())

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._start is not None:
            raise RuntimeError("an evaluation ran inside the timed steps: the workload needs more examples")
        self.result.setdefault("loss_before_update", metrics["eval_loss"])

    def on_step_end(self, args, state, control, **kwargs):
        """Start the clock after the warm-up step; stop it, and training, `steps` steps later."""
        if state.global_step == 1:
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._start = time.perf_counter()
            if self._profiler is not None:
                self._profiler.start()
            if self.profile == "idle":  # Python's own pauses and the loop's phases, as host ops
                self._collections.install()
                self._unmark_phases = mark_methods(trainer_phases())
        elif self._start is not None and state.global_step == 1 + self.steps:
            synchronize()
            seconds = time.perf_counter() - self._start  # before the profile is read out
            tokens = sum(int(count) for count in self._tokens)
            if self.profile == "idle":
                self._collections.remove()
                self._unmark_phases()
            if self._profiler is not None:
                self._profiler.stop()
            if self.profile == "idle":
                self.result["gpu_idle"] = idle_report(*profiled_intervals(self._profiler))
            elif self.profile == "kernels":
                sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"  # kernels, not callers
                print(self._profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90), flush=True)
                print(self._profiler.key_averages(group_by_input_shape=True).table(  # which products, by shape
                    sort_by=sort, row_limit=40, max_name_column_width=40, max_shapes_column_width=90), flush=True)
            cuda = torch.cuda.is_available()  # peaks: what tensors held, and what the allocator held for them
            self.result.update(tokens_per_s=round(tokens / seconds, 1), tokens=tokens, seconds=round(seconds, 2),
                               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None)
            self._start = None
            control.should_training_stop = True


def trainer_phases() -> dict[type, tuple[str, ...]]:
    """The Trainer's steps of a micro-batch and an optimizer step, marked in `--gpu-idle`'s trace (both
    paths train through them; the optimizer's step and the data loader are marked by torch itself)."""
    from accelerate import Accelerator
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler
    from trl import SFTTrainer

    return {Trainer: ("get_batch_samples", "_prepare_inputs", "training_step", "floating_point_ops",
                      "_track_num_input_tokens", "_maybe_log_save_evaluate"),
            SFTTrainer: ("training_step", "compute_loss"), Accelerator: ("backward",),
            CallbackHandler: ("on_step_begin", "on_substep_end", "on_step_end", "on_optimizer_step")}


def measure_alone(path: TrainingPath, dataset: SFTDataset, base_model: str, recipe: TrainingRecipe, device: Device,
                  steps: int, workdir: Path, profile: Profile | None = None) -> dict[str, Any]:
    """`measure` in a process of its own, so that what one run leaves behind cannot change the next:
    in one process, each later path peaked 1.4-2.9 GiB higher (the caching allocator's state), and
    cuDNN's attention graphs built by one path served the next, whose speed then looked 4% better
    (thirteenth session). The run's torch thread count is the caller's."""
    with multiprocessing.get_context("spawn").Pool(1, initializer=torch.set_num_threads,
                                                   initargs=(torch.get_num_threads(),)) as pool:
        return pool.apply(measure, (path, dataset, base_model, recipe, device, steps, workdir, profile))


def measure(path: TrainingPath, dataset: SFTDataset, base_model: str, recipe: TrainingRecipe, device: Device, steps: int,
            workdir: Path, profile: Profile | None = None) -> dict[str, Any]:
    """Train `path` on `dataset` for 1 + `steps` optimizer steps; what `StepTimer` recorded (and,
    with `profile` "kernels", the top kernels of the timed steps printed)."""
    timer = StepTimer(steps, path.change, profile)
    output_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    undo = path.switch() if path.switch is not None else None
    try:
        if path.seed:
            train_seed(dataset, base_model, recipe, device, output_dir, [timer])
        else:
            _, summary = train(dataset, base_model, path.recipe_of(recipe), device, output_dir,
                               callbacks=[timer])
            timer.result.update(recomputed_layers=summary.recomputed_layers,
                                memory_plan=summary.memory_plan and summary.memory_plan.model_dump())
    finally:
        if undo is not None:
            undo()
        shutil.rmtree(output_dir, ignore_errors=True)
    if "tokens_per_s" not in timer.result:
        raise RuntimeError(f"{path.name}: training ended before {1 + steps} optimizer steps")
    setup = timer.result["setup"]
    if setup["packing"] and setup["attention"] == VARLEN_ATTENTION and not timer.result["packed_attention_calls"]:
        raise RuntimeError(f"{path.name}: packed rows never reached the varlen attention with example boundaries")
    return timer.result


# --- the workloads and the base -----------------------------------------------------------------------

def workload_lengths(kind: str, count: int, scale: int, seed: int = 1234) -> list[int]:
    if kind == "uniform_4096":
        return [4096 // scale] * count
    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(math.log(1200) + 0.5 * torch.randn(count, generator=generator, dtype=torch.float64))
    return [int(x) // scale for x in draws.clamp(256, 4096).round().tolist()]


def trace_records(lengths: list[int], tokenizer: Any, max_seq_length: int, seed: int = 99) -> list[TraceRecord]:
    """Records that `tokenize_record` (prompt, trace, answer line, EOS) turns into exactly `lengths` tokens.

    Each trace is a run of random digits: Qwen2's pre-tokenizer splits every digit off on its own, so
    each is one token and a record is the frame's length plus its digits.
    """
    rng = random.Random(seed)

    def record(trace: str) -> TraceRecord:
        return TraceRecord(query="Premise: A correlates with B. Hypothesis: A causes B.", trace=trace, gold=1,
                           source="benchmark", locator="generated")

    frame = len(tokenize_record(tokenizer, record(""), max_seq_length)["input_ids"])
    records = [record("".join(rng.choices(string.digits, k=length - frame))) for length in lengths]
    made = [len(tokenize_record(tokenizer, r, max_seq_length)["input_ids"]) for r in records]
    if made != lengths:
        raise RuntimeError(f"records of {made[:5]}... tokens, wanted {lengths[:5]}...: the digit trick no longer holds")
    return records


def workload_dataset(kind: str, tokenizer: Any, recipe: TrainingRecipe, steps: int, scale: int) -> SFTDataset:
    """Training examples for 1 + `steps` + spare optimizer steps, and `CHECK_EXAMPLES` of one length held out."""
    per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
    lengths = workload_lengths(kind, (1 + steps + SPARE_STEPS) * per_step, scale)
    check = [CHECK_LENGTH[kind] // scale] * CHECK_EXAMPLES
    records = trace_records(lengths + check, tokenizer, recipe.max_seq_length)
    return SFTDataset(train=records[: len(lengths)], validation=records[len(lengths):],
                      content_hash=hashlib.sha256(json.dumps([kind, lengths]).encode()).hexdigest(),
                      validation_fraction=len(check) / len(records), seed=0)


def benchmark_tokenizer(directory: Path) -> Any:
    tokenizer = load_tokenizer(str(build_tiny_model(directory / "tiny-tokenizer", tokenizer_corpus())))
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def write_random_base(directory: Path, config: Any, tokenizer: Any, recipe: TrainingRecipe, device: Device) -> tuple[str, dict[str, Any]]:
    """A base model directory that the shipped loader takes for a real one: config.json and tokenizer
    files, the random weights in the recipe's 4-bit cache (cuda) or beside them (cpu: no 4-bit)."""
    base = directory / "base"
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    quantization = quantization_config(recipe, device)
    start = time.perf_counter()
    model = random_base(config, torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32,
                        quantization, torch.Generator(device=device).manual_seed(0))
    synchronize()
    built = time.perf_counter()
    cached = quantized_base_path(str(base), recipe, device)
    if cached is None:
        model.save_pretrained(base)
    else:
        model.config.quantization_config = quantization  # as `from_pretrained` records it: loads back as 4-bit
        save_quantized_base(model, cached)
    saved = time.perf_counter()
    weights = cached or base
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(base), {"build_s": round(built - start, 1), "save_s": round(saved - built, 1),
                       "size_gib": round(sum(p.stat().st_size for p in weights.glob("*.safetensors")) / 2**30, 2)}


# --- main ---------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU plumbing check with a tiny Qwen2")
    parser.add_argument("--ablations", nargs="*", choices=list(ABLATIONS), metavar="PIECE",
                        help="workload (a) only: seed, project, and the project without each piece named "
                             f"(default: all of {', '.join(ABLATIONS)})")
    parser.add_argument("--budgets", type=float, nargs="+", metavar="GIB",
                        help="workload (a) only: every layer recomputed, then the project at each memory_budget_gib")
    parser.add_argument("--packing-lengths", type=int, nargs="+", metavar="TOKENS",
                        help="the project at each training.packing_length instead of seed and project")
    parser.add_argument("--workload", choices=WORKLOADS, default=None,
                        help="only this workload (default: both; (a) with --ablations or --budgets, (b) with --profile)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per path and workload")
    parser.add_argument("--profile", action="store_true",
                        help="the project path as configured and with every layer recomputed (as most of the 64 are "
                             "at the default budget), on workload (b) unless --workload says: print the top kernels of "
                             "their timed steps, then the top ops by input shape (tokens/s then include the profiler's "
                             "cost; use with --layers 8)")
    parser.add_argument("--gpu-idle", action="store_true",
                        help="seed and project (or the paths other options name) with their timed steps' kernels "
                             "and host ops traced: the GPU's busy share and idle gaps, by size, by the kernel after "
                             "each and by the host ops running in the long ones")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    tiny = runs_tiny(args.tiny)
    ablated = (list(args.ablations) or list(ABLATIONS)) if args.ablations is not None else []
    if args.budgets:
        paths = budget_paths(args.budgets)
    elif ablated:
        paths = (SEED, PROJECT, *(ABLATIONS[piece] for piece in ablated))
    elif args.packing_lengths:
        paths = packing_paths(args.packing_lengths)
    else:
        paths = (PROJECT, EVERY_LAYER_RECOMPUTED) if args.profile else (SEED, PROJECT)
    workloads = ((args.workload,) if args.workload else WORKLOADS[1:] if args.profile
                 else WORKLOADS[:1] if ablated or args.budgets else WORKLOADS)
    profile = "kernels" if args.profile else "idle" if args.gpu_idle else None
    report = run(paths, workloads, args.steps, tiny, args.layers, args.workdir, profile)
    print_table(report)
    name = ("train_throughput" + ("_ablations" if ablated else "")
            + ("_" + "_".join(ablated) if ablated and ablated != list(ABLATIONS) else "")
            + ("_budgets" if args.budgets else "")
            + ("_packing" if args.packing_lengths else "")
            + (f"_{args.workload}" if args.workload and (ablated or args.budgets or args.packing_lengths) else "")
            + ("_profile" if args.profile else "") + ("_gpu_idle" if args.gpu_idle else "") + ("_tiny" if tiny else ""))
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def run(paths: tuple[TrainingPath, ...], workloads: tuple[str, ...], steps: int, tiny: bool, layers: int = 64,
        workdir: Path | None = None, profile: Profile | None = None) -> dict[str, Any]:
    """Write the random base, train every path on every workload, and report (CPU and tiny Qwen2 if `tiny`)."""
    device: Device = "cpu" if tiny else "cuda"
    scale = TINY_SCALE if tiny else 1
    started = time.perf_counter()
    card = torch.cuda.get_device_name() if not tiny else "cpu (tiny Qwen2)"
    scratch = Path(tempfile.mkdtemp(prefix="train-bench-", dir=workdir))
    try:
        recipe = TrainingRecipe(quantized_base_cache=str(scratch / "quantized-base"))
        if tiny:
            recipe = recipe.model_copy(update={"max_seq_length": recipe.max_seq_length // scale,
                                               "packing_length": recipe.packing_length // scale})
        for path in paths:  # a path's recipe that no user could write fails here, before the base is written
            path.recipe_of(recipe)
        if any(path.uses_liger(recipe, device) for path in paths):
            import liger_kernel.transformers  # noqa: F401  (a broken install fails here, not after the seed's runs)
        tokenizer = benchmark_tokenizer(scratch)
        base_model, base = write_random_base(scratch, qwen2_config(tiny, layers), tokenizer, recipe, device)
        print(f"{card}: random base written {base}", flush=True)
        runs: dict[str, dict[str, Any]] = {path.name: {} for path in paths}
        for path in paths:
            for kind in workloads:
                dataset = workload_dataset(kind, tokenizer, recipe, steps, scale)
                runs[path.name][kind] = measure_alone(path, dataset, base_model, recipe, device, steps, scratch,
                                                      profile)
                print(kind, path.name, {k: v for k, v in runs[path.name][kind].items() if k != "setup"}, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "device": card,
        "date": datetime.date.today().isoformat(),
        "model": "tiny Qwen2 (random)" if tiny else f"Qwen2 32B architecture, {layers} layers (random NF4)",
        "measured_path": MEASURED_PATH,
        "baseline_path": paths[0].name if not paths[0].seed else (
            "trl.SFTTrainer as the seed's script configures it (batch 1, accumulation 8, no packing, "
            "sdpa, paged_adamw_8bit, bf16, gradient checkpointing)"),
        **summarize(runs, paths, workloads),
        "recipe": recipe.model_dump(exclude={"quantized_base_cache"}),
        "timed_optimizer_steps": steps,
        "length_scale": f"1/{scale}",
        "random_base": base,
        "versions": library_versions(),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }


def summarize(runs: dict[str, dict[str, Any]], paths: tuple[TrainingPath, ...], workloads: tuple[str, ...]) -> dict[str, Any]:
    """The headline figures: the project against the seed (or the budgets against every layer recomputed),
    the loss check against the first path, and each piece's share."""
    reference = runs[paths[0].name]
    gaps = [abs(runs[p.name][k]["loss_before_update"] - reference[k]["loss_before_update"])
            / abs(reference[k]["loss_before_update"]) for p in paths for k in workloads]
    speed = lambda path, kind: runs[path][kind]["tokens_per_s"]  # noqa: E731
    first = workloads[0]
    loss_check = {"same_loss": max(gaps) < 1e-2, "max_relative_loss_gap": round(max(gaps), 5)}
    if SEED not in paths:
        return {"memory_budget": {p.name: budget_row(runs[p.name][first], speed(paths[0].name, first)) for p in paths},
                **loss_check}
    seed, project = runs[SEED.name], runs[PROJECT.name]
    report = {
        "baseline_tokens_per_s": speed(SEED.name, first),
        "tokens_per_s": speed(PROJECT.name, first),
        "ratio": round(speed(PROJECT.name, first) / speed(SEED.name, first), 2),
        **({"ratio_uniform_4096": round(speed(PROJECT.name, "uniform_4096") / speed(SEED.name, "uniform_4096"), 2)}
           if "uniform_4096" in workloads else {}),
        "peak_gib": highest(project[k]["peak_gib"] for k in workloads),
        "baseline_peak_gib": highest(seed[k]["peak_gib"] for k in workloads),
        **loss_check,
    }
    ablations = [p for p in paths if p not in (SEED, PROJECT)]
    if ablations:  # what the piece is worth: the production path's speed over the path without it
        report["share"] = {p.name: round(speed(PROJECT.name, first) / speed(p.name, first), 3) for p in ablations}
    return report


def budget_row(result: dict[str, Any], recomputed_all_tokens_per_s: float) -> dict[str, Any]:
    """One budget's speed and measured peak beside what the plan estimated."""
    plan = result["memory_plan"]
    return {"budget_gib": plan and plan["budget_gib"], "kept_layers": plan and plan["kept_layers"],
            "recomputed_layers": result["recomputed_layers"], "estimated_peak_gib": plan and plan["estimated_peak_gib"],
            "peak_gib": result["peak_gib"], "tokens_per_s": result["tokens_per_s"],
            "speedup": round(result["tokens_per_s"] / recomputed_all_tokens_per_s, 3)}


def highest(peaks: Any) -> float | None:
    """The highest peak GiB, or None where memory was not measured (CPU)."""
    peaks = list(peaks)
    return None if None in peaks else max(peaks)


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} on {report['device']}, {report['date']}: {report['timed_optimizer_steps']} timed "
          f"optimizer steps per run; project = {report['measured_path']}")
    reference = next(iter(report["runs"]))
    print(f"{'workload':<16}{'path':<32}{'tokens/s':>10}{'peak GiB':>10}{'loss':>10}{'ratio':>9}  setup "
          f"(ratio: against {reference})")
    for name, by_workload in report["runs"].items():
        for kind, r in by_workload.items():
            ratio = r["tokens_per_s"] / report["runs"][reference][kind]["tokens_per_s"]
            s = r["setup"]
            setup = (f"{s['attention']}, {s['rows_per_optimizer_step']} rows of <= {s['row_tokens_at_most']}, "
                     f"LoRA {s['lora_dtype']}, liger {'on' if s['liger'] else 'off'}")
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"{kind:<16}{name:<32}{r['tokens_per_s']:>10.1f}{peak:>10}"
                  f"{r['loss_before_update']:>10.4f}{ratio:>9.2f}  {setup}")
    print(f"same loss before any update: {report['same_loss']} (max relative gap {report['max_relative_loss_gap']})")
    for name, share in report.get("share", {}).items():
        print(f"project / ({name}): {share:.3f}")
    for name, row in report.get("memory_budget", {}).items():
        print(f"{name}: {row['recomputed_layers']} layers recomputed, estimated peak {row['estimated_peak_gib']} GiB, "
              f"measured {row['peak_gib']} GiB, {row['speedup']:.3f}x")
    print(f"random base: {report['random_base']}; {report['wall_s']} s in all")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
