"""QLoRA training throughput: the seed's path against the project's, on the 32B architecture, one GPU.

Both paths train the same LoRA (r 16, alpha 32, dropout 0.05, all seven projections) on the same
4-bit NF4 base (double quantisation, bf16 compute) with gradient checkpointing and paged 8-bit
AdamW, and take an optimizer step every 8 examples (the seed's batch 1 x accumulation 8):

- seed: HF + PEFT + bitsandbytes as the seed runs them: one example per forward, no packing,
  SDPA attention, LoRA weights in fp32 under bf16 autocast (what the HF Trainer does with
  `bf16=True`).
- project: what `tracesft.train.training` runs on CUDA: the step's 8 examples packed into as few rows
  as `packing_length` allows (`tracesft.train.packing.packed_row_plan`, best-fit decreasing), attention
  kept inside each example (`tracesft.train.packing`, varlen flash kernel), Liger kernels (RMSNorm,
  SwiGLU, RoPE, fused linear cross-entropy: the 152k-vocabulary logits are never materialised;
  the pipeline gets that from TRL's own chunked LM head, which TRL uses in place of Liger's),
  LoRA weights in bf16 (as TRL sets them for a quantised base), under the same bf16 autocast the
  Trainer applies (with every weight already bf16, its casts are no-ops).

The weights are random (speed and memory do not depend on their values): the model is built on
the meta device and quantised layer by layer on the GPU in seconds.
Workloads: (a) lengths drawn log-normally, median
1,200 tokens, sigma 0.5, clipped to [256, 4096], fixed seed; (b) every example 4,096 tokens.
Reported: real tokens/s (every token is a real one: neither path pads), peak GiB, the ratios, and
the loss of both paths on the same examples before any update (LoRA B starts at zero, so both see
the same function). Then the 4-bit base's save/load round trip (`tracesft.train.modeling`'s cache).

    python benchmarks/train_throughput.py            # on one H100: writes benchmarks/results/train_throughput.json
    python benchmarks/train_throughput.py --tiny     # CPU plumbing check with a 2-layer model; writes nothing

On the GPU the whole run takes about 5 minutes; each configuration is timed over a few optimizer
steps after a warm-up step (which also absorbs Triton compilation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tracesft.train.packing import VARLEN_ATTENTION, _torch_varlen, packed_row_plan, register_varlen_attention  # noqa: E402

EXAMPLES_PER_STEP = 8  # the seed recipe: batch 1 x gradient accumulation 8
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU plumbing check with a 2-layer model; writes nothing")
    parser.add_argument("--layers", type=int, default=64, help="decoder layers of the 32B architecture (64)")
    parser.add_argument("--packing-length", type=int, default=8192, help="longest packed row, tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per path and workload")
    parser.add_argument("--skip-cache", action="store_true", help="skip the 4-bit base save/load round trip")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no measurement after this many seconds, so the run stays under ~9 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


# --- the model --------------------------------------------------------------------------------------

def build_model(tiny: bool, layers: int) -> Any:
    """The R1-Distill-Qwen-32B architecture with random weights, 4-bit NF4 (or a tiny CPU stand-in)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tiny:
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=8192,
                             tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).float()
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    config = Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=layers, num_attention_heads=40,
                         num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=torch.bfloat16)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    device = torch.device("cuda")
    torch.manual_seed(0)

    def quantise(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                weight = torch.randn(child.out_features, child.in_features, dtype=torch.bfloat16, device=device) * 0.02
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4").to(device)
                if child.bias is not None:
                    layer.bias = nn.Parameter(torch.zeros(child.out_features, dtype=torch.bfloat16, device=device),
                                              requires_grad=False)
                setattr(parent, name, layer)
            else:
                quantise(child)

    quantise(model.model.layers)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = (torch.ones(param.shape, dtype=torch.bfloat16, device=device) if "norm" in type(module).__name__.lower()
                         else torch.randn(param.shape, dtype=torch.bfloat16, device=device) * 0.02)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device=device)
    # What `from_pretrained(..., quantization_config=...)` would record, so `save_pretrained` writes a
    # checkpoint that loads back as 4-bit.
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model.is_loaded_in_4bit = True
    return model


