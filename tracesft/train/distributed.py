"""Training on several GPUs: the step launches `accelerate launch`, each rank runs `train_lora`.

With `recipe.distributed.num_processes == 1` nothing changes: `train` calls `train_lora` in the
calling process. With more, `train` writes the dataset and recipe to files, starts one worker per
GPU (`python -m tracesft.train.distributed_worker`) through `accelerate launch`, waits, and returns
rank 0's adapter and summary. A subprocess (rather than ZenML's `run_with_accelerate` decorator)
because the process count and strategy come from the run configuration, which a decorator
applied at import time cannot see, and because the HF integration's requirements would
downgrade `datasets`.

Two strategies, both QLoRA with the same recipe:
- `ddp`: every rank loads the whole 4-bit base on its own GPU, gradients of the LoRA weights are
  all-reduced. Memory per GPU as on one GPU; throughput scales with the GPU count.
- `fsdp_qlora`: the Answer.AI / Hugging Face FSDP-QLoRA recipe. The 4-bit weights are stored in
  bf16 (`bnb_4bit_quant_storage`, set in `modeling.quantization_config`) so FSDP can shard them;
  transformers' Trainer wraps the LoRA layers separately and sets FSDP's mixed precision to the
  storage dtype. Parameters, gradients and optimizer state are sharded across ranks.

With `device` cpu the same launch runs on the CPU with the gloo backend, which is how the tests
check that 1 and 2 processes train the same way.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tracesft.train.adapter import LoraAdapter
from tracesft.config import Device, DistributedSettings, TrainingRecipe
from tracesft.errors import TracesftError
from tracesft.data.sft_dataset import SFTDataset
from tracesft.train.training import TrainingSummary, train_lora

DATASET_FILE = "dataset.json"
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "training_summary.json"
LOG_HISTORY_FILE = "log_history.json"  # rank 0's Trainer log lines (loss, lr, grad norm by step)
WORKER_LOG_FILE = "worker.log"
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # how torch may mark a rank's lines in the workers' log

# The FSDP-QLoRA settings of the Answer.AI / Hugging Face recipe (bitsandbytes docs, "FSDP-QLoRA"),
# as `accelerate launch` flags. FSDP1: transformers' Trainer adapts its wrap policy and mixed
# precision to PEFT + bf16-stored 4-bit weights only on that path. `use_orig_params` off keeps one
# flat parameter per wrapped unit (LoRA layers get their own units, so dtypes never mix).
# FULL_STATE_DICT lets rank 0 gather the adapter weights at the end.
FSDP_QLORA_FLAGS = {
    "--use_fsdp": None,
    "--fsdp_version": "1",
    "--fsdp_sharding_strategy": "FULL_SHARD",
    "--fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "--fsdp_backward_prefetch": "BACKWARD_PRE",
    "--fsdp_forward_prefetch": "false",
    "--fsdp_offload_params": "false",
    "--fsdp_use_orig_params": "false",
    "--fsdp_sync_module_states": "true",
    "--fsdp_cpu_ram_efficient_loading": "false",
    "--fsdp_state_dict_type": "FULL_STATE_DICT",
}
# What `accelerate launch` has no flag for, set in the workers' environment. FSDP1 casts every
# buffer to its mixed-precision dtype (bf16: Trainer sets it to the 4-bit storage dtype) and keeps
# it there; RoPE's inverse frequencies rounded to bf16 turn each rotary angle by up to
# position x 2^-9 radians (several radians at position 4,000), so the adapter would be trained on
# positions that inference, with the frequencies in fp32, never sees. Buffers of ignored modules
# (a regular expression over module names; the rotary embedding holds no parameters) stay as built.
FSDP_QLORA_ENVIRONMENT = {"FSDP_IGNORED_MODULES": r"(.*\.)?rotary_emb"}


def train(
    dataset: SFTDataset,
    base_model: str,
    recipe: TrainingRecipe,
    device: Device,
    output_dir: Path,
    revision: str | None = None,
    callbacks: list[Any] | None = None,
) -> tuple[LoraAdapter, TrainingSummary]:
    """`train_lora` on as many processes as the recipe asks for; one process runs in this one.

    `callbacks` only reach an in-process run; a launched run logs to the active MLflow run itself
    (see `tracesft.train.distributed_worker`).
    """
    if recipe.distributed.num_processes == 1:
        return train_lora(dataset, base_model, recipe, device, output_dir, revision, callbacks=callbacks)
    return train_lora_distributed(dataset, base_model, recipe, device, output_dir, revision)


def train_lora_distributed(
    dataset: SFTDataset,
    base_model: str,
    recipe: TrainingRecipe,
    device: Device,
    output_dir: Path,
    revision: str | None = None,
) -> tuple[LoraAdapter, TrainingSummary]:
    """Launch one `train_lora` per process with `accelerate launch`; return rank 0's results."""
    check_devices(recipe.distributed, device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / DATASET_FILE).write_text(dataset.model_dump_json(), encoding="utf-8")
    (output_dir / RECIPE_FILE).write_text(recipe.model_dump_json(), encoding="utf-8")
    use_cpu = device == "cpu"
    command = launch_command(recipe.distributed, use_cpu) + [
        "-m",
        "tracesft.train.distributed_worker",
        "--dataset", str(output_dir / DATASET_FILE),
        "--recipe", str(output_dir / RECIPE_FILE),
        "--base-model", base_model,
        "--device", device,
        "--out", str(output_dir),
    ] + (["--revision", revision] if revision else [])
    log_path = output_dir / WORKER_LOG_FILE
    with log_path.open("w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=worker_environment(recipe.distributed, use_cpu), check=False)
    if completed.returncode != 0:
        raise TracesftError(
            f"Distributed training ({recipe.distributed.num_processes} processes, strategy "
            f"{recipe.distributed.strategy}) failed with exit code {completed.returncode}. Full log: {log_path}. "
            f"{first_error(log_path.read_text(encoding='utf-8', errors='replace'))}"
        )
    summary = TrainingSummary.model_validate_json((output_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return LoraAdapter(output_dir / "adapter"), summary


def first_error(log: str, lines: int = 40) -> str:
    """The first traceback in a workers' log, where the failing rank says why; else the log's last lines.

    The launcher's own traceback (which rank failed, with what exit code) comes after every rank's
    and says nothing about the cause, so the log's tail alone would show only that. torch may
    prefix a rank's lines with `[rankN]:`; they are read without it.
    """
    text = [RANK_PREFIX.sub("", line, count=1) for line in log.splitlines()]
    start = next((i for i, line in enumerate(text) if line.startswith("Traceback (most recent call last)")), None)
    if start is None:
        return "Last lines:\n" + "\n".join(text[-lines:])
    # A traceback's frames are indented; its first unindented line after the header is the exception.
    end = next((i for i in range(start + 1, len(text)) if text[i] and not text[i][0].isspace()), len(text) - 1)
    return "First error:\n" + "\n".join(text[start:end + 1][-lines:])


def check_devices(settings: DistributedSettings, device: Device) -> None:
    """Refuse, before launching anything, a run this machine (or the configured device) cannot host."""
    import torch

    where = "parameters.training.distributed"
    if settings.strategy == "fsdp_qlora" and device == "cpu":
        raise TracesftError(
            f"{where}.strategy: fsdp_qlora needs device cuda (FSDP-QLoRA shards 4-bit weights across GPUs), "
            "but parameters.device is cpu. On a CPU use strategy ddp, or set num_processes to 1."
        )
    if device == "cuda" and settings.num_processes > torch.cuda.device_count():
        raise TracesftError(
            f"{where}.num_processes: {settings.num_processes} processes need as many GPUs, but this machine shows "
            f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            "Lower num_processes or request more GPUs for the training step."
        )


def launch_command(settings: DistributedSettings, use_cpu: bool) -> list[str]:
    """`accelerate launch` flags for `settings`, ending where the script (`-m module`) goes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(settings.num_processes),
        "--num_machines", "1",
        "--main_process_port", str(settings.main_process_port or free_port()),
        "--dynamo_backend", "no",
        # Trainer's `bf16=True` (set for device cuda) decides the precision, not the launcher.
        "--mixed_precision", "no",
    ]
    if use_cpu:
        # accelerate's own `--cpu` launch of several processes needs MPI; torch.distributed.run
        # (the multi-GPU launcher) with ACCELERATE_USE_CPU (see `worker_environment`) gives gloo.
        # Threads split the cores this process may run on (a container's CPU set, not the host's count).
        command += ["--num_cpu_threads_per_process", str(max(1, len(os.sched_getaffinity(0)) // settings.num_processes))]
    if settings.strategy == "ddp" and settings.num_processes > 1:
        command += ["--multi_gpu"]
    if settings.strategy == "fsdp_qlora":
        for flag, value in FSDP_QLORA_FLAGS.items():
            command += [flag] if value is None else [flag, value]
    return command


def worker_environment(settings: DistributedSettings, use_cpu: bool) -> dict[str, str]:
    """The caller's environment, plus the FSDP settings `launch_command` cannot pass
    (`FSDP_QLORA_ENVIRONMENT`) and the active MLflow run so rank 0 logs its curves into it.

    The workers import the very `tracesft` the caller runs, wherever the working directory is.
    """
    environment = dict(os.environ)
    if use_cpu:
        environment["ACCELERATE_USE_CPU"] = "true"
    if settings.strategy == "fsdp_qlora":
        environment |= FSDP_QLORA_ENVIRONMENT
    package_root = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency; kept importable without it
        return environment
    run = mlflow.active_run()
    if run is not None:
        environment["MLFLOW_RUN_ID"] = run.info.run_id
        environment["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    return environment


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
