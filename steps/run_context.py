"""What a step knows about the ZenML run it belongs to, as MLflow tags."""

from zenml import get_step_context

from tracesft.registry.lineage import config_hash, git_commit, zenml_run_url


def zenml_run_tags() -> dict[str, str]:
    run = get_step_context().pipeline_run
    return {
        "zenml_run_id": str(run.id),
        "zenml_run_name": run.name,
        "zenml_pipeline": run.pipeline.name,
        "zenml_run_url": zenml_run_url(run),
        "run_config_hash": config_hash(run.config.parameters or {}),
        "git_commit": git_commit(),
    }
