from typing import Annotated

from zenml import get_step_context, log_metadata, step

from tracesft.train.adapter import LoraAdapter
from tracesft.config import RegistrySettings
from tracesft.registry.control_plane import model_version_tags
from tracesft.evaluate.evaluation import EvalReport
from tracesft.registry.model_registry import RegisteredVersion, eval_metrics, register_adapter as register

from steps.run_context import zenml_run_tags


@step
def register_adapter(
    adapter: LoraAdapter, base_report: EvalReport, tuned_report: EvalReport, eval_set_hash: str, registry: RegistrySettings
) -> Annotated[RegisteredVersion, "registered_version"]:
    """A new registry version with alias `challenger` and its lineage as tags, mirrored on the
    pipeline's ZenML model version as metadata."""
    metadata = adapter.metadata
    model = get_step_context().model
    lineage = zenml_run_tags() | model_version_tags(model) | {
        "base_model": metadata["base_model"],
        "base_model_revision": metadata.get("base_model_revision") or "",
        "traces_content_hash": metadata["traces_content_hash"],
        "train_examples": str(metadata["training"]["train_examples"]),
        "eval_set_hash": eval_set_hash,
    } | metadata.get("lineage", {})  # what a stage adds: GRPO's stage, parent_version, reward
    metrics = eval_metrics(base_report, tuned_report)
    version = register(adapter, metrics, lineage, registry)
    registered = {"mlflow_model": version.name, "mlflow_version": version.version, "mlflow_run_id": version.run_id,
                  "reused_existing_version": version.reused, "adapter_content_hash": version.content_hash}
    log_metadata(registered)
    log_metadata({"lineage": lineage, "metrics": metrics, "registry": registered}, infer_model=True)
    return version
