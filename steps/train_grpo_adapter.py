import json
from typing import Annotated

import mlflow
from zenml import log_metadata, step

from tracesft.config import Device, GrpoSettings, RegistrySettings, RewardSettings
from tracesft.device import require_device
from tracesft.rl.grpo import train_grpo
from tracesft.rl.problems import GrpoProblem
from tracesft.train.adapter import LoraAdapter, write_metadata
from tracesft.train.tracking import mlflow_logging_callback, mlflow_tracking

from steps.run_context import zenml_run_tags
from steps.scratch import scratch_directory


@step
def train_grpo_adapter(
    parent: LoraAdapter,
    parent_version: str,
    problems: list[GrpoProblem],
    base_model: str,
    base_model_revision: str | None,
    settings: GrpoSettings,
    reward: RewardSettings,
    device: Device,
    registry: RegistrySettings,
) -> Annotated[LoraAdapter, "lora_adapter"]:
    """GRPO from the parent adapter, tracked as an MLflow run (reward, its parts, completion lengths,
    KL if on, per step) that registration later adds scores to. The adapter carries its lineage
    tags: stage, parent version, reward weights."""
    require_device(device)
    tags = zenml_run_tags()
    with (
        mlflow_tracking(registry) as experiment_id,
        mlflow.start_run(run_name=tags["zenml_run_name"], experiment_id=experiment_id, tags=tags) as run,
    ):
        mlflow.log_params({f"grpo.{k}": v for k, v in settings.model_dump().items()}
                          | {f"reward.{k}": v for k, v in reward.model_dump().items()}
                          | {"base_model": base_model, "device": device, "parent_version": parent_version,
                             "problems": len(problems)})
        output_dir = scratch_directory("tracesft-grpo-")
        adapter, summary = train_grpo(parent, problems, base_model, base_model_revision, settings, reward, device,
                                      output_dir, callbacks=[mlflow_logging_callback(device)])
    lineage = {"stage": "grpo", "parent_version": parent_version, "parent_model": registry.model_name,
               "reward": json.dumps(reward.model_dump(), sort_keys=True), "grpo_generation": summary.generation}
    adapter = write_metadata(adapter.path, adapter.metadata | {"mlflow_run_id": run.info.run_id, "lineage": lineage})
    log_metadata(summary.model_dump() | {"mlflow_run_id": run.info.run_id})
    return adapter
