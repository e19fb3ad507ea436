"""Evaluation throughput on the evaluation workload: the seed's decoding against the shipped engine.

Workload ("evaluation"): the 1,162 problems of the official Corr2Cause test split, rendered by the
project's prompt builder (`build_prompt`, the R1 chat format of the tiny tokenizer), prompt
lengths counted as characters / 4 (about what a Qwen2 tokenizer gives for English; the tiny
tokenizer's small vocabulary would double them). Answer lengths are drawn from a log-normal with
median 700 tokens and sigma 0.6, clipped to [64, 2048], seed 0, and enforced per request: random
weights never stop by themselves.

- Seed path: DeepSeek-R1-Distill-Qwen-32B's architecture in NF4 (double quantisation, bf16
  compute), LoRA unmerged through PEFT, HF `generate` in static batches of 64 sorted by prompt
  length, each batch running to its longest answer. The whole split would take hours, so one
  representative batch (the median batch by prompt length) is timed for its prefill and
  `--seed-steps` decoding steps, and the split is projected from those: sum over batches of
  prefill + longest answer x step time. Decoding steps get slower as the context grows, so this
  projection flatters the seed.
- Project path: what `evaluation.evaluate` runs, timed whole: `inference.for_decoding` (PEFT's
  wrappers removed, NF4 dequantised once where memory allows, LoRA unmerged), then
  `batching.generate_all` with `batching.engine_decoder` (continuous batching, CUDA graphs).
  `--nf4` keeps the NF4 layers and caps memory at 80 GB: the figure for 80 GB cards.

Exactness (`outputs_match`): on the 32B, 128 sequences of `--check-tokens` tokens, prefilled
together and then one decoding step for all 128 rows with the KV cache, as the seed decodes them
(PEFT + NF4, HF forward), against the engine's prefill and decoding step (pooled cache, CUDA
graph) on the same sequences. The seed runs twice: with SDPA's default kernel (cuDNN on Hopper)
and with the flash kernel the engine uses; `outputs_match` compares on the same kernel, the
default-kernel figures are printed beside the seed against itself (four sequences alone: what
batch composition alone moves). On the tiny model (CPU) greedy outputs of the engine equal HF
`generate` one prompt at a time (tests/test_engine.py).

    python benchmarks/eval_throughput.py --test-csv PATH/test.csv            # one H200, ~8 min
    python benchmarks/eval_throughput.py --test-csv PATH/test.csv --nf4 --requests 300 --out ...
    python benchmarks/eval_throughput.py --test-csv PATH/test.csv --tiny     # CPU, seconds

Writes `--out` (default benchmarks/results/eval_throughput.json; `--tiny`:
eval_throughput_tiny.json) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_32b import build_seed_model, library_versions, qwen2_config  # noqa: E402

from tracesft.config import EvalSettings, TrainingRecipe  # noqa: E402
from tracesft.data.prompting import build_prompt  # noqa: E402
from tracesft.data.sample_data import tokenizer_corpus  # noqa: E402
from tracesft.generate.batching import engine_decoder, generate_all, generate_options  # noqa: E402
from tracesft.generate.engine import Engine  # noqa: E402
from tracesft.generate.inference import for_decoding, prepare_for_inference  # noqa: E402
from tracesft.train.modeling import load_tokenizer  # noqa: E402
from tracesft.train.tiny_model import build_tiny_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOGITS_TOLERANCE = 2e-2
SEED_BATCH = 64


def evaluation_workload(test_csv: Path, requests: int | None, seed: int = 0) -> tuple[list[int], list[int]]:
    """(prompt lengths, answer lengths) of the evaluation workload, in the split's order."""
    tokenizer = load_tokenizer(str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", tokenizer_corpus())))
    with test_csv.open(newline="", encoding="utf-8") as handle:
        queries = [row["input"] for row in csv.DictReader(handle)]
    prompt_lengths = [len(build_prompt(tokenizer, query)) // 4 for query in queries]
    rng = np.random.default_rng(seed)
    answers = np.clip(np.round(rng.lognormal(math.log(700), 0.6, len(queries))), 64, 2048).astype(int).tolist()
    if requests is not None:
        prompt_lengths, answers = prompt_lengths[:requests], answers[:requests]
    return prompt_lengths, answers


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seed_projection(model: nn.Module, prompts: list[list[int]], answers: list[int], steps: int, device: torch.device) -> dict[str, Any]:
    """Time the seed's median batch (prefill, then `steps` decoding steps) and project the split."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + SEED_BATCH] for i in range(0, len(order), SEED_BATCH)]
    sample = batches[len(batches) // 2]
    width = max(len(prompts[i]) for i in sample)
    ids = torch.tensor([[0] * (width - len(prompts[i])) + prompts[i] for i in sample], device=device)
    mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in sample], device=device)
    options = generate_options(EvalSettings()) | {"pad_token_id": 0}

    def timed(new_tokens: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        synchronize(device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    # The best of two for each: on a shared CPU one slow prefill made the step time negative.
    prefill_s = min(timed(1) for _ in range(2))
    step_s = (min(timed(steps + 1) for _ in range(2)) - prefill_s) / steps
    per_token_prefill = prefill_s / sum(len(prompts[i]) for i in sample)
    total_s = sum(per_token_prefill * sum(len(prompts[i]) for i in b) + max(answers[i] for i in b) * step_s for b in batches)
    return {"batch": SEED_BATCH, "timed_batch_prompt_tokens": width, "prefill_s": round(prefill_s, 2),
            "step_ms": round(step_s * 1000, 1), "timed_steps": steps, "projected_split_s": round(total_s, 1),
            "tokens_per_s": round(sum(answers) / total_s, 1), "projected": True}


class _NoText:
    """The benchmark needs token counts, not text: a tokenizer that decodes to nothing, never stops."""

    eos_token_id = None

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def engine_run(model: nn.Module, prompts: list[list[int]], answers: list[int], settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """The shipped generation path, timed end to end on the whole workload."""
    model.generation_config.eos_token_id = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    engines: list[dict[str, Any]] = []
    _, concurrency = generate_all(prompts, engine_decoder(model, _NoText(), settings, engines.append), settings.batch_size, answers)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"requests": len(prompts), "generated_tokens": sum(answers), "seconds": round(seconds, 1),
            "tokens_per_s": round(sum(answers) / seconds, 1), "concurrency": concurrency,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "engine_stats": engines}


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.float() - other.float()).norm() / reference.float().norm())


def exactness(seed_model: nn.Module, config: Any, rows: int, tokens: int, device: torch.device, seed: int) -> dict[str, Any]:
    """The seed path's logits as it decodes: `rows` sequences of `tokens` tokens prefilled
    together, then one decoding step for all rows with the KV cache (the products at `rows` rows,
    as in its batches); with SDPA's default kernel and with the flash kernel the engine uses.
    Beside them, four of the sequences alone (what batch composition alone moves)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(seed)
    sequences = torch.randint(3, config.vocab_size, (rows, tokens + 1), generator=generator).to(device)

    def decode_like_seed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            prefill = seed_model(input_ids=batch[:, :-1], use_cache=True, logits_to_keep=1)
            step = seed_model(input_ids=batch[:, -1:], past_key_values=prefill.past_key_values, logits_to_keep=1)
        return prefill.logits[:, -1], step.logits[:, -1]

    result = {"sequences": sequences}
    result["prefill"], result["decode"] = decode_like_seed(sequences)
    result["seed_vs_itself"] = relative_error(result["decode"][:4], torch.cat([decode_like_seed(row[None])[1] for row in sequences[:4]]))
    if device.type == "cuda":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            result["flash_prefill"], result["flash_decode"] = decode_like_seed(sequences)
    return result


def engine_logits(model: nn.Module, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's logits for the same sequences: prefill of all but the last token, then one
    decoding step of all rows at once (the shipped step: pooled cache, CUDA graph on a GPU)."""
    from tracesft.generate.engine import _Request

    rows, length = sequences.shape
    engine = Engine(model, rows, length)
    runs = [engine.cache.allocate(engine.row_blocks) for _ in range(rows)]
    with torch.inference_mode():
        prefill = engine._prefill_logits([row[:-1].tolist() for row in sequences], runs)
        engine._active = [_Request(i, length - 1, [int(sequences[i, -1])], 2, i, runs[i], engine.row_blocks) for i in range(rows)]
        engine._set_step_inputs()
        decode = engine._decode(rows).clone()
    return prefill, decode


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cuda" and args.nf4:
        torch.cuda.set_per_process_memory_fraction(80 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    recipe = TrainingRecipe()
    config = qwen2_config(args.tiny, args.layers)
    prompt_lengths, answers = evaluation_workload(args.test_csv, args.requests)
    prompts = random_prompts(prompt_lengths, config.vocab_size, args.seed)

    model = build_seed_model(config, device, dtype, recipe, args.seed)
    check = exactness(model, config, args.check_rows, args.check_tokens, device, args.seed)
    print({"seed_vs_itself": check["seed_vs_itself"]}, flush=True)
    seed = seed_projection(model, prompts, answers, args.seed_steps, device) if not args.skip_seed else None
    print({"seed": seed}, flush=True)

    settings = EvalSettings(batch_size=args.concurrency, max_new_tokens=max(answers))
    model = prepare_for_inference(model) if args.nf4 else for_decoding(model, settings)
    weights = "nf4" if any(type(m).__name__ == "Linear4bit" for m in model.modules()) else "bf16 (dequantised once)"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    prefill, decode = engine_logits(model, check.pop("sequences"))
    errors = {"prefill": relative_error(check["prefill"], prefill),
              f"decode ({args.check_rows} rows)": relative_error(check["decode"], decode)}
    if "flash_prefill" in check:  # the comparison that isolates the engine: both on the flash kernel
        errors |= {"prefill, seed on flash attention": relative_error(check["flash_prefill"], prefill),
                   f"decode ({args.check_rows} rows), seed on flash attention": relative_error(check["flash_decode"], decode)}
    same_kernel = [e for name, e in errors.items() if "flash" in name] or list(errors.values())
    print({"logits_relative_error": errors, "weights": weights}, flush=True)
    project = engine_run(model, prompts, answers, settings, device)
    print({"project": project}, flush=True)

    baseline = seed["tokens_per_s"] if seed else None
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": "evaluation",
        "model": "tiny Qwen2 (random)" if args.tiny else f"Qwen2 32B architecture, {args.layers} layers (random)",
        "measured_path": "tracesft.generate.batching.generate_all + engine_decoder (after tracesft.generate.inference.for_decoding)",
        "weights": weights,
        "memory_cap_gib": 80 if args.nf4 else None,
        "requests": len(prompts),
        "prompt_tokens_counted_as": "characters / 4 of build_prompt's text",
        "tokens_per_s": project["tokens_per_s"],
        "baseline_tokens_per_s": baseline,
        "speedup": round(project["tokens_per_s"] / baseline, 2) if baseline else None,
        "split_minutes": round(project["seconds"] * 1162 / len(prompts) / 60, 1),
        "baseline_split_minutes": round(seed["projected_split_s"] * 1162 / len(prompts) / 60, 1) if seed else None,
        "outputs_match": all(error <= LOGITS_TOLERANCE for error in same_kernel),
        "outputs_match_means": "logits within the tolerance of the seed path's on the same attention kernel (flash on a GPU)",
        "logits_relative_error": errors,
        "seed_vs_itself_relative_error": check["seed_vs_itself"],
        "peak_gib": project["peak_gib"],
        "seed": seed,
        "project": project,
        "versions": library_versions(),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['model']} on {result['device']}, workload {result['workload']} ({result['requests']} requests)")
    print(f"{'path':<58} {'tokens/s':>9} {'vs seed':>8} {'split min':>9} {'peak GiB':>8}")
    if result["seed"]:
        print(f"{'seed: PEFT + NF4, HF generate, static batches of 64 (projected)':<58} {result['baseline_tokens_per_s']:>9.1f} "
              f"{'1.00x':>8} {result['baseline_split_minutes']:>9} {'-':>8}")
    speedup = f"{result['speedup']:.2f}x" if result["speedup"] else "-"
    print(f"{'engine: ' + result['weights'] + ', continuous batching':<58} {result['tokens_per_s']:>9.1f} {speedup:>8} "
          f"{result['split_minutes']:>9} {result['peak_gib'] or '-':>8}")
    for stats in result["project"]["engine_stats"]:
        print(f"engine run {stats['run_s']} s: prefill {stats['prefill_s']} s ({stats['prefill_tokens']} tokens), "
              f"decode {stats['decode_s']} s in {stats['steps']} steps (mean {stats['mean_busy_rows']} busy rows), "
              f"tail {stats['tail_s']} s in {stats['tail_steps']} steps, scheduling {stats['scheduling_s']} s; "
              f"ms per step by rows {stats['step_ms_by_rows']}")
    errors = ", ".join(f"{name} {error:.2e}" for name, error in result["logits_relative_error"].items())
    print(f"logits relative error vs seed path: {errors} (tolerance {LOGITS_TOLERANCE}); seed against itself "
          f"{result['seed_vs_itself_relative_error']:.2e}; outputs_match: {result['outputs_match']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-csv", type=Path, required=True, help="the official Corr2Cause test split (input,label,...)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (debugging; no GPU needed)")
    parser.add_argument("--layers", type=int, default=64, help="decoder layers of the 32B architecture (64 is the real one)")
    parser.add_argument("--requests", type=int, default=None, help="first N problems only (default: all 1,162; tiny: 24)")
    parser.add_argument("--concurrency", type=int, default=EvalSettings().batch_size, help="evaluation.batch_size: most slots")
    parser.add_argument("--nf4", action="store_true", help="keep NF4 layers, cap memory at 80 GB (the 80 GB card figure)")
    parser.add_argument("--seed-steps", type=int, default=64, help="decoding steps timed on the seed's batch")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--check-rows", type=int, default=128)
    parser.add_argument("--check-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tracesft").setLevel(logging.INFO)
    if args.tiny:
        args.requests = args.requests or 24
        args.check_rows, args.check_tokens, args.seed_steps = 8, 32, 32
    out = args.out or RESULTS / ("eval_throughput_tiny.json" if args.tiny else "eval_throughput.json")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
