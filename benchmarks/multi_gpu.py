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
within bf16 noise: a gap of at most `--loss-rtol` (0.02), relative above 1 nat and in nats below
(`loss_gap` says why: by step 6 the loss is ~0.01, where rounding alone is a 17% relative gap).

Adapter save (`--save-check`): each strategy trains 2 optimizer steps on 2 GPUs and saves its
adapter through the training step's own save (`tracesft.train.adapter.save_prepared_adapter`),
recording the save's time, peak GPU memory per rank, rank 0's host-memory high-water mark (FSDP
gathers only the LoRA tensors, ~0.5 GB on the 32B, never the ~18 GB 4-bit base), the adapter's
size and tensor count, and the dtypes of the live model's buffers. The adapter is then reloaded
on one GPU on the same random base, and its loss on a fixed batch must equal the loss rank 0
computed on the live sharded model just before saving; DDP's and FSDP's adapters must have the
same files and tensor names, dtypes and shapes.
The first FSDP measurement reloaded to loss 10.67 against 2.97 live; BENCHMARKS.md ("FSDP-QLoRA
adapter save") says why (FSDP1 had cast RoPE's frequencies to bf16, so `live_buffer_dtypes` must
now read float32) and what changed.

GPU (2 GPUs, <= 8 minutes each):  python benchmarks/multi_gpu.py   |   python benchmarks/multi_gpu.py --save-check
(the second verifies issue 20's fix: fsdp_qlora's loss_match, same_files, same_tensors true, save_s ~1 s)
CPU check (gloo, tiny Qwen2 unquantised, both strategies; FSDP1 applied by `shard_on_cpu`, since
accelerate applies FSDP only on accelerators):  add --tiny
Writes benchmarks/results/multi_gpu.json (fsdp_save.json with --save-check; *_tiny.json with --tiny)
and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
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

from random_32b import library_versions, qwen2_config, random_base  # noqa: E402

from tracesft.config import DistributedSettings, TrainingRecipe  # noqa: E402
from tracesft.train.distributed import launch_command, worker_environment  # noqa: E402
from tracesft.train.modeling import quantization_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen2 on the CPU (gloo), unquantised: for checking")
    parser.add_argument("--strategies", nargs="+", default=None, choices=["ddp", "fsdp_qlora"])
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; 128 with --tiny)")
    parser.add_argument("--global-batch", type=int, default=2, help="sequences per optimizer step, all GPUs together")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first 2 are not timed")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--loss-rtol", type=float, default=0.02,
                        help="largest loss gap that still matches, relative above 1 nat and absolute below (see loss_gap)")
    parser.add_argument("--run-timeout", type=int, default=150, help="seconds one launch may take")
    parser.add_argument("--save-check", action="store_true",
                        help="measure the adapter save of each strategy on 2 GPUs and reload it on one (see above)")
    parser.add_argument("--out", type=Path, default=None)
    # Internal: one rank of one run.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq = args.seq or (128 if args.tiny else 4096)
    if args.save_check and args.steps == parser.get_default("steps"):
        args.steps = 2  # the save is measured, not the training: two optimizer steps move the adapter off zero
    if args.worker:
        worker(args)
    elif args.save_check:
        save_check(args)
    else:
        benchmark(args)


def machine(args: argparse.Namespace) -> tuple[bool, str, list[str]]:
    """(CPU or not, the device's name, the strategies to run), or exit when this machine cannot run it."""
    import torch

    use_cpu = args.tiny or not torch.cuda.is_available()
    if not args.tiny and use_cpu:
        sys.exit("No CUDA device: run with --tiny on a CPU, or on a machine with 2 GPUs.")
    if not use_cpu and torch.cuda.device_count() < 2:
        sys.exit(f"Needs 2 GPUs, this machine shows {torch.cuda.device_count()}.")
    strategies = args.strategies or ["ddp", "fsdp_qlora"]
    return use_cpu, "CPU (gloo)" if use_cpu else torch.cuda.get_device_name(0), strategies