def with_lora(model: Any, lora_dtype: torch.dtype | None) -> Any:
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, lora)
    if lora_dtype is not None:
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.to(lora_dtype)
    return peft_model


def optimizer_for(model: Any, tiny: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tiny:
        return torch.optim.AdamW(params, lr=2e-5)
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=2e-5)


# --- workloads and batches --------------------------------------------------------------------------

def workload_lengths(kind: str, count: int, tiny: bool, seed: int = 1234) -> list[int]:
    scale = 16 if tiny else 1  # the tiny model sees the same shapes, 16x shorter
    if kind == "uniform_4096":
        return [4096 // scale] * count
    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(math.log(1200) + 0.5 * torch.randn(count, generator=generator, dtype=torch.float64))
    return [int(x) // scale for x in draws.clamp(256, 4096).round().tolist()]


def random_examples(lengths: list[int], vocab: int, device: str, seed: int = 99) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).to(device) for n in lengths]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the examples in each row, every row at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(index)
            room[best] -= lengths[index]
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def packed_row(examples: list[torch.Tensor]) -> dict[str, Any]:
    """One row as TRL's padding-free collator makes it: positions restart, boundaries in cu_seq_lens."""
    ids = torch.cat(examples)[None]
    labels = ids.clone()
    starts = [0]
    for example in examples:
        starts.append(starts[-1] + len(example))
    labels[0, starts[:-1]] = -100  # no example learns to predict the next one's first token
    position_ids = torch.cat([torch.arange(len(e), device=ids.device) for e in examples])[None]
    cu_seq_lens = torch.tensor(starts, dtype=torch.int32, device=ids.device)
    max_length = max(len(e) for e in examples)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length, "max_length_k": max_length}


# --- the two paths ------------------------------------------------------------------------------------

class TrainingPath:
    """One way of running an optimizer step over 8 examples."""

    def __init__(self, name: str, model: Any, optimizer: torch.optim.Optimizer, autocast: bool,
                 batches: Callable[[list[torch.Tensor]], list[dict[str, Any]]]) -> None:
        self.name, self.model, self.optimizer, self.autocast, self.batches = name, model, optimizer, autocast, batches

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(**batch).loss

    def step(self, examples: list[torch.Tensor]) -> None:
        self.model.train()
        batches = self.batches(examples)
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:  # token-weighted over the whole step, as the Trainer's accumulation
            trained = int((batch["labels"][:, 1:] != -100).sum())
            (self._forward(batch) * trained / total).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def loss(self, examples: list[torch.Tensor]) -> float:
        """Token-weighted mean loss over the examples, dropout off."""
        self.model.eval()
        batches = self.batches(examples)
        weighted, total = 0.0, 0
        for batch in batches:
            trained = int((batch["labels"][:, 1:] != -100).sum())
            weighted += float(self._forward(batch)) * trained
            total += trained
        return weighted / total


def seed_batches(examples: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"input_ids": e[None], "labels": e[None]} for e in examples]


def project_batches(packing_length: int) -> Callable[[list[torch.Tensor]], list[dict[str, Any]]]:
    def batches(examples: list[torch.Tensor]) -> list[dict[str, Any]]:
        lengths = [len(e) for e in examples]
        row_length, _ = packed_row_plan(lengths, len(examples), packing_length)
        return [packed_row([examples[i] for i in row]) for row in pack(lengths, row_length)]

    return batches


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


DEADLINE = [math.inf]  # perf_counter time after which no measurement starts


def measure(path: TrainingPath, steps: list[list[torch.Tensor]]) -> dict[str, float]:
    """Warm up on the first step, then time the rest: real tokens/s and peak memory."""
    if time.perf_counter() > DEADLINE[0]:
        return {"tokens_per_s": float("nan"), "peak_gib": float("nan"), "skipped": "time budget spent"}
    path.step(steps[0])
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tokens = sum(len(e) for step in steps[1:] for e in step)
    start = time.perf_counter()
    for step in steps[1:]:
        path.step(step)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"tokens_per_s": round(tokens / seconds, 1), "peak_gib": round(peak, 2), "tokens": tokens,
            "seconds": round(seconds, 2)}


