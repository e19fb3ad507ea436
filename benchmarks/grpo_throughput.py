"""GRPO step throughput on the 32B architecture: the generation phase and the update phase, apart.

Times the shipped GRPO function's trainer (`tracesft.rl.grpo.prepare_grpo`, what the
`train_grpo_adapter` step trains with) on DeepSeek-R1-Distill-Qwen-32B's architecture with random
NF4 weights (`random_32b`, written once into the recipe's 4-bit cache beside a base directory
holding its config.json and the tiny model's tokenizer, as `train_throughput.py` does), with a
random parent LoRA adapter of the seed recipe's shape (r 16 on all projections, B non-zero), for
each generation backend:

- engine: the project's continuous-batching engine as TRL's `rollout_func` (`tracesft.rl.rollout`);
- trl: TRL's transformers backend (HF `generate` on the PEFT model, static batches).

A step generates `--prompts` problems x `--generations` answers of `--completion-length` tokens
(random weights rarely stop early, so nearly every answer is that long), scores them with the
solver-verified reward (all zero on random weights: the update still runs the full forward and
backward, only its gradient is zero) and takes one optimizer step. One step is a warm-up
(allocations, paged optimizer state, the engine's CUDA graph), the next `--steps` are timed.
Reported per backend: generation tokens/s (completion tokens over the time in TRL's
`_generate`, which both backends go through: TRL 1.16's private method, wrapped to time it),
update tokens/s (prompt + completion tokens over the rest of the step: reward, log-probabilities,
backward, optimizer), the step's seconds, and peak GiB. A backend that fails is recorded with its
error and the other still runs.

    python benchmarks/grpo_throughput.py          # one H200, ~5 min: results/grpo_throughput.json
    python benchmarks/grpo_throughput.py --tiny   # CPU plumbing check, tiny Qwen2: *_tiny.json (git-ignored)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_32b import add_model_arguments, library_versions, qwen2_config, runs_tiny  # noqa: E402
from train_throughput import benchmark_tokenizer, synchronize, write_random_base  # noqa: E402

from tracesft.config import Device, GrpoSettings, ProblemSettings, RewardSettings, TrainingRecipe  # noqa: E402
from tracesft.rl.grpo import prepare_grpo  # noqa: E402
from tracesft.rl.problems import fresh_problems  # noqa: E402
from tracesft.train.adapter import LoraAdapter, write_metadata  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED_PATH = "tracesft.rl.grpo.prepare_grpo"
BACKENDS = ("engine", "trl")


class PhaseTimer(TrainerCallback):
    """Optimizer step 1 a warm-up; steps 2 to 1 + `steps` timed, split into generation and the rest."""

    def __init__(self, trainer: Any, steps: int) -> None:
        self.steps = steps
        self.generation_s = 0.0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.step_s = 0.0
        self._timing = False
        self._step_start = 0.0
        generate = trainer._generate

        def timed_generate(prompts: list) -> Any:
            synchronize()
            start = time.perf_counter()
            output = generate(prompts)
            synchronize()
            if self._timing:
                prompt_ids, completion_ids = output[0], output[1]
                self.generation_s += time.perf_counter() - start
                self.completion_tokens += sum(len(ids) for ids in completion_ids)
                self.prompt_tokens += sum(len(ids) for ids in prompt_ids)
            return output

        trainer._generate = timed_generate

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._timing = True
        synchronize()
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        if self._timing:
            self.step_s += time.perf_counter() - self._step_start
        if state.global_step == 1 + self.steps:
            control.should_training_stop = True

    def result(self) -> dict[str, Any]:
        update_s = self.step_s - self.generation_s
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        return {
            "generation_tokens_per_s": round(self.completion_tokens / self.generation_s, 1),
            "update_tokens_per_s": round((self.prompt_tokens + self.completion_tokens) / update_s, 1),
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "generation_s": round(self.generation_s, 2),
            "update_s": round(update_s, 2),
            "step_s": round(self.step_s / self.steps, 2),
            "peak_gib": peak,
        }


def random_parent(directory: Path, config: Any, tokenizer: Any, base_model: str, recipe: TrainingRecipe) -> LoraAdapter:
    """A LoRA adapter of the recipe's shape for `config`, A and B random, as a registered adapter's files.

    The shapes come from PEFT wrapping the architecture on the meta device, so nothing of the 32B
    is materialised; the weights are written as PEFT saves them (adapter name left out).
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.target_modules, bias="none", task_type="CAUSAL_LM")
    with torch.device("meta"):
        shapes = {name.replace(".default.", "."): tuple(p.shape)
                  for name, p in get_peft_model(Qwen2ForCausalLM(config), lora).named_parameters() if "lora_" in name}
    generator = torch.Generator().manual_seed(1)
    weights = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    directory.mkdir(parents=True)
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora.base_model_name_or_path = base_model
    lora.save_pretrained(str(directory))
    tokenizer.save_pretrained(directory)
    return write_metadata(directory, {"kind": "lora", "base_model": base_model, "recipe": recipe.model_dump()})