def benchmark(args: argparse.Namespace) -> None:
    import torch

    use_cpu, device, strategies = machine(args)
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
        gaps = [loss_gap(a, b) for a, b in zip(run.get("losses", []), single.get("losses", []))] if ok else []
        rows.append({
            "device": device,
            "gpus": run["gpus"],
            "strategy": run["strategy"],
            "tokens_per_s": run.get("tokens_per_s"),
            "scaling": round(run["tokens_per_s"] / single["tokens_per_s"], 3) if ok else None,
            "loss_match": bool(gaps) and max(gaps) <= args.loss_rtol if ok else None,
            "max_loss_gap": round(max(gaps), 5) if gaps else None,
            "step_s": run.get("step_s"),
            "peak_gib": run.get("peak_gib"),
            "losses": run.get("losses"),
            "error": run.get("error"),
        })
    report = {
        "device": device,
        "gpus": 1 if use_cpu else torch.cuda.device_count(),
        "date": datetime.date.today().isoformat(),
        "model": model_name(args.tiny),
        "seq": args.seq,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "wall_s": round(time.time() - started, 1),
        "versions": library_versions(),
        **headline(rows),
        "rows": rows,
    }
    out = args.out or RESULTS / ("multi_gpu_tiny.json" if args.tiny else "multi_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")


def loss_gap(loss: float, reference: float) -> float:
    """How far `loss` is from `reference`: relative above 1 nat, in nats below.

    A purely relative gap means nothing near zero: with lr 1e-3 the repeated batch's loss falls to
    ~0.01 by step 6, where bf16 rounding alone put 1 and 2 GPUs 0.0022 nats apart, 17% (H200, ddp:
    0.01283 against 0.01501). Below 1 nat the same `--loss-rtol` is a bound in nats (0.02), which
    rounding meets there; above it the check stays relative, so a run that learns differently still
    fails in the first steps, where the loss is several nats.
    """
    return abs(loss - reference) / max(abs(reference), 1.0)


def headline(rows: list[dict]) -> dict:
    """The answer in one line, as its issue asked: the faster strategy on 2 GPUs, its scaling over
    1 GPU, and whether every run's loss curve matched its 1-GPU run."""
    measured = [row for row in rows if row["gpus"] > 1 and not row["error"]]
    best = max(measured, key=lambda row: row["tokens_per_s"], default=None)
    return {"strategy": best and best["strategy"], "scaling": best and best["scaling"],
            "loss_match": all(row["loss_match"] for row in rows) if rows and not any(row["error"] for row in rows) else None}


