"""Evaluation decoding throughput: the seed's path against the project's, on the 32B architecture.

- Seed path: DeepSeek-R1-Distill-Qwen-32B's architecture in NF4 (double quantisation, bf16
  compute) with the LoRA adapter attached unmerged through PEFT, HF `generate` with its dynamic
  KV cache, batch 64, prompt 512, 128 new tokens (248 tokens/s on an H100 in DESIGN.md §5).
- Project path (`tracesft.generate.inference.prepare_for_inference`, what `evaluation.fast_inference`
  runs): the same NF4 layers and the same unmerged adapter with PEFT's arithmetic, the PEFT
  wrapper gone, larger batches (the model stays 18 GB). Timed with transformers' dynamic KV cache
  (what evaluation runs) and with a static cache whose step transformers compiles into CUDA graphs.

Each run reports end-to-end generated tokens/s (prefill included, the seed probe's measure) and
the decoding phase alone (from the first new token to the last): prompt processing is compute-bound
and the same work on both paths (with 512-token prompts and 128 new tokens it caps any path near
2,600 tokens/s on an H100), whereas the evaluation itself (~300-token prompts, ~1,500 generated
tokens) is almost all decoding. `--eval-shape` adds a run of that shape on the project path.

Weights are random (speed does not depend on their values); the model is built on the meta
device and quantised layer by layer, as in ../shared/reference/qlora_32b_probe.py. The adapter's
matrices are random too. Prompts are fixed random token ids, and every sequence generates exactly
the requested number of tokens (`min_new_tokens`).

Correctness (`outputs_match`): both paths compute the same function. Under teacher forcing their
logits agree within relative error 2e-2 (‖a−b‖/‖a‖ over all positions), checked twice: on 2 × 64
tokens and on 2 × 256 (bitsandbytes picks its kernels by row count). The seed path against itself,
one sequence at a time instead of two, is printed beside it: what kernel choice alone moves. And
on a tiny model of the same architecture on the CPU their greedy generations are
identical token for token.

    python benchmarks/eval_throughput.py --eval-shape    # one H100: the 32B, ~8 minutes
    python benchmarks/eval_throughput.py --tiny          # anywhere: tiny model, CPU, seconds

Writes `--out` (default benchmarks/results/eval_throughput.json; `--tiny`:
eval_throughput_tiny.json) with `device`, `date`, `baseline_tokens_per_s`, `tokens_per_s`,
`outputs_match`, `peak_gib` and the detail of every measurement, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracesft.config import EvalSettings, TrainingRecipe  # noqa: E402
from tracesft.generate.batching import generate_options  # noqa: E402
from tracesft.generate.inference import prepare_for_inference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOGITS_TOLERANCE = 2e-2


def qwen2_config(tiny: bool, layers: int) -> Any:
    from transformers import Qwen2Config

    if tiny:
        sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    else:  # DeepSeek-R1-Distill-Qwen-32B
        sizes = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=layers, num_attention_heads=40,
                     num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072)
    config = Qwen2Config(**sizes, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return config


def build_seed_model(config: Any, device: torch.device, dtype: torch.dtype, recipe: TrainingRecipe, seed: int) -> nn.Module:
    """The architecture on the meta device, each linear layer quantised to NF4 as it is materialised,
    then the recipe's LoRA with random B (a trained adapter is not zero)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype) * std

    # Residual-branch outputs scaled by 1/sqrt(2 x layers), as GPT-2 and Megatron initialise them:
    # with 0.02 everywhere a random 64-layer stack is chaotic, and bf16 rounding differences between
    # any two kernels grow to ~10% of the logits (the seed path against itself, too).
    residual_std = 0.02 / (2 * config.num_hidden_layers) ** 0.5

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    quantized = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=dtype,
                        compress_statistics=recipe.use_double_quant, quant_type=recipe.bnb_4bit_quant_type, device="meta",
                    )
                    quantized.weight = bnb.nn.Params4bit(
                        randn(child.out_features, child.in_features, std=residual_std if name in ("o_proj", "down_proj") else 0.02),
                        requires_grad=False,
                        compress_statistics=recipe.use_double_quant, quant_type=recipe.bnb_4bit_quant_type,
                    ).to(device)
                    if child.bias is not None:
                        quantized.bias = nn.Parameter(randn(child.out_features), requires_grad=False)
                    setattr(parent, name, quantized)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.is_meta:
                value = torch.ones(parameter.shape, device=device, dtype=dtype) if "norm" in type(module).__name__.lower() else randn(*parameter.shape)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    with torch.device(device):  # its buffers are computed, not loaded; the signature varies across versions
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(False)
                parameter.copy_(torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32).to(parameter.dtype) * 0.02)
    return model.eval()