def measure(backend: str, parent: LoraAdapter, base_model: str, settings: GrpoSettings, steps: int, device: Device,
            workdir: Path) -> dict[str, Any]:
    """One warm-up and `steps` timed GRPO steps with `backend` generating; what `PhaseTimer` saw."""
    settings = settings.model_copy(update={"generation": backend, "max_steps": 1 + steps + 1})
    per_step = settings.per_device_train_batch_size * settings.gradient_accumulation_steps // settings.num_generations
    problems = fresh_problems(ProblemSettings(count=per_step * (2 + steps), seed=7), [])
    output_dir = Path(tempfile.mkdtemp(prefix=f"grpo-{backend}-", dir=workdir))
    trainer = timer = None
    try:
        trainer, generation, _ = prepare_grpo(parent, problems, base_model, None, settings, RewardSettings(), device,
                                              output_dir)
        if generation != backend:
            raise RuntimeError(f"asked for {backend}, the trainer generates with {generation}")
        timer = PhaseTimer(trainer, steps)
        trainer.add_callback(timer)
        trainer.train()
        optimizer = getattr(trainer.args.optim, "value", trainer.args.optim)
        return timer.result() | {"optimizer": optimizer, "trainable_parameters":
                                 sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    except Exception as err:  # noqa: BLE001  (the other backend still runs; the error is the result)
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        # The timer's wrapper holds the trainer, the trainer the model: both go before the next
        # backend loads its own base, or its peak would count this one's weights too.
        trainer = timer = None
        shutil.rmtree(output_dir, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(backends: tuple[str, ...], steps: int, tiny: bool, layers: int = 64, prompts: int = 4, generations: int = 8,
        completion_length: int = 128, workdir: Path | None = None) -> dict[str, Any]:
    device: Device = "cpu" if tiny else "cuda"
    started = time.perf_counter()
    card = torch.cuda.get_device_name() if not tiny else "cpu (tiny Qwen2)"
    scratch = Path(tempfile.mkdtemp(prefix="grpo-bench-", dir=workdir))
    # Completions per forward: one group; accumulation over the step's groups.
    settings = GrpoSettings(num_generations=generations, per_device_train_batch_size=generations,
                            gradient_accumulation_steps=prompts, max_completion_length=completion_length,
                            learning_rate=1e-6, temperature=1.0, top_p=1.0)
    try:
        recipe = TrainingRecipe(quantized_base_cache=str(scratch / "quantized-base"),
                                **({"gradient_checkpointing": False} if tiny else {}))
        tokenizer = benchmark_tokenizer(scratch)
        config = qwen2_config(tiny, layers)
        base_model, base = write_random_base(scratch, config, tokenizer, recipe, device)
        parent = random_parent(scratch / "parent", config, tokenizer, base_model, recipe)
        print(f"{card}: random base written {base}", flush=True)
        runs = {}
        for backend in backends:
            runs[backend] = measure(backend, parent, base_model, settings, steps, device, scratch)
            print(backend, runs[backend], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "device": card,
        "date": datetime.date.today().isoformat(),
        "model": "tiny Qwen2 (random)" if tiny else f"Qwen2 32B architecture, {layers} layers (random NF4)",
        "measured_path": MEASURED_PATH,
        "step": {"prompts": prompts, "generations_per_prompt": generations, "completion_tokens_at_most": completion_length},
        "grpo": settings.model_dump(exclude={"generation", "max_steps"}),
        "recipe": recipe.model_dump(exclude={"quantized_base_cache"}),
        "timed_steps": steps,
        "random_base": base,
        "versions": library_versions(),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU plumbing check with a tiny Qwen2")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: engine, trl")
    parser.add_argument("--steps", type=int, default=1, help="timed GRPO steps per backend (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=4, help="problems per step")
    parser.add_argument("--generations", type=int, default=8, help="answers per problem")
    parser.add_argument("--completion-length", type=int, default=128, help="tokens per answer at most")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    tiny = runs_tiny(args.tiny)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"--backends: unknown {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    completion_length = min(args.completion_length, 32) if tiny else args.completion_length
    report = run(backends, args.steps, tiny, args.layers, args.prompts, args.generations, completion_length, args.workdir)
    out = args.out or RESULTS / f"grpo_throughput{'_tiny' if tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["runs"], indent=2))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in report["runs"].values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's one-line notice
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
