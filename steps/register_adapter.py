from typing import Annotated

from zenml import log_metadata, step

from tracesft.config import RegistrySettings
from tracesft.evaluate.evaluation import EvalReport
from tracesft.registry.model_registry import RegisteredVersion, eval_metrics, register_adapter as register
from tracesft.train.adapter import LoraAdapter

from steps.run_context import zenml_run_tags


# Never served from ZenML's cache. A cached output says only that some registry once held the
# adapter: not the one this run points at (MLFLOW_TRACKING_URI may have changed), nor that it
# still does. Running costs one lookup by content hash when the adapter is there, so every run
# ends with the adapter in its own registry, found or registered (`RegisteredVersion.reused`).
@step(enable_cache=False)
def register_adapter(
    adapter: LoraAdapter, base_report: EvalReport, tuned_report: EvalReport, eval_set_hash: str, registry: RegistrySettings
) -> Annotated[RegisteredVersion, "registered_version"]:
    """The adapter as a version of the configured registry, alias `challenger`, its lineage as tags;
    the same facts as metadata on the pipeline's ZenML model version."""
    metadata = adapter.metadata
    lineage = zenml_run_tags() | {
        "base_model": metadata["base_model"],
        "base_model_revision": metadata.get("base_model_revision") or "",
        "traces_content_hash": metadata["traces_content_hash"],
        "train_examples": str(metadata["training"]["train_examples"]),
        "eval_set_hash": eval_set_hash,
    } | metadata.get("lineage", {})  # what a stage adds: GRPO's stage, parent_version, reward
    metrics = eval_metrics(base_report, tuned_report)
    version = register(adapter, metrics, lineage, registry)
    registered = {"mlflow_model": version.name, "mlflow_version": version.version, "mlflow_run_id": version.run_id,
                  "reused_existing_version": version.reused, "adapter_content_hash": version.content_hash,
                  "registry_uri": version.registry_uri}
    log_metadata(registered)
    log_metadata({"lineage": lineage, "metrics": metrics, "registry": registered}, infer_model=True)
    return version
