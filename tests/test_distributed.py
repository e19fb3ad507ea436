"""Multi-process training: 2 processes train exactly like 1 with the same global batch.

The two-process run is real: `accelerate launch` starts two workers that train the tiny model
with TRL + PEFT on the CPU (gloo backend), and rank 0 logs into a real MLflow run (sqlite).
"""

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tracesft.config import DistributedSettings, RegistrySettings, TrainingRecipe, load_run_config
from tracesft.train.distributed import (FSDP_QLORA_ENVIRONMENT, FSDP_QLORA_FLAGS, LOG_HISTORY_FILE, check_devices,
                                       first_error, launch_command, train, worker_environment)
from tracesft.errors import TracesftError
from tracesft.data.ingest import ingest
from tracesft.data.sample_data import DATA, tokenizer_corpus
from tracesft.data.sft_dataset import build_sft_dataset
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.tracking import mlflow_tracking
from tracesft.data.verify import verify

GLOBAL_BATCH = 4


def recipe(num_processes: int) -> TrainingRecipe:
    # Same global batch (per device x processes x accumulation = 4); no dropout, so the only
    # difference left between the runs is the order of floating-point sums.
    return TrainingRecipe(
        learning_rate=2e-3,
        num_train_epochs=1,
        per_device_train_batch_size=GLOBAL_BATCH // num_processes,
        gradient_accumulation_steps=1,
        lora_dropout=0.0,
        max_seq_length=1024,
        logging_steps=1,
        distributed=DistributedSettings(num_processes=num_processes),
        # The seed's batching: the same examples in each step on 1 and 2 processes. Packing keeps
        # the tokens per step across world sizes, but groups the examples into rows differently.
        packing=False,
    )


@pytest.fixture(scope="module")
def model_and_dataset(tmp_path_factory: pytest.TempPathFactory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus())
    dataset = build_sft_dataset(verify(ingest([str(DATA / "sample_traces")])).kept, validation_fraction=0.15, seed=42)
    # The 12 shortest records, whole (none truncated away): three optimizer steps of 4.
    shortest = sorted(dataset.train, key=lambda record: len(record.query) + len(record.trace))[:12]
    return str(model_dir), dataset.model_copy(update={"train": shortest, "validation": []})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) launch; tests/gpu covers CUDA")
def test_two_processes_follow_the_one_process_loss_curve(model_and_dataset, tmp_path, monkeypatch) -> None:
    model_dir, dataset = model_and_dataset
    one_process_losses: list[float] = []

    class LossRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                one_process_losses.append(float(logs["loss"]))

    # One process: trains in this process, so the in-process callback sees every log line.
    single, single_summary = train(dataset, model_dir, recipe(1), "cpu", tmp_path / "one", callbacks=[LossRecorder()])

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    with (
        mlflow_tracking(RegistrySettings(experiment_name="distributed-test")) as experiment_id,
        mlflow.start_run(experiment_id=experiment_id) as run,
    ):
        double, double_summary = train(dataset, model_dir, recipe(2), "cpu", tmp_path / "two")
    rank_zero_log = json.loads((tmp_path / "two" / LOG_HISTORY_FILE).read_text())
    two_process_losses = [entry["loss"] for entry in rank_zero_log if "loss" in entry]

    assert double_summary.global_steps == single_summary.global_steps >= 3
    assert two_process_losses == pytest.approx(one_process_losses, rel=1e-3), (one_process_losses, two_process_losses)
    assert one_process_losses[-1] < one_process_losses[0]
    # Same data, same updates: the adapters agree too.
    single_weights = load_file(single.path / "adapter_model.safetensors")
    double_weights = load_file(double.path / "adapter_model.safetensors")
    assert single_weights.keys() == double_weights.keys()
    for name, weight in single_weights.items():
        torch.testing.assert_close(double_weights[name], weight, atol=1e-4, rtol=1e-3)
    assert double.metadata["recipe"]["distributed"]["num_processes"] == 2
    # Rank 0 wrote into the step's MLflow run; rank 1 kept to its own folder.
    logged = mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(two_process_losses)
    assert (tmp_path / "two" / "rank-1" / "adapter").is_dir()


def test_fsdp_launch_uses_the_fsdp_qlora_recipe() -> None:
    command = launch_command(DistributedSettings(num_processes=2, strategy="fsdp_qlora", main_process_port=29511), use_cpu=False)
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--main_process_port") + 1] == "29511"
    assert "--multi_gpu" not in command  # accelerate allows one of --multi_gpu / --use_fsdp
    for flag, value in FSDP_QLORA_FLAGS.items():
        assert flag in command
        if value is not None:
            assert command[command.index(flag) + 1] == value


def test_fsdp_workers_leave_the_rotary_embedding_unsharded_and_in_fp32() -> None:
    # benchmarks/multi_gpu.py --tiny --save-check checks on FSDP1 that its buffers then stay fp32.
    fsdp = worker_environment(DistributedSettings(num_processes=2, strategy="fsdp_qlora"), use_cpu=False)
    ddp = worker_environment(DistributedSettings(num_processes=2, strategy="ddp"), use_cpu=False)
    assert FSDP_QLORA_ENVIRONMENT.items() <= fsdp.items()
    assert "FSDP_IGNORED_MODULES" not in ddp
    assert re.fullmatch(FSDP_QLORA_ENVIRONMENT["FSDP_IGNORED_MODULES"], "base_model.model.model.rotary_emb")


def test_ddp_launch_on_gpus() -> None:
    command = launch_command(DistributedSettings(num_processes=4), use_cpu=False)
    assert "--multi_gpu" in command and "--use_fsdp" not in command


def test_fsdp_on_device_cpu_is_a_clear_error() -> None:
    with pytest.raises(TracesftError, match=r"parameters\.training\.distributed\.strategy: fsdp_qlora needs device cuda"):
        check_devices(DistributedSettings(num_processes=2, strategy="fsdp_qlora"), "cpu")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"num_processes": 0}, "greater than or equal to 1"),
        ({"strategy": "zero3"}, "'ddp' or 'fsdp_qlora'"),
        ({"processes": 2}, "Extra inputs are not permitted"),
    ],
)
def test_bad_distributed_settings_name_the_key(tmp_path: Path, section, message) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"parameters": {"traces": ["t"], "eval_set": "e.csv", "training": {"distributed": section}}}))
    with pytest.raises(TracesftError, match=r"parameters\.training\.distributed\.") as error:
        load_run_config(config)
    assert message in str(error.value)


def test_a_failed_launch_reports_the_failing_ranks_error_not_the_launchers():
    log = "\n".join([
        "some warning",
        "[rank1]: Traceback (most recent call last):",  # torch may prefix a rank's lines
        '[rank1]:   File "worker.py", line 3, in <module>',
        "[rank1]:     train()",
        "[rank1]: RuntimeError: size mismatch, got 0 and 16",
        "Traceback (most recent call last):",
        '  File "launch.py", line 1419, in main',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
    ])
    excerpt = first_error(log)
    assert excerpt.endswith("RuntimeError: size mismatch, got 0 and 16")
    assert "ChildFailedError" not in excerpt
    assert first_error("no traceback\nexit 1") == "Last lines:\nno traceback\nexit 1"