def count_packed_attention_calls() -> dict[str, int]:
    """Register the varlen attention, counting calls that carry example boundaries: if a patched
    forward (Liger's) dropped them, attention would silently span examples."""
    from transformers import AttentionInterface

    from tracesft.train.packing import varlen_attention_forward

    register_varlen_attention()
    calls = {"count": 0}

    def counted(module, query, key, value, attention_mask, *args, **kwargs):
        calls["count"] += kwargs.get("cu_seq_lens_q") is not None
        return varlen_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, counted)
    return calls


# --- the cached 4-bit base ----------------------------------------------------------------------------

def cache_round_trip(model: Any, vocab: int, tiny: bool) -> dict[str, Any]:
    """Save the 4-bit base as `tracesft.train.modeling.save_quantized_base` does, load it back, compare."""
    from transformers import AutoModelForCausalLM

    from tracesft.train.modeling import save_quantized_base

    root = Path(tempfile.mkdtemp(prefix="tracesft-qbase-"))
    try:
        sync()
        start = time.perf_counter()
        save_quantized_base(model, root / "base")
        sync()
        save_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (root / "base").rglob("*") if p.is_file())
        start = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(root / "base", device_map={"": 0} if not tiny else None,
                                                      dtype=torch.bfloat16 if not tiny else torch.float32)
        sync()
        load_s = time.perf_counter() - start
        ids = torch.randint(0, vocab, (1, 64), device=model.device)
        model.eval()
        loaded.eval()
        with torch.no_grad():
            same = bool(torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits))
        del loaded
        return {"save_s": round(save_s, 1), "load_s": round(load_s, 1), "size_gib": round(size / 2**30, 2),
                "identical_logits": same}
    except Exception as err:  # recorded, not fatal: the throughput numbers still stand
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- main ---------------------------------------------------------------------------------------------

