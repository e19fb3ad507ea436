"""Starting the pipeline from Python (`tracesft run`, `tracesft demo`, the tests) and reading
back what a run did, for the summary a person sees at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zenml.utils import source_utils

REPO_ROOT = Path(__file__).resolve().parent.parent
# What the `ingest_traces` step logs that a person reading the summary needs (the lists are cut
# to their first entries there; the `raw_traces` artifact and the dataset summary hold them all).
INGESTION_FIGURES = (
    "records", "files", "skipped_records", "skipped_records_listed", "ignored_files", "ignored_files_listed"
)


# What the `train_grpo_adapter` step logs that the summary shows: how far the reward moved.
GRPO_FIGURES = ("steps", "problems", "generation", "first_reward", "last_reward")


def run_pipeline(config_path: Path) -> Any:
    """Run `sft_pipeline` with a run configuration file; returns ZenML's pipeline run."""
    from pipelines.sft_pipeline import sft_pipeline
    from tracesft.config import load_run_config

    return _run(sft_pipeline, config_path, load_run_config(config_path).registry.model_name)


def run_grpo_pipeline(config_path: Path) -> Any:
    """Run `grpo_pipeline` with a GRPO run configuration file; returns ZenML's pipeline run."""
    from pipelines.grpo_pipeline import grpo_pipeline
    from tracesft.config import load_grpo_config

    return _run(grpo_pipeline, config_path, load_grpo_config(config_path).registry.model_name)


def _run(pipeline: Any, config_path: Path, model_name: str) -> Any:
    from zenml import Model
    from zenml.enums import ExecutionMode

    # Steps are resolved by module path relative to the source root; pin it to the repo so that
    # a console script (whose main module lives in the venv) resolves them the same way.
    source_utils.set_custom_source_root(str(REPO_ROOT))
    # Fail fast: the local orchestrator then re-raises the failing step's own exception, so a
    # `TracesftError` (the quality gate's refusal, say) reaches the command line as its message
    # rather than as "Pipeline run has failed due to failure in step(s): ...".
    return pipeline.with_options(
        config_path=str(config_path), model=Model(name=model_name), execution_mode=ExecutionMode.FAIL_FAST
    )()


def run_summary(run: Any) -> dict[str, Any]:
    """Step statuses; what ingestion read, skipped and left unread; what verification kept and
    rejected, by reason; the SFT split's sizes (a GRPO run: its steps and reward); base and
    fine-tuned F1 with the interval of their difference; the registered version and the promotion
    decision of a finished run.

    The data figures come from the steps' metadata, which a cached step shares with the run that
    computed it, so a fully cached run still says what its training data left out.
    """
    from zenml.client import Client

    run = Client().get_pipeline_run(run.id)
    steps = {name: str(step.status.value) for name, step in run.steps.items()}
    summary: dict[str, Any] = {"run": run.name, "status": str(run.status.value), "steps": steps}
    ingest, verify, dataset = (run.steps.get(name) for name in ("ingest_traces", "verify_traces", "build_sft_dataset"))
    if ingest is not None and "records" in ingest.run_metadata:
        summary["ingestion"] = {key: ingest.run_metadata[key] for key in INGESTION_FIGURES if key in ingest.run_metadata}
    if verify is not None and "kept" in verify.run_metadata:
        summary["verification"] = {key: verify.run_metadata[key] for key in ("records", "kept", "rejected")}
    if dataset is not None and "train" in dataset.run_metadata:
        summary["sft_dataset"] = {split: dataset.run_metadata[split] for split in ("train", "validation")}
    grpo = run.steps.get("train_grpo_adapter")
    if grpo is not None and "steps" in grpo.run_metadata:
        summary["grpo"] = {key: grpo.run_metadata.get(key) for key in GRPO_FIGURES}
    compare = run.steps.get("compare_models")
    if compare is not None and compare.status.value in ("completed", "cached"):
        comparison = compare.outputs["model_comparison"][0].load()
        summary["evaluation"] = {
            "problems": comparison.problems,
            "base_f1": comparison.base_f1,
            "finetuned_f1": comparison.finetuned_f1,
            "f1_difference": comparison.f1_difference.model_dump(),
        }
    register, promote = run.steps.get("register_adapter"), run.steps.get("promote_adapter")
    if register is not None and promote is not None:
        summary["registered"] = register.outputs["registered_version"][0].load().model_dump()
        summary["promotion"] = promote.outputs["promotion_decision"][0].load().model_dump()
        summary["new_version"] = not summary["registered"]["reused"]  # the step always runs: found, or registered
    return summary