def launch(args: argparse.Namespace, strategy: str, gpus: int, use_cpu: bool, extra: list[str] = ()) -> dict:
    """One run: `gpus` ranks through the step's own launch command; rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="multi-gpu-bench-") as scratch:
        result = Path(scratch) / "result.json"
        settings = DistributedSettings(num_processes=gpus, strategy=strategy)
        command = launch_command(settings, use_cpu) + [
            str(Path(__file__).resolve()), "--worker", "--strategy", strategy, "--result", str(result),
            "--seq", str(args.seq), "--global-batch", str(args.global_batch), "--steps", str(args.steps),
            "--learning-rate", str(args.learning_rate), "--run-timeout", str(args.run_timeout), *extra,
        ] + (["--tiny"] if args.tiny else [])
        log = Path(scratch) / "log.txt"
        print(f"{strategy} on {gpus} {'processes' if use_cpu else 'GPUs'}: launching (at most {args.run_timeout} s)",
              file=sys.stderr, flush=True)
        started = time.time()
        try:
            with log.open("w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=worker_environment(settings, use_cpu),
                                      timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"{strategy} on {gpus}: exit {code} after {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        if code != 0 or not result.exists():
            tail = log.read_text(errors="replace").splitlines()[-(120 if code == "timeout" else 25):]
            print("\n".join(tail), file=sys.stderr)
            return {"strategy": strategy, "gpus": gpus, "error": f"exit {code}: {tail[-1] if tail else ''}"[:300]}
        return json.loads(result.read_text())


def worker(args: argparse.Namespace) -> None:
    import faulthandler

    import torch

    # A rank that stalls writes every thread's stack into the log before the launch's limit kills it.
    faulthandler.dump_traceback_later(max(args.run_timeout - 20, 5), exit=False)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, parse_flag_from_env
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    fsdp = args.strategy == "fsdp_qlora"
    # On a CPU accelerate applies no FSDP (and its plugin's default, syncing module states, wants an
    # accelerator): the plugin is made here, from the launcher's settings, and applied by `shard_on_cpu`.
    cpu_fsdp_plugin = FullyShardedDataParallelPlugin(sync_module_states=False) if fsdp and use_cpu else None
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="bf16" if bf16_autocast(args.strategy, use_cpu) else "no",
                              fsdp_plugin=cpu_fsdp_plugin,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} processes")
    accumulation = args.global_batch // world
    recipe = TrainingRecipe(distributed=DistributedSettings(num_processes=world, strategy=args.strategy))

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    config, model = build_base(args.tiny, args.strategy, accelerator.device)
    load_s = time.time() - t0
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    # PEFT draws lora_A at random: seeded as TRL's SFTTrainer seeds it, so every run starts from the
    # same adapter. Unseeded, the 1- and 2-GPU runs compared different initialisations (the 2 x H200
    # ddp curves drifted 0.16% apart after one update, 1.5% after two; two 1-GPU runs, 0.013%).
    set_seed(recipe.seed)
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

        plugin = cpu_fsdp_plugin or accelerator.state.fsdp_plugin
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        plugin.set_mixed_precision(torch.bfloat16, override=True)
        model = shard_on_cpu(model, plugin) if use_cpu else accelerator.prepare(model)
        optimizer = accelerator.prepare(make_optimizer(model.parameters()))
    else:
        model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters()))

    # The same global batch every step: sequences [rank * accumulation, (rank + 1) * accumulation).
    generator = torch.Generator().manual_seed(1234)
    batch = torch.randint(0, config.vocab_size, (args.global_batch, args.seq), generator=generator)
    mine = batch[rank * accumulation:(rank + 1) * accumulation].to(accelerator.device)

    if fsdp and use_cpu:
        # A LoRA layer casts its input to its weight's dtype, which FSDP1 reports as fp32 until a
        # forward has gathered the weight in bf16; a CPU's dropout saves its mask in that dtype
        # (CUDA's saves booleans), so the first step's recomputation would differ from its
        # forward and gradient checkpointing refuses it. One forward without gradients first.
        fixed_batch_loss(model, mine[:1], accelerator.autocast())
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
    saved = {}
    if args.save_dir:
        # Where the training step's workers write: rank 0 into the folder, the others beside it.
        save_dir = args.save_dir if accelerator.is_main_process else args.save_dir.parent / f"{args.save_dir.name}-rank-{rank}"
        saved = measure_save(accelerator, model, batch[:1].to(accelerator.device), save_dir, fsdp)
        saved["live_buffer_dtypes"] = sorted({str(buffer.dtype).removeprefix("torch.") for buffer in model.buffers()})
    if accelerator.is_main_process:
        args.result.write_text(json.dumps({
            "strategy": args.strategy, "gpus": world, "tokens_per_s": round(args.global_batch * args.seq / step_s, 1),
            "step_s": round(step_s, 3), "peak_gib": round(peak, 2), "load_s": round(load_s, 1),
            "losses": [round(x, 5) for x in losses], **saved,
        }))
    accelerator.wait_for_everyone()
    # The wrapped model goes before its process group, as in the training step's worker (whose
    # model lives inside `train_lora`). Left to the end of this function, after `end_training`,
    # DDP on gloo stalled one rank's exit in 2 of 16 runs on a loaded 2-core CPU (the stacks that
    # `faulthandler` wrote showed the worker already returned).
    accelerator.free_memory()
    del model, optimizer, loss
    gc.collect()
    accelerator.end_training()


def bf16_autocast(strategy: str, use_cpu: bool) -> bool:
    """Whether a run computes under bf16 autocast: on a GPU always (the seed recipe), and under FSDP
    on a CPU too, where FSDP's bf16 mixed precision needs it (a LoRA layer casts its input to the
    dtype of its sharded fp32 weight, then FSDP computes with that weight in bf16)."""
    return not use_cpu or strategy == "fsdp_qlora"


def shard_on_cpu(model, plugin):
    """FSDP1 with what `Accelerator.prepare` would pass from `plugin` (whose settings come from the
    launcher's environment: `FSDP_QLORA_FLAGS`, `FSDP_QLORA_ENVIRONMENT`), on the CPU."""
    import re

    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    ignored = ([module for name, module in model.named_modules() if re.fullmatch(plugin.ignored_modules, name)]
               if plugin.ignored_modules else [])  # a regular expression over module names, as accelerate reads it
    return FullyShardedDataParallel(
        model, sharding_strategy=plugin.sharding_strategy, auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy, backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers, ignored_modules=ignored, device_id=torch.device("cpu"))


def build_base(tiny: bool, strategy: str, device) -> tuple:
    """(config, random base) exactly as a worker of `strategy` builds it, so that a reload on one
    GPU sees the base the adapter was trained on.

    Every rank seeds the same generator, so all ranks build identical weights (DDP and FSDP
    broadcast parameters from rank 0, but not the 4-bit quantisation statistics). NF4 as the
    recipe's loader quantises for this strategy (bf16 storage for FSDP).
    """
    import torch

    recipe = TrainingRecipe(distributed=DistributedSettings(num_processes=2, strategy=strategy))
    config = qwen2_config(tiny)
    model = random_base(config, device, torch.float32 if tiny else torch.bfloat16,
                        None if tiny else quantization_config(recipe, "cuda"),
                        torch.Generator(device=device).manual_seed(0))
    return config, model


def fixed_batch_loss(model, ids, autocast) -> float:
    """Loss on `ids` with dropout off: what a saved adapter must reproduce after reloading."""
    import torch

    model.eval()
    with torch.no_grad(), autocast:
        return model(input_ids=ids, labels=ids).loss.float().item()


def measure_save(accelerator, model, ids, save_dir: Path, fsdp: bool) -> dict:
    """Rank 0's loss on `ids`, then the training step's adapter save, timed, with each rank's peak
    GPU memory and rank 0's host-memory high-water mark (`ru_maxrss`) before and after it.

    The high-water mark only moves when the save exceeds everything before it, so its growth is
    a lower bound of what the save took; the rise of the current RSS says the same from below.
    """
    import torch

    from tracesft.train.adapter import save_prepared_adapter

    loss = fixed_batch_loss(model, ids, accelerator.autocast())  # every rank: an FSDP forward is collective
    cuda = accelerator.device.type == "cuda"
    synchronize(accelerator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    accelerator.wait_for_everyone()
    rss_before, max_rss_before = host_memory_gib()
    start = time.time()
    save_prepared_adapter(accelerator, model, save_dir, fsdp=fsdp)
    synchronize(accelerator)
    save_s = time.time() - start
    rss_after, max_rss_after = host_memory_gib()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = accelerator.gather(torch.tensor([peak], device=accelerator.device)).tolist()
    return {"loss_before_save": round(loss, 5), "save_s": round(save_s, 2),
            "save_peak_gpu_gib_per_rank": [round(x, 2) for x in peaks],
            "rank0_rss_gib_before_after": [round(rss_before, 2), round(rss_after, 2)],
            "rank0_max_rss_gib_before_after": [round(max_rss_before, 2), round(max_rss_after, 2)]}


def host_memory_gib() -> tuple[float, float]:
    """(current RSS, high-water RSS) of this process in GiB (Linux: /proc and `ru_maxrss` in KiB)."""
    import resource

    current = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")), 0)
    return current / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_check(args: argparse.Namespace) -> None:
    """Train and save each strategy's adapter on 2 GPUs, reload it on one, compare the formats."""
    use_cpu, device, strategies = machine(args)
    started = time.time()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fsdp-save-") as scratch:
        for strategy in strategies:
            save_dir = Path(scratch) / strategy
            run = launch(args, strategy, 2, use_cpu, ["--save-dir", str(save_dir)])
            if "error" not in run:
                run |= adapter_facts(save_dir)
                run["reloaded_loss"] = round(reloaded_loss(args, strategy, save_dir, use_cpu), 5)
                gap = loss_gap(run["reloaded_loss"], run["loss_before_save"])
                run["loss_match"], run["loss_gap"] = gap <= args.loss_rtol, round(gap, 6)
            runs[strategy] = run
            print(json.dumps({key: value for key, value in run.items() if key != "tensors"}), flush=True)
    saved = [run for run in runs.values() if "error" not in run]
    same = (lambda key: all(run[key] == saved[0][key] for run in saved) if len(saved) > 1 else None)
    report = {
        "device": device, "gpus": 2, "date": datetime.date.today().isoformat(),
        "measured_path": "tracesft.train.adapter.save_prepared_adapter",
        "model": model_name(args.tiny), "seq": args.seq, "global_batch": args.global_batch, "steps": args.steps,
        "wall_s": round(time.time() - started, 1), "versions": library_versions(),
        "loss_match": all(run.get("loss_match") for run in runs.values()),
        "same_files": same("files"), "same_tensors": same("tensors"),
        "runs": {name: {key: value for key, value in run.items() if key != "tensors"} for name, run in runs.items()},
    }
    out = args.out or RESULTS / ("fsdp_save_tiny.json" if args.tiny else "fsdp_save.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_save_table(report)
    print(f"wrote {out}")


def adapter_facts(adapter_dir: Path) -> dict:
    """What a saved adapter holds: its files, size, and each tensor's name, dtype and shape."""
    from safetensors import safe_open

    files = sorted(p for p in adapter_dir.rglob("*") if p.is_file())
    tensors = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
        for name in weights.keys():
            piece = weights.get_slice(name)
            tensors[name] = [piece.get_dtype(), list(piece.get_shape())]
    return {"files": [str(p.relative_to(adapter_dir)) for p in files],
            "adapter_mib": round(sum(p.stat().st_size for p in files) / 2**20, 2),
            "tensor_count": len(tensors), "tensor_dtypes": sorted({dtype for dtype, _ in tensors.values()}),
            "tensors": {name: shape for name, (_, shape) in tensors.items()}}


def reloaded_loss(args: argparse.Namespace, strategy: str, adapter_dir: Path, use_cpu: bool) -> float:
    """The saved adapter on the same random base in this one process (one GPU): its fixed-batch loss."""
    import gc

    import torch
    from peft import PeftModel

    device = torch.device("cpu" if use_cpu else "cuda:0")
    config, base = build_base(args.tiny, strategy, device)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    generator = torch.Generator().manual_seed(1234)  # the worker's global batch; its first sequence
    ids = torch.randint(0, config.vocab_size, (args.global_batch, args.seq), generator=generator)[:1].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(strategy, use_cpu))
    loss = fixed_batch_loss(model, ids, autocast)
    del model, base
    gc.collect()
    if not use_cpu:
        torch.cuda.empty_cache()
    return loss


def model_name(tiny: bool) -> str:
    return "tiny Qwen2 (hidden 128, 2 layers)" if tiny else "DeepSeek-R1-Distill-Qwen-32B architecture, random NF4 weights"


def print_save_table(report: dict) -> None:
    print(f"\nAdapter save after {report['steps']} steps on 2 ranks, {report['model']}, on {report['device']}")
    print(f"{'strategy':<11} {'save s':>7} {'GPU GiB/rank':>14} {'rank0 RSS GiB':>14} {'max RSS GiB':>12} "
          f"{'MiB':>7} {'tensors':>7} {'loss before':>11} {'reloaded':>9} {'match':>5}")
    for name, run in report["runs"].items():
        if "error" in run:
            print(f"{name:<11}  error: {run['error']}")
            continue
        print(f"{name:<11} {run['save_s']:>7.2f} {'/'.join(map(str, run['save_peak_gpu_gib_per_rank'])):>14} "
              f"{'->'.join(map(str, run['rank0_rss_gib_before_after'])):>14} "
              f"{'->'.join(map(str, run['rank0_max_rss_gib_before_after'])):>12} {run['adapter_mib']:>7.1f} "
              f"{run['tensor_count']:>7} {run['loss_before_save']:>11.5f} {run['reloaded_loss']:>9.5f} {str(run['loss_match']):>5}")
    print(f"same files: {report['same_files']}, same tensor names and shapes: {report['same_tensors']}")


def synchronize(accelerator) -> None:
    import torch

    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()


def print_table(report: dict) -> None:
    print(f"\n{report['model']}, seq {report['seq']}, global batch {report['global_batch']}, on {report['device']}")
    print(f"{'strategy':<11} {'gpus':>4} {'tokens/s':>9} {'scaling':>8} {'loss match':>10} {'max gap':>8} {'peak GiB':>8}")
    for row in report["rows"]:
        if row["error"]:
            print(f"{row['strategy']:<11} {row['gpus']:>4}  error: {row['error']}")
            continue
        print(f"{row['strategy']:<11} {row['gpus']:>4} {row['tokens_per_s']:>9.1f} {row['scaling']:>8.2f} "
              f"{str(row['loss_match']):>10} {row['max_loss_gap']:>8.4f} {row['peak_gib']:>8.2f}")


if __name__ == "__main__":
    main()
