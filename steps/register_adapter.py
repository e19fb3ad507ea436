from typing import Annotated

from zenml import log_metadata, step

from tracesft.adapter import LoraAdapter
from tracesft.config import RegistrySettings
from tracesft.evaluation import EvalReport
from tracesft.registry import RegisteredVersion, eval_metrics, register_adapter as register

from steps.run_context import zenml_run_tags


@step
def register_adapter(
    adapter: LoraAdapter, base_report: EvalReport, tuned_report: EvalReport, eval_set_hash: str, registry: RegistrySettings
) -> Annotated[RegisteredVersion, "registered_version"]:
    """A new registry version with alias `challenger` and its lineage as tags."""
    metadata = adapter.metadata
    lineage = zenml_run_tags() | {
        "base_model": metadata["base_model"],
        "base_model_revision": metadata.get("base_model_revision") or "",
        "traces_content_hash": metadata["traces_content_hash"],
        "train_examples": str(metadata["training"]["train_examples"]),
        "eval_set_hash": eval_set_hash,
    }
    version = register(adapter, eval_metrics(base_report, tuned_report), lineage, registry)
    log_metadata({"model_name": version.name, "version": version.version, "mlflow_run_id": version.run_id})
    return version