def teacher_forced_logits(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=sequences).logits.float().cpu()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).norm() / reference.norm())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FirstTokenClock:
    """A `generate` streamer that notes when the first new token exists: prompt processing ends there.

    `generate` hands it the prompt, then each new token; only the first new token is timed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls, self.at = device, 0, None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            synchronize(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def throughput(model: nn.Module, prompts: torch.Tensor, new_tokens: int, options: dict[str, Any],
               device: torch.device, warmup_tokens: int | None = None) -> dict[str, Any]:
    """Generated tokens per second for one batch, end to end and for the decoding phase, after a
    warm-up (where a static cache's step is compiled: same shapes, so `warmup_tokens` only for
    dynamic caches)."""
    fixed = options | {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 0}
    warmup = fixed if warmup_tokens is None else fixed | {"max_new_tokens": warmup_tokens, "min_new_tokens": warmup_tokens}
    mask = torch.ones_like(prompts)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(input_ids=prompts, attention_mask=mask, **warmup)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        clock = FirstTokenClock(device)
        start = time.perf_counter()
        output = model.generate(input_ids=prompts, attention_mask=mask, streamer=clock, **fixed)
        synchronize(device)
        end = time.perf_counter()
    batch, steps = prompts.shape[0], output.shape[1] - prompts.shape[1]
    return {
        "batch": batch,
        "prompt_tokens": prompts.shape[1],
        "new_tokens": steps,
        "seconds": round(end - start, 2),
        "prefill_s": round(clock.at - start, 2),
        "warmup_s": round(warmup_s, 1),
        "tokens_per_s": round(batch * steps / (end - start), 1),
        "decode_tokens_per_s": round(batch * (steps - 1) / (end - clock.at), 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def greedy_outputs_match(recipe: TrainingRecipe, seed: int) -> bool:
    """On the tiny model, CPU: the seed path and the project path generate identical greedy tokens."""
    device = torch.device("cpu")
    config = qwen2_config(tiny=True, layers=2)
    model = build_seed_model(config, device, torch.float32, recipe, seed)
    prompts = torch.randint(3, config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(seed))
    options = generate_options(EvalSettings(max_new_tokens=32), device) | {"min_new_tokens": 32, "pad_token_id": 0}
    with torch.inference_mode():
        seed_tokens = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)
        project_tokens = prepare_for_inference(model).generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)
    return torch.equal(seed_tokens, project_tokens)


def first_that_fits(name: str, sizes: list[int], measure: Any, rows: list[dict[str, Any]]) -> int | None:
    """Measure at each batch size in turn until one fits in memory; return it."""
    for size in sizes:
        try:
            rows.append({"path": name, **measure(size)})
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"path": name, "batch": size, "skipped": f"out of memory: {str(err)[:200]}"})
            torch.cuda.empty_cache()
        except Exception as err:  # a failed compilation: record it, keep the other numbers
            rows.append({"path": name, "batch": size, "skipped": f"{type(err).__name__}: {str(err)[:300]}"})
            print(rows[-1], flush=True)
            return None
        print(rows[-1], flush=True)
        if "tokens_per_s" in rows[-1]:
            return size
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    recipe = TrainingRecipe()
    config = qwen2_config(args.tiny, args.layers)
    generator = torch.Generator().manual_seed(args.seed)

    def prompts(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, config.vocab_size, (batch, length), generator=generator).to(device)

    checks = {"decode-sized (2 x 64)": prompts(2, 64), f"prompt-sized (2 x {args.check_tokens})": prompts(2, args.check_tokens)}
    eager = EvalSettings(max_new_tokens=args.new_tokens)

    model = build_seed_model(config, device, dtype, recipe, args.seed)
    references = {name: teacher_forced_logits(model, sequences) for name, sequences in checks.items()}
    # What kernel-level differences alone do: the seed path against itself, each sequence alone
    # (bitsandbytes picks its kernels by the number of rows).
    noise_floor = {name: relative_error(references[name], torch.cat([teacher_forced_logits(model, row[None]) for row in sequences]))
                   for name, sequences in checks.items()}
    print({"seed_vs_itself_one_sequence_at_a_time": noise_floor}, flush=True)
    if args.logits_only:
        prepared = prepare_for_inference(model)
        errors = {name: relative_error(references[name], teacher_forced_logits(prepared, sequences)) for name, sequences in checks.items()}
        return {"logits_relative_error": errors, "seed_vs_itself": noise_floor}
    rows = [{"path": "seed: NF4 + unmerged LoRA (PEFT, bitsandbytes), dynamic cache",
             **throughput(model, prompts(args.batch, args.prompt_tokens), args.new_tokens,
                          generate_options(eager, device), device, warmup_tokens=4)}]
    print(rows[-1], flush=True)

    model = prepare_for_inference(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logits_errors = {name: relative_error(references[name], teacher_forced_logits(model, sequences))
                     for name, sequences in checks.items()}
    print({"logits_relative_error": logits_errors}, flush=True)

    compiled = "project: NF4 + unmerged LoRA without PEFT, static cache, compiled"
    eager_name = "project: NF4 + unmerged LoRA without PEFT, dynamic cache (eager)"
    project_options = generate_options(eager, device) | {"cache_implementation": "static"}  # transformers compiles it
    size = first_that_fits(
        compiled if device.type == "cuda" else eager_name, args.project_batches,
        lambda size: throughput(model, prompts(size, args.prompt_tokens), args.new_tokens, project_options, device),
        rows,
    )
    if device.type == "cuda" and size is not None:
        # What removing PEFT's wrappers alone gives, without the compiled step.
        if time.perf_counter() - started < args.budget_s:
            first_that_fits(
                eager_name, [size],
                lambda size: throughput(model, prompts(size, args.prompt_tokens), args.new_tokens,
                                        generate_options(eager, device), device, warmup_tokens=4),
                rows,
            )
        if args.eval_shape and time.perf_counter() - started < args.budget_s:
            first_that_fits(
                "project, evaluation's shape: static cache, compiled", [size],
                lambda size: throughput(model, prompts(size, args.eval_prompt_tokens), args.eval_new_tokens,
                                        project_options, device),
                rows,
            )
    del model
    greedy_match = greedy_outputs_match(recipe, args.seed)

    same_shape = [row for row in rows[1:] if "tokens_per_s" in row and row["new_tokens"] == args.new_tokens]
    best = max(same_shape, key=lambda row: row["tokens_per_s"]) if same_shape else {}
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny Qwen2 (random)" if args.tiny else f"Qwen2 32B architecture, {args.layers} layers (random)",
        "baseline_tokens_per_s": rows[0]["tokens_per_s"],
        "tokens_per_s": best.get("tokens_per_s"),
        "speedup": round(best["tokens_per_s"] / rows[0]["tokens_per_s"], 2) if best else None,
        "baseline_decode_tokens_per_s": rows[0]["decode_tokens_per_s"],
        "decode_tokens_per_s": best.get("decode_tokens_per_s"),
        "best_path": best.get("path"),
        "outputs_match": all(error <= LOGITS_TOLERANCE for error in logits_errors.values()) and greedy_match,
        "logits_relative_error": logits_errors,
        "seed_vs_itself_relative_error": noise_floor,
        "tiny_cpu_greedy_identical": greedy_match,
        "peak_gib": best.get("peak_gib"),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['model']} on {result['device']}")
    print(f"{'path':<62} {'batch':>5} {'prompt':>6} {'new':>5} {'tokens/s':>9} {'vs seed':>8} {'decode tok/s':>12} "
          f"{'prefill s':>9} {'peak GiB':>8} {'warm-up s':>9}")
    for row in result["rows"]:
        if "tokens_per_s" not in row:
            print(f"{row['path']:<62} {row['batch']:>5}  {row['skipped']}")
            continue
        ratio = row["tokens_per_s"] / result["baseline_tokens_per_s"]
        print(f"{row['path']:<62} {row['batch']:>5} {row['prompt_tokens']:>6} {row['new_tokens']:>5} {row['tokens_per_s']:>9.1f} "
              f"{ratio:>7.2f}x {row['decode_tokens_per_s']:>12.1f} {row['prefill_s']:>9} "
              f"{row['peak_gib'] if row['peak_gib'] is not None else '-':>8} {row['warmup_s']:>9}")
    errors = ", ".join(f"{name} {error:.2e}" for name, error in result["logits_relative_error"].items())
    floor = ", ".join(f"{name} {error:.2e}" for name, error in result["seed_vs_itself_relative_error"].items())
    print(f"seed path against itself, one sequence at a time: {floor}")
    print(f"logits relative error: {errors} (tolerance {LOGITS_TOLERANCE}); "
          f"tiny CPU greedy identical: {result['tiny_cpu_greedy_identical']}; outputs_match: {result['outputs_match']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (debugging; no GPU needed)")
    parser.add_argument("--layers", type=int, default=64, help="decoder layers of the 32B architecture (64 is the real one)")
    parser.add_argument("--batch", type=int, default=None, help="seed-path batch (default 64; tiny 8)")
    parser.add_argument("--project-batches", type=int, nargs="+", default=[128, 96, 64],
                        help="project-path batch sizes, tried in order until one fits")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 512; tiny 32")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128; tiny 16")
    parser.add_argument("--check-tokens", type=int, default=256, help="sequence length of the prompt-sized logits check")
    parser.add_argument("--eval-shape", action="store_true", help="also time the evaluation's shape on the project path (CUDA)")
    parser.add_argument("--eval-prompt-tokens", type=int, default=256)
    parser.add_argument("--eval-new-tokens", type=int, default=1024)
    parser.add_argument("--budget-s", type=float, default=360.0, help="start the optional runs (eager, evaluation shape) only before this many seconds")
    parser.add_argument("--logits-only", action="store_true", help="only the teacher-forced logits checks, printed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.tiny else 64)
    if args.tiny:
        args.project_batches = [8]
    args.prompt_tokens = args.prompt_tokens or (32 if args.tiny else 512)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    if args.tiny:
        args.check_tokens = min(args.check_tokens, 64)
    out = args.out or RESULTS / ("eval_throughput_tiny.json" if args.tiny else "eval_throughput.json")
    result = run(args)
    if args.logits_only:
        print(json.dumps(result, indent=2))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
