"""Registering adapters in the MLflow model registry and the promotion gate.

Aliases, not stages (stages are deprecated in MLflow 3): every new version gets `challenger`;
`champion` moves only when the gate measures a win. Lineage goes on the version as tags, the
scores on its run as metrics, so `models:/<name>@champion` always says where it came from.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tracesft.adapter import LoraAdapter
from tracesft.config import RegistrySettings
from tracesft.evaluation import EvalReport
from tracesft.tracking import use_tracking

CHALLENGER = "challenger"
CHAMPION = "champion"
_METRICS = ("f1", "precision", "recall", "accuracy", "parse_failure_rate")


class RegisteredVersion(BaseModel):
    name: str
    version: str
    run_id: str
    source: str


class PromotionDecision(BaseModel):
    name: str
    version: str
    promoted: bool
    reason: str
    finetuned_f1: float
    base_f1: float
    champion_version: str | None
    champion_f1: float | None


def eval_metrics(base: EvalReport, tuned: EvalReport) -> dict[str, float]:
    metrics = {}
    for prefix, report in (("base", base), ("finetuned", tuned)):
        metrics.update({f"{prefix}_{name}": float(getattr(report.scores, name)) for name in _METRICS})
    metrics["eval_problems"] = float(tuned.scores.n)
    return metrics


def register_adapter(
    adapter: LoraAdapter, metrics: dict[str, float], lineage: dict[str, str], settings: RegistrySettings
) -> RegisteredVersion:
    """Log the adapter's files and scores to its training run and register them as a new version."""
    import mlflow
    from mlflow import MlflowClient

    experiment_id = use_tracking(settings)
    run_id = adapter.metadata.get("mlflow_run_id")
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run:
        mlflow.log_metrics(metrics)
        mlflow.set_tags(lineage)
        mlflow.log_artifacts(str(adapter.path), artifact_path="adapter")
        source = f"{run.info.artifact_uri}/adapter"
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{settings.model_name}'"):
        client.create_registered_model(
            settings.model_name, description="LoRA adapters fine-tuned on verified Corr2Cause reasoning traces."
        )
    version = client.create_model_version(
        settings.model_name, source=source, run_id=run.info.run_id, tags={**lineage, **_as_tags(metrics)}
    )
    client.set_registered_model_alias(settings.model_name, CHALLENGER, version.version)
    return RegisteredVersion(name=settings.model_name, version=str(version.version), run_id=run.info.run_id, source=source)


def decide_promotion(finetuned_f1: float, base_f1: float, champion_f1: float | None, margin: float) -> tuple[bool, str]:
    """The gate's rule: beat the base and the current champion, each by more than `margin`."""
    if finetuned_f1 <= base_f1 + margin:
        return False, f"fine-tuned F1 {finetuned_f1:.3f} does not beat base F1 {base_f1:.3f} by more than {margin}"
    if champion_f1 is not None and finetuned_f1 <= champion_f1 + margin:
        return False, f"fine-tuned F1 {finetuned_f1:.3f} does not beat champion F1 {champion_f1:.3f} by more than {margin}"
    return True, f"fine-tuned F1 {finetuned_f1:.3f} beats base {base_f1:.3f}" + (
        f" and champion {champion_f1:.3f}" if champion_f1 is not None else " (no champion yet)"
    )


def promote_if_better(registered: RegisteredVersion, metrics: dict[str, float], settings: RegistrySettings) -> PromotionDecision:
    from mlflow import MlflowClient

    use_tracking(settings)
    client = MlflowClient()
    champion = _version_by_alias(client, settings.model_name, CHAMPION)
    champion_f1 = float(champion.tags["finetuned_f1"]) if champion is not None else None
    promoted, reason = decide_promotion(metrics["finetuned_f1"], metrics["base_f1"], champion_f1, settings.promotion_margin)
    if promoted:
        client.set_registered_model_alias(settings.model_name, CHAMPION, registered.version)
    return PromotionDecision(
        name=registered.name,
        version=registered.version,
        promoted=promoted,
        reason=reason,
        finetuned_f1=metrics["finetuned_f1"],
        base_f1=metrics["base_f1"],
        champion_version=str(champion.version) if champion is not None else None,
        champion_f1=champion_f1,
    )


def list_versions(settings: RegistrySettings) -> list[dict[str, Any]]:
    """Every registered version, newest first, with aliases, tags and the metrics of its run."""
    from mlflow import MlflowClient

    use_tracking(settings)
    client = MlflowClient()
    versions = client.search_model_versions(filter_string=f"name = '{settings.model_name}'")
    # Search results leave aliases out; the registered model holds the alias -> version map.
    aliases: dict[str, list[str]] = {}
    if versions:
        for alias, number in client.get_registered_model(settings.model_name).aliases.items():
            aliases.setdefault(str(number), []).append(alias)
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        rows.append(
            {
                "name": version.name,
                "version": str(version.version),
                "aliases": sorted(aliases.get(str(version.version), [])),
                "tags": dict(version.tags),
                "metrics": dict(metrics),
                "run_id": version.run_id,
                "source": version.source,
                "created": version.creation_timestamp,
            }
        )
    return rows


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _as_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {name: f"{value:.6g}" for name, value in metrics.items()}
