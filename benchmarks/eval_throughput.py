"""Evaluation decoding throughput: the seed's path against the project's, on the 32B architecture.

- Seed path: DeepSeek-R1-Distill-Qwen-32B's architecture in NF4 (double quantisation, bf16
  compute) with the LoRA adapter attached unmerged, HF `generate` with its dynamic KV cache,
  batch 64 (measured at 248 tokens/s on an H100 in DESIGN.md §5).
- Project path (`tracesft.inference.merge_for_inference` + `tracesft.generation.generate_options`,
  what `evaluation.fast_inference` runs): every NF4 weight dequantised to bf16 with the adapter's
  update added in float32 and rounded once, so the model is plain dense layers (64 GB, one 80 GB
  card); decoded eagerly, and with a static KV cache that transformers compiles (CUDA graphs).

Weights are random (speed does not depend on their values); the model is built on the meta
device and quantised layer by layer, as in ../shared/reference/qlora_32b_probe.py. The adapter's
B matrices are randomised too, so that merging it is not trivially exact. Prompts are fixed random
token ids and every sequence generates exactly `--new-tokens` tokens (`min_new_tokens`).

Correctness (`outputs_match`): both paths compute the same function. On fixed sequences under
teacher forcing their logits agree within relative error 2e-2 (‖a−b‖/‖a‖ over all positions), and
on a tiny model of the same architecture on the CPU (NF4 through bitsandbytes' CPU kernels) their
greedy generations are identical token for token. Both checks run in every mode.

    python benchmarks/eval_throughput.py                  # one H100: the 32B, ~5 minutes
    python benchmarks/eval_throughput.py --tiny           # anywhere: tiny model, CPU, seconds

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
from tracesft.generation import generate_options  # noqa: E402
from tracesft.inference import merge_for_inference  # noqa: E402

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

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype) * 0.02

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
                        randn(child.out_features, child.in_features), requires_grad=False,
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


def throughput(model: nn.Module, prompts: torch.Tensor, new_tokens: int, options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Generated tokens per second for one batch, after a warm-up on the same shapes (which is
    where a static cache is compiled)."""
    fixed = options | {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 0}
    mask = torch.ones_like(prompts)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(input_ids=prompts, attention_mask=mask, **fixed)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        output = model.generate(input_ids=prompts, attention_mask=mask, **fixed)
        synchronize(device)
        seconds = time.perf_counter() - start
    generated = (output.shape[1] - prompts.shape[1]) * prompts.shape[0]
    return {
        "batch": prompts.shape[0],
        "seconds": round(seconds, 2),
        "warmup_s": round(warmup_s, 1),
        "tokens_per_s": round(generated / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def greedy_outputs_match(recipe: TrainingRecipe, seed: int) -> bool:
    """On the tiny model, CPU: the seed path and the project path generate identical greedy tokens."""
    device = torch.device("cpu")
    config = qwen2_config(tiny=True, layers=2)
    model = build_seed_model(config, device, torch.float32, recipe, seed)
    prompts = torch.randint(3, config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(seed))
    settings = EvalSettings(max_new_tokens=32)
    options = generate_options(settings, device) | {"min_new_tokens": 32, "pad_token_id": 0}
    with torch.inference_mode():
        seed_tokens = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)
        merged = merge_for_inference(model)
        project_tokens = merged.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)
    return torch.equal(seed_tokens, project_tokens)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    recipe = TrainingRecipe()
    config = qwen2_config(args.tiny, args.layers)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt_tokens), generator=generator).to(device)
    check = torch.randint(3, config.vocab_size, (2, args.check_tokens), generator=generator).to(device)
    settings = EvalSettings(max_new_tokens=args.new_tokens)

    model = build_seed_model(config, device, dtype, recipe, args.seed)
    reference = teacher_forced_logits(model, check)
    rows = [{"path": "seed: NF4 + unmerged LoRA, dynamic cache",
             **throughput(model, prompts, args.new_tokens, generate_options(settings.model_copy(update={"fast_inference": False}), device), device)}]
    print(rows[-1], flush=True)

    model = merge_for_inference(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logits_error = relative_error(reference, teacher_forced_logits(model, check))
    print({"logits_relative_error": logits_error}, flush=True)

    candidates = [("project: merged dense, dynamic cache (eager)", settings.model_copy(update={"fast_inference": False}), [args.batch])]
    if device.type == "cuda":
        candidates.append(("project: merged dense, static cache, compiled", settings, args.project_batches))
    for name, candidate, sizes in candidates:
        for size in sizes:  # the first batch size that fits
            if time.perf_counter() - started > args.budget_s:
                rows.append({"path": name, "batch": size, "skipped": "time budget spent"})
                break
            batch = torch.randint(3, config.vocab_size, (size, args.prompt_tokens), generator=generator).to(device)
            try:
                rows.append({"path": name, **throughput(model, batch, args.new_tokens, generate_options(candidate, device), device)})
            except Exception as err:  # out of memory, or a failed compilation: record it, keep the other numbers
                rows.append({"path": name, "batch": size, "skipped": f"{type(err).__name__}: {str(err)[:300]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(rows[-1], flush=True)
            if "tokens_per_s" in rows[-1]:
                break
    del model
    greedy_match = greedy_outputs_match(recipe, args.seed)

    measured = [row for row in rows[1:] if "tokens_per_s" in row]
    best = max(measured, key=lambda row: row["tokens_per_s"]) if measured else {}
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny Qwen2 (random)" if args.tiny else f"Qwen2 32B architecture, {args.layers} layers (random)",
        "baseline_tokens_per_s": rows[0]["tokens_per_s"],
        "tokens_per_s": best.get("tokens_per_s"),
        "speedup": round(best["tokens_per_s"] / rows[0]["tokens_per_s"], 2) if best else None,
        "best_path": best.get("path"),
        "outputs_match": logits_error <= LOGITS_TOLERANCE and greedy_match,
        "logits_relative_error": logits_error,
        "tiny_cpu_greedy_identical": greedy_match,
        "peak_gib": best.get("peak_gib"),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['model']} on {result['device']}, prompt {result['prompt_tokens']}, {result['new_tokens']} new tokens")
    print(f"{'path':<50} {'batch':>5} {'tokens/s':>9} {'vs seed':>8} {'peak GiB':>9} {'warm-up s':>9}")
    for row in result["rows"]:
        if "tokens_per_s" not in row:
            print(f"{row['path']:<50} {row['batch']:>5}  {row['skipped']}")
            continue
        ratio = row["tokens_per_s"] / result["baseline_tokens_per_s"]
        print(f"{row['path']:<50} {row['batch']:>5} {row['tokens_per_s']:>9.1f} {ratio:>7.2f}x "
              f"{row['peak_gib'] if row['peak_gib'] is not None else '-':>9} {row['warmup_s']:>9}")
    print(f"logits relative error {result['logits_relative_error']:.2e} (tolerance {LOGITS_TOLERANCE}); "
          f"tiny CPU greedy identical: {result['tiny_cpu_greedy_identical']}; outputs_match: {result['outputs_match']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (debugging; no GPU needed)")
    parser.add_argument("--layers", type=int, default=64, help="decoder layers of the 32B architecture (64 is the real one)")
    parser.add_argument("--batch", type=int, default=None, help="seed-path batch (default 64; tiny 8)")
    parser.add_argument("--project-batches", type=int, nargs="+", default=[64, 48, 32],
                        help="static-cache batch sizes, tried in order until one fits (CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 512; tiny 32")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128; tiny 16")
    parser.add_argument("--check-tokens", type=int, default=256, help="sequence length of the logits check")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no new measurement after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.tiny else 64)
    args.prompt_tokens = args.prompt_tokens or (32 if args.tiny else 512)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    if args.tiny:
        args.check_tokens = min(args.check_tokens, 64)
    out = args.out or RESULTS / ("eval_throughput_tiny.json" if args.tiny else "eval_throughput.json")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
