from typing import Annotated

import mlflow
from zenml import log_metadata, step

from tracesft.train.adapter import LoraAdapter, write_metadata
from tracesft.config import Device, RegistrySettings, TrainingRecipe
from tracesft.device import require_device
from tracesft.train.distributed import train
from tracesft.data.sft_dataset import SFTDataset
from tracesft.train.tracking import mlflow_logging_callback, mlflow_tracking

from steps.run_context import zenml_run_tags
from steps.scratch import scratch_directory


@step
def train_adapter(
    dataset: SFTDataset,
    base_model: str,
    base_model_revision: str | None,
    recipe: TrainingRecipe,
    device: Device,
    registry: RegistrySettings,
) -> Annotated[LoraAdapter, "lora_adapter"]:
    """QLoRA fine-tuning, tracked as an MLflow run that registration later adds scores to.

    Checkpoints (optimizer state included) and the adapter are written to a scratch folder that
    goes when the step ends; only a configured `training.checkpoint_dir` keeps checkpoints.
    """
    require_device(device)
    tags = zenml_run_tags()
    with (
        mlflow_tracking(registry) as experiment_id,
        mlflow.start_run(run_name=tags["zenml_run_name"], experiment_id=experiment_id, tags=tags) as run,
    ):
        mlflow.log_params(
            {f"recipe.{k}": v for k, v in recipe.model_dump().items()} | {"base_model": base_model, "device": device}
        )
        output_dir = scratch_directory("tracesft-train-")
        adapter, summary = train(
            dataset, base_model, recipe, device, output_dir, base_model_revision, callbacks=[mlflow_logging_callback(device)]
        )
        plan = summary.memory_plan  # the layers recomputed, beside the budget's estimate (tracesft.train.memory_plan)
        mlflow.log_params({"recomputed_layers": summary.recomputed_layers} | ({} if plan is None else {
            "memory_plan.kept_layers": plan.kept_layers,
            "memory_plan.estimated_peak_gib": plan.estimated_peak_gib}))
        mlflow.log_metrics({"final_train_loss": summary.train_loss} | (
            {"final_eval_loss": summary.eval_loss} if summary.eval_loss is not None else {}
        ))
    adapter = write_metadata(adapter.path, adapter.metadata | {"mlflow_run_id": run.info.run_id})
    log_metadata({"train_loss": summary.train_loss, "steps": summary.global_steps, "mlflow_run_id": run.info.run_id})
    return adapter