def main() -> int:
    args = parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    if not args.tiny and tiny:
        print("No CUDA device: running the --tiny CPU check instead (nothing is written).")
    device = "cpu" if tiny else "cuda"
    if tiny:
        torch.set_num_threads(1)  # a 64-wide model gains nothing from threads and suffers on a shared CPU
    packing_length = args.packing_length // 16 if tiny else args.packing_length
    started = time.perf_counter()
    DEADLINE[0] = started + args.budget_s
    import transformers  # noqa: F401  (imported before the build is timed)
    card = torch.cuda.get_device_name() if not tiny else "cpu (tiny model)"
    print(f"device {card}; torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    base = build_model(tiny, args.layers)
    build_s = time.perf_counter() - t0
    vocab = base.config.vocab_size
    n_steps = args.steps + 1  # + the warm-up step
    workloads = {kind: random_examples(workload_lengths(kind, n_steps * EXAMPLES_PER_STEP, tiny), vocab, device)
                 for kind in ("lognormal_1200", "uniform_4096")}
    steps = {kind: [examples[i : i + EXAMPLES_PER_STEP] for i in range(0, len(examples), EXAMPLES_PER_STEP)]
             for kind, examples in workloads.items()}
    results: dict[str, dict[str, Any]] = {kind: {} for kind in workloads}

    # The seed's path first: Liger patches model classes for good, so it must come second.
    seed_model = with_lora(base, lora_dtype=None)
    seed = TrainingPath("seed", seed_model, optimizer_for(seed_model, tiny), autocast=not tiny, batches=seed_batches)
    for kind in workloads:
        results[kind]["loss_seed"] = seed.loss(steps[kind][1])
        results[kind]["seed"] = measure(seed, steps[kind])
        print(kind, "seed", results[kind]["seed"], flush=True)
    base = seed_model.unload()
    del seed, seed_model
    if not tiny:
        torch.cuda.empty_cache()

    packed_calls = count_packed_attention_calls()
    base.set_attn_implementation(VARLEN_ATTENTION)
    liger = False
    if not tiny:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2

            apply_liger_kernel_to_qwen2(model=base)
            liger = True
        except ImportError:
            print("liger-kernel not installed: the project path runs without it", flush=True)
    project_model = with_lora(base, lora_dtype=torch.bfloat16 if not tiny else None)
    project = TrainingPath("project", project_model, optimizer_for(project_model, tiny), autocast=not tiny,
                    batches=project_batches(packing_length))
    for kind in workloads:
        results[kind]["loss_project"] = project.loss(steps[kind][1])
        results[kind]["project"] = measure(project, steps[kind])
        print(kind, "project", results[kind]["project"], flush=True)
    if packed_calls["count"] == 0:
        raise RuntimeError("the project path never reached the varlen attention with example boundaries")
    base = project_model.unload()
    del project, project_model
    over_budget = time.perf_counter() > DEADLINE[0]
    cache = ({"skipped": "time budget spent" if over_budget else "--skip-cache"} if args.skip_cache or over_budget
             else cache_round_trip(base, vocab, tiny))

    a, b = results["lognormal_1200"], results["uniform_4096"]
    ratio = lambda r: round(r["project"]["tokens_per_s"] / r["seed"]["tokens_per_s"], 2)  # noqa: E731
    loss_gap = max(abs(r["loss_project"] - r["loss_seed"]) / abs(r["loss_seed"]) for r in (a, b))
    report = {
        "device": card,
        "date": datetime.date.today().isoformat(),
        "baseline_tokens_per_s": a["seed"]["tokens_per_s"],
        "tokens_per_s": a["project"]["tokens_per_s"],
        "ratio": ratio(a),
        "ratio_uniform_4096": ratio(b),
        "peak_gib": max(a["project"]["peak_gib"], b["project"]["peak_gib"]),
        "baseline_peak_gib": max(a["seed"]["peak_gib"], b["seed"]["peak_gib"]),
        "same_loss": loss_gap < 1e-2,
        "max_relative_loss_gap": round(loss_gap, 5),
        "workloads": results,
        "project_path": {"packing_length": packing_length, "liger": liger,
                         "varlen_kernel": "torch.nn.attention.varlen" if (_torch_varlen() and not tiny) else "per-example sdpa",
                         "lora_dtype": "bfloat16", "autocast": "bfloat16", "gradient_checkpointing": "full"},
        "seed_path": {"batch": 1, "packing": False, "attention": "sdpa", "lora_dtype": "float32",
                      "autocast": "bfloat16", "gradient_checkpointing": "full"},
        "examples_per_optimizer_step": EXAMPLES_PER_STEP,
        "timed_optimizer_steps": args.steps,
        "build_4bit_base_s": round(build_s, 1),
        "quantized_base_cache": cache,
        "versions": _versions(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print_table(report)
    if not tiny:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}, {report['date']}; {report['timed_optimizer_steps']} timed optimizer steps of "
          f"{report['examples_per_optimizer_step']} examples per path")
    print(f"{'workload':<16}{'path':<9}{'tokens/s':>10}{'peak GiB':>10}{'loss':>9}{'ratio':>8}")
    for kind, r in report["workloads"].items():
        for name in ("seed", "project"):
            ratio = r["project"]["tokens_per_s"] / r["seed"]["tokens_per_s"] if name == "project" else 1.0
            print(f"{kind:<16}{name:<9}{r[name]['tokens_per_s']:>10.1f}{r[name]['peak_gib']:>10.2f}"
                  f"{r['loss_' + name]:>9.4f}{ratio:>8.2f}")
    print(f"same loss on identical batches: {report['same_loss']} (max relative gap {report['max_relative_loss_gap']})")
    print(f"4-bit base: built in {report['build_4bit_base_s']} s; cache round trip {report['quantized_base_cache']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
