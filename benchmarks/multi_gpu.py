"""Multi-GPU QLoRA throughput and loss agreement on the DeepSeek-R1-Distill-Qwen-32B architecture.

For each strategy of `tracesft.train.distributed` (ddp, fsdp_qlora) it trains on 1 GPU and on 2 GPUs,
launched with the very `accelerate launch` command the training step uses
(`tracesft.train.distributed.launch_command`), and reports tokens/s, scaling (2 GPUs / 1 GPU, same
strategy) and whether the loss curves agree. Weights are random (speed and memory do not depend
on their values; no hub is needed): `random_32b.random_base`, each linear layer quantised to NF4
on its GPU, with the 4-bit data stored in bf16 for FSDP. The rest is the seed
recipe as the Trainer runs it: LoRA r16/a32 on all
seven projections, gradient checkpointing (non-reentrant), bf16 autocast, paged 8-bit AdamW,
batch 1 per device, DDP with `find_unused_parameters` (what the Trainer picks for a PEFT model),
FSDP1 with PEFT's wrap policy and bf16 mixed precision (what the Trainer sets for FSDP-QLoRA).

Loss agreement: every run trains on the same global batch (`--global-batch` sequences per
optimizer step; 1 GPU accumulates them, 2 GPUs split them) repeated every step with a learning
rate high enough (1e-3) that the loss visibly falls; 1 and 2 GPUs must give the same curve
within bf16 noise (`--loss-rtol`).

GPU (2 GPUs, <= 8 minutes):  python benchmarks/multi_gpu.py
CPU debugging (gloo, tiny Qwen2, ddp only):  python benchmarks/multi_gpu.py --tiny
Writes benchmarks/results/multi_gpu.json (multi_gpu_tiny.json with --tiny) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from random_32b import qwen2_config, random_base  # noqa: E402

from tracesft.config import DistributedSettings, TrainingRecipe  # noqa: E402
from tracesft.train.distributed import launch_command, worker_environment  # noqa: E402
from tracesft.train.modeling import quantization_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen2 on the CPU (gloo), ddp only: for debugging")
    parser.add_argument("--strategies", nargs="+", default=None, choices=["ddp", "fsdp_qlora"])
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; 128 with --tiny)")
    parser.add_argument("--global-batch", type=int, default=2, help="sequences per optimizer step, all GPUs together")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first 2 are not timed")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--loss-rtol", type=float, default=0.02, help="largest relative loss gap that still matches")
    parser.add_argument("--run-timeout", type=int, default=150, help="seconds one launch may take")
    parser.add_argument("--out", type=Path, default=None)
    # Internal: one rank of one run.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq = args.seq or (128 if args.tiny else 4096)
    if args.worker:
        worker(args)
    else:
        benchmark(args)


def benchmark(args: argparse.Namespace) -> None:
    import torch

    use_cpu = args.tiny or not torch.cuda.is_available()
    if not args.tiny and use_cpu:
        sys.exit("No CUDA device: run with --tiny on a CPU, or on a machine with 2 GPUs.")
    if not use_cpu and torch.cuda.device_count() < 2:
        sys.exit(f"Needs 2 GPUs, this machine shows {torch.cuda.device_count()}.")
    strategies = args.strategies or (["ddp"] if use_cpu else ["ddp", "fsdp_qlora"])
    device = "CPU (gloo)" if use_cpu else torch.cuda.get_device_name(0)
    started = time.time()
    runs = []
    for strategy in strategies:
        for gpus in (1, 2):
            runs.append(launch(args, strategy, gpus, use_cpu))
            print(json.dumps(runs[-1]), flush=True)

    rows = []
    for run in runs:
        single = next(r for r in runs if r["strategy"] == run["strategy"] and r["gpus"] == 1)
        ok = "error" not in run and "error" not in single
        gaps = [abs(a - b) / abs(b) for a, b in zip(run.get("losses", []), single.get("losses", []))] if ok else []
        rows.append({
            "device": device,
            "gpus": run["gpus"],
            "strategy": run["strategy"],
            "tokens_per_s": run.get("tokens_per_s"),
            "scaling": round(run["tokens_per_s"] / single["tokens_per_s"], 3) if ok else None,
            "loss_match": bool(gaps) and max(gaps) <= args.loss_rtol if ok else None,
            "max_loss_rel_gap": round(max(gaps), 5) if gaps else None,
            "step_s": run.get("step_s"),
            "peak_gib": run.get("peak_gib"),
            "losses": run.get("losses"),
            "error": run.get("error"),
        })
    report = {
        "device": device,
        "gpus": 1 if use_cpu else torch.cuda.device_count(),
        "date": datetime.date.today().isoformat(),
        "model": "tiny Qwen2 (hidden 128, 2 layers)" if args.tiny else "DeepSeek-R1-Distill-Qwen-32B architecture, random NF4 weights",
        "seq": args.seq,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "wall_s": round(time.time() - started, 1),
        "versions": versions(),
        "rows": rows,
    }
    out = args.out or RESULTS / ("multi_gpu_tiny.json" if args.tiny else "multi_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")


def launch(args: argparse.Namespace, strategy: str, gpus: int, use_cpu: bool) -> dict:
    """One run: `gpus` ranks through the step's own launch command; rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="multi-gpu-bench-") as scratch:
        result = Path(scratch) / "result.json"
        command = launch_command(DistributedSettings(num_processes=gpus, strategy=strategy), use_cpu) + [
            str(Path(__file__).resolve()), "--worker", "--strategy", strategy, "--result", str(result),
            "--seq", str(args.seq), "--global-batch", str(args.global_batch), "--steps", str(args.steps),
            "--learning-rate", str(args.learning_rate),
        ] + (["--tiny"] if args.tiny else [])
        log = Path(scratch) / "log.txt"
        try:
            with log.open("w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=worker_environment(use_cpu),
                                      timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code != 0 or not result.exists():
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            return {"strategy": strategy, "gpus": gpus, "error": f"exit {code}: {tail[-1] if tail else ''}"[:300]}
        return json.loads(result.read_text())


def worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, parse_flag_from_env
    from peft import LoraConfig, get_peft_model

    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else "bf16",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} processes")
    accumulation = args.global_batch // world
    fsdp = args.strategy == "fsdp_qlora"
    recipe = TrainingRecipe(distributed=DistributedSettings(num_processes=world, strategy=args.strategy))

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    config = qwen2_config(args.tiny)
    # Every rank seeds the same generator, so all ranks build identical weights (DDP and FSDP
    # broadcast parameters from rank 0, but not the 4-bit quantisation statistics). NF4 as the
    # recipe's loader quantises for this strategy (bf16 storage for FSDP).
    model = random_base(config, accelerator.device, torch.float32 if args.tiny else torch.bfloat16,
                        None if args.tiny else quantization_config(recipe, "cuda"),
                        torch.Generator(device=accelerator.device).manual_seed(0))
    load_s = time.time() - t0
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules=recipe.target_modules, bias="none", task_type="CAUSAL_LM"))

    def make_optimizer(parameters):
        trainable = [p for p in parameters if p.requires_grad]
        if use_cpu:
            return torch.optim.AdamW(trainable, lr=args.learning_rate)
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(trainable, lr=args.learning_rate)

    if fsdp:
        # What transformers' Trainer does for PEFT + bf16-stored 4-bit weights under FSDP1
        # (`update_fsdp_plugin_peft`): LoRA layers in their own units, bf16 mixed precision.
        from peft.utils.other import fsdp_auto_wrap_policy

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        accelerator.state.fsdp_plugin.set_mixed_precision(torch.bfloat16, override=True)
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(make_optimizer(model.parameters()))
    else:
        model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters()))

    # The same global batch every step: sequences [rank * accumulation, (rank + 1) * accumulation).
    generator = torch.Generator().manual_seed(1234)
    batch = torch.randint(0, config.vocab_size, (args.global_batch, args.seq), generator=generator)
    mine = batch[rank * accumulation:(rank + 1) * accumulation].to(accelerator.device)

    model.train()
    losses, times = [], []
    for _ in range(args.steps):
        synchronize(accelerator)
        start = time.time()
        step_loss = 0.0
        for micro in range(accumulation):
            ids = mine[micro:micro + 1]
            context = accelerator.no_sync(model) if micro < accumulation - 1 else contextlib.nullcontext()
            with context:
                with accelerator.autocast():
                    loss = model(input_ids=ids, labels=ids).loss / accumulation
                accelerator.backward(loss)
            step_loss += loss.detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(accelerator)
        times.append(time.time() - start)
        losses.append(accelerator.reduce(torch.as_tensor(step_loss, device=accelerator.device).reshape(1), "mean").item())
    timed = times[2:] or times
    step_s = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else 0.0
    peak = accelerator.reduce(torch.tensor([peak], device=accelerator.device), "max").item()
    if accelerator.is_main_process:
        args.result.write_text(json.dumps({
            "strategy": args.strategy, "gpus": world, "tokens_per_s": round(args.global_batch * args.seq / step_s, 1),
            "step_s": round(step_s, 3), "peak_gib": round(peak, 2), "load_s": round(load_s, 1),
            "losses": [round(x, 5) for x in losses],
        }))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def synchronize(accelerator) -> None:
    import torch

    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
             "accelerate": accelerate.__version__}
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return found


def print_table(report: dict) -> None:
    print(f"\n{report['model']}, seq {report['seq']}, global batch {report['global_batch']}, on {report['device']}")
    print(f"{'strategy':<11} {'gpus':>4} {'tokens/s':>9} {'scaling':>8} {'loss match':>10} {'max gap':>8} {'peak GiB':>8}")
    for row in report["rows"]:
        if row["error"]:
            print(f"{row['strategy']:<11} {row['gpus']:>4}  error: {row['error']}")
            continue
        print(f"{row['strategy']:<11} {row['gpus']:>4} {row['tokens_per_s']:>9.1f} {row['scaling']:>8.2f} "
              f"{str(row['loss_match']):>10} {row['max_loss_rel_gap']:>8.4f} {row['peak_gib']:>8.2f}")


if __name__ == "__main__":
    main()
