"""Registering adapters in the MLflow model registry, the promotion gate, promotion and rollback.

Aliases, not stages (stages are deprecated in MLflow 3): every new version gets `challenger`;
`champion` moves only when the gate measures a win, or when a person promotes or rolls back.
Lineage goes on the version as tags, the scores on its run as metrics, so
`models:/<name>@champion` always says where it came from.

Safety rules, all enforced here and in the modules named:
- Registration is idempotent on the registry it is pointed at: an adapter whose content hash
  (`LoraAdapter.content_hash`, canonical) is there already is found, not registered again; one
  that is not is registered, whatever ZenML's cache holds (the step runs every time).
- Every registry call has bounded retries, and a create whose response was lost is found by
  content hash instead of repeated (`tracesft.registry.client`).
- Registrations, promotions and rollbacks run under the registry lock (`tracesft.registry.lock`),
  so racing commands leave one champion, and one version per content hash.
- The alias is the one record of the champion; its history is written before the alias moves
  and checked against it (`tracesft.registry.champion`).
- A version is created last, in one request that carries all its tags, after its files are
  uploaded: a registry that fails midway leaves no version, or a complete one that the next
  registration of the same adapter finds.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from tracesft.config import RegistrySettings
from tracesft.data.prompting import prompt_template
from tracesft.errors import TracesftError
from tracesft.evaluate.evaluation import EvalReport
from tracesft.registry.champion import (
    CHAMPION,
    ChampionChange,
    champion_stack,
    current_champion,
    move_champion,
    read_history,
    settle_history,
)
from tracesft.registry.client import RegistryClient, registry_client
from tracesft.registry.lock import registry_lock
from tracesft.train.adapter import LoraAdapter
from tracesft.train.tracking import mlflow_tracking

__all__ = ["CHAMPION", "ChampionChange", "champion_stack", "registry_client"]  # re-exported for callers of this module

CHALLENGER = "challenger"
CONTENT_HASH_TAG = "adapter_content_hash"
PROMPT_TEMPLATE_FILE = "prompt_template.json"
# The tags a version needs before anyone may call it evaluated.
EVALUATION_TAGS = ("base_f1", "finetuned_f1", "eval_set_hash")
_METRICS = ("f1", "precision", "recall", "accuracy", "parse_failure_rate")


class RegisteredVersion(BaseModel):
    name: str
    version: str
    run_id: str
    source: str
    content_hash: str = ""
    reused: bool = False  # found: an identical adapter was already registered as this version
    registry_uri: str = ""  # the registry it is in

    def describe(self) -> str:
        """"registered version 3" or "found version 3": what the run did to the registry."""
        return f"{'found' if self.reused else 'registered'} version {self.version}"


class PromotionDecision(BaseModel):
    name: str
    version: str
    promoted: bool
    reason: str
    finetuned_f1: float
    base_f1: float
    champion_version: str | None
    champion_f1: float | None
    f1_difference_ci_low: float | None = None


def eval_metrics(base: EvalReport, tuned: EvalReport) -> dict[str, float]:
    metrics = {}
    for prefix, report in (("base", base), ("finetuned", tuned)):
        metrics.update({f"{prefix}_{name}": float(getattr(report.scores, name)) for name in _METRICS})
    metrics["eval_problems"] = float(tuned.scores.n)
    return metrics


def register_adapter(
    adapter: LoraAdapter, metrics: dict[str, float], lineage: dict[str, str], settings: RegistrySettings
) -> RegisteredVersion:
    """Make sure the adapter is a version of the configured registry, with alias `challenger`.

    Found by content hash if it is there (`reused=True`; nothing is uploaded), else its files and
    scores go to its training run (or, when that run is in another registry, a new run) and a
    version is created.
    """
    content_hash = adapter.content_hash()
    name = settings.model_name
    with registry_client(settings) as client:
        _ensure_registered_model(client, name)
        existing = _version_with_content(client, name, content_hash)
        if existing is None:
            run_id, source = _upload(client, adapter, metrics, lineage, settings)
        tags = {**lineage, **_as_tags(metrics), CONTENT_HASH_TAG: content_hash}
        with registry_lock(client, name, settings.lock_lease_s) as lease:
            # Checked again under the lock: a concurrent registration may have won meanwhile.
            version = _version_with_content(client, name, content_hash)
            created = version is None
            if created:
                lease.check()
                version = client.create_once(
                    lambda: client.raw.create_model_version(name, source=source, run_id=run_id, tags=tags, await_creation_for=0),
                    lambda: _version_with_content(client, name, content_hash),
                )
            lease.check()
            client.set_registered_model_alias(name, CHALLENGER, version.version)
    return RegisteredVersion(
        name=name,
        version=str(version.version),
        run_id=version.run_id,
        source=version.source,
        content_hash=content_hash,
        reused=not created,
        registry_uri=client.uri,
    )


def _upload(
    client: RegistryClient, adapter: LoraAdapter, metrics: dict[str, float], lineage: dict[str, str], settings: RegistrySettings
) -> tuple[str, str]:
    """The adapter's files, scores and lineage logged to a run of this registry; returns the run id
    and the files' artifact URI.

    The training run when it is in this registry; a new run when training tracked elsewhere (the
    registry changed since, and ZenML served training from its cache).
    """
    from mlflow.entities import Metric, RunTag

    run_id = adapter.metadata.get("mlflow_run_id")
    new_run = not (run_id and _run_exists(client, run_id))
    if new_run:
        experiment_id = client.call(_experiment_id, settings)
        run_id = client.create_run(experiment_id, run_name="register-adapter").info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
        tags=[RunTag(key, value) for key, value in lineage.items()],
    )
    client.log_artifacts(run_id, str(adapter.path), artifact_path="adapter")
    client.log_dict(run_id, prompt_template(), f"adapter/{PROMPT_TEMPLATE_FILE}")
    if new_run:
        client.set_terminated(run_id)
    return run_id, f"{client.get_run(run_id).info.artifact_uri}/adapter"


def _run_exists(client: RegistryClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _experiment_id(settings: RegistrySettings) -> str:
    with mlflow_tracking(settings) as experiment_id:
        return experiment_id


def decide_promotion(
    finetuned_f1: float,
    base_f1: float,
    champion_f1: float | None,
    margin: float,
    f1_difference_ci_low: float | None = None,
) -> tuple[bool, str]:
    """The gate's rule: beat the base and the current champion, each by more than `margin`.

    `f1_difference_ci_low` is the lower bound of the confidence interval of (fine-tuned F1 minus
    base F1) over the eval set (a paired bootstrap); when given, it too must exceed `margin`, so
    a gain that the evaluation's noise could explain never promotes. The champion was scored on
    the same problems, but its per-problem predictions are not at hand here, so against it the
    point estimates are compared.
    """
    if finetuned_f1 <= base_f1 + margin:
        return False, f"fine-tuned F1 {finetuned_f1:.3f} does not beat base F1 {base_f1:.3f} by more than {margin}"
    if f1_difference_ci_low is not None and f1_difference_ci_low <= margin:
        return False, (
            f"fine-tuned F1 {finetuned_f1:.3f} beats base F1 {base_f1:.3f}, but the confidence interval of the gain "
            f"starts at {f1_difference_ci_low:.3f}, not above the margin {margin}: the gain may be noise"
        )
    if champion_f1 is not None and finetuned_f1 <= champion_f1 + margin:
        return False, f"fine-tuned F1 {finetuned_f1:.3f} does not beat champion F1 {champion_f1:.3f} by more than {margin}"
    ci = f" (gain CI from {f1_difference_ci_low:.3f})" if f1_difference_ci_low is not None else ""
    return True, f"fine-tuned F1 {finetuned_f1:.3f} beats base {base_f1:.3f}{ci}" + (
        f" and champion {champion_f1:.3f}" if champion_f1 is not None else " (no champion yet)"
    )


def incomparable_reason(candidate: dict[str, str], champion: dict[str, str], champion_version: str) -> str | None:
    """Why the candidate's scores cannot be set against the champion's, or None if they can.

    F1 on another eval set, or the gain of an adapter for another base model, says nothing about
    which adapter is better; the gate then refuses and leaves the choice to a person
    (`tracesft adapters promote VERSION --force`).
    """
    if _base_of(candidate) != _base_of(champion):
        return (
            f"the champion (version {champion_version}) adapts base model {_base_of(champion)}, this version "
            f"{_base_of(candidate)}: not comparable"
        )
    if candidate.get("eval_set_hash") != champion.get("eval_set_hash"):
        return (
            f"the champion (version {champion_version}) was scored on another eval set "
            f"(hash {str(champion.get('eval_set_hash'))[:12]}, this version {str(candidate.get('eval_set_hash'))[:12]}): "
            "its F1 is not comparable; re-evaluate both on one set, or promote by hand"
        )
    return None


def promote_if_better(
    registered: RegisteredVersion,
    metrics: dict[str, float],
    settings: RegistrySettings,
    f1_difference_ci_low: float | None = None,
) -> PromotionDecision:
    """The gate: move `champion` to `registered` if `decide_promotion` says so, and record why."""
    name = settings.model_name
    with registry_client(settings) as client, registry_lock(client, name, settings.lock_lease_s) as lease:
        history = settle_history(client, name, lease)
        candidate = dict(client.get_model_version(name, registered.version).tags)
        champion = current_champion(client, name)
        champion_f1 = float(champion.tags["finetuned_f1"]) if champion is not None else None
        champion_version = str(champion.version) if champion is not None else None
        if champion_version == registered.version:
            promoted, reason = False, f"version {registered.version} is already champion"
        elif champion is not None and (why := incomparable_reason(candidate, dict(champion.tags), champion_version)):
            promoted, reason = False, why
        else:
            promoted, reason = decide_promotion(
                metrics["finetuned_f1"], metrics["base_f1"], champion_f1, settings.promotion_margin, f1_difference_ci_low
            )
        if promoted:
            move_champion(client, lease, name, history, registered.version, "gate", reason)
    return PromotionDecision(
        name=registered.name,
        version=registered.version,
        promoted=promoted,
        reason=reason,
        finetuned_f1=metrics["finetuned_f1"],
        base_f1=metrics["base_f1"],
        champion_version=champion_version,
        champion_f1=champion_f1,
        f1_difference_ci_low=f1_difference_ci_low,
    )


def promote_version(settings: RegistrySettings, version: str, force: bool = False, reason: str = "") -> ChampionChange:
    """A person's promotion: make `version` champion.

    Refused, unless `force`, for a version without a completed evaluation (its base and
    fine-tuned F1 and eval-set hash) or one that adapts another base model than the champion.
    """
    name = settings.model_name
    with registry_client(settings) as client, registry_lock(client, name, settings.lock_lease_s) as lease:
        history = settle_history(client, name, lease)
        tags = dict(_get_version(client, name, version).tags)
        champion = current_champion(client, name)
        champion_version = str(champion.version) if champion is not None else None
        if champion_version == version:
            raise TracesftError(f"{name} version {version} is already champion; nothing to do.")
        missing = [tag for tag in EVALUATION_TAGS if tag not in tags]
        if missing and not force:
            raise TracesftError(
                f"{name} version {version} has no completed evaluation (missing tags {missing}); evaluate it through "
                "the pipeline, or pass --force to promote it anyway."
            )
        if champion is not None and _base_of(tags) != _base_of(dict(champion.tags)) and not force:
            raise TracesftError(
                f"{name} version {version} adapts base model {_base_of(tags)}, but the champion (version "
                f"{champion_version}) adapts {_base_of(dict(champion.tags))}; pass --force to switch base models."
            )
        return move_champion(client, lease, name, history, version, "promote", reason or "promoted by hand", force)


def rollback_champion(settings: RegistrySettings, reason: str = "") -> ChampionChange:
    """Give `champion` back to the version that held it before the current holder.

    The history is a stack: promotions push, rollbacks pop, so repeated rollbacks walk back
    through earlier champions, and a rollback with no earlier champion is refused.
    """
    name = settings.model_name
    with registry_client(settings) as client, registry_lock(client, name, settings.lock_lease_s) as lease:
        history = settle_history(client, name, lease)
        holders = champion_stack(history)
        champion = current_champion(client, name)
        current = str(champion.version) if champion is not None else None
        if not holders or holders[-1] != current:
            raise TracesftError(
                f"The champion history of {name} ends with {holders[-1] if holders else 'no champion'}, but alias "
                f"`champion` points at {current or 'nothing'} (moved outside tracesft?); set it with "
                "`tracesft adapters promote VERSION` instead."
            )
        if len(holders) < 2:
            raise TracesftError(f"{name} has no earlier champion than version {current} to roll back to.")
        return move_champion(client, lease, name, history, holders[-2], "rollback", reason or f"rolled back from version {current}")


def champion_history(settings: RegistrySettings) -> list[ChampionChange]:
    """Every change of `champion`, oldest first."""
    with registry_client(settings) as client:
        return read_history(client, settings.model_name)


def list_versions(settings: RegistrySettings) -> list[dict[str, Any]]:
    """Every registered version, newest first, with aliases, tags and the metrics of its run."""
    with registry_client(settings) as client:
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


def _ensure_registered_model(client: RegistryClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    if client.search_registered_models(filter_string=f"name = '{name}'"):
        return
    try:
        client.create_registered_model(name, description="LoRA adapters fine-tuned on verified Corr2Cause reasoning traces.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another registration created it meanwhile
            raise


def _version_with_content(client: RegistryClient, name: str, content_hash: str) -> Any | None:
    for version in client.search_model_versions(filter_string=f"name = '{name}'"):
        if version.tags.get(CONTENT_HASH_TAG) == content_hash:
            return version
    return None


def _get_version(client: RegistryClient, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TracesftError(f"{name} has no version {version!r}; see `tracesft adapters list`.") from None
        raise


def _base_of(tags: dict[str, str]) -> str:
    revision = tags.get("base_model_revision") or ""
    return f"{tags.get('base_model', '?')}{'@' + revision if revision else ''}"


def _as_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {name: f"{value:.6g}" for name, value in metrics.items()}
