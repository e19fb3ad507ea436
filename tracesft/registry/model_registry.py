"""Registering adapters in the MLflow model registry, the promotion gate, promotion and rollback.

Aliases, not stages (stages are deprecated in MLflow 3): every new version gets `challenger`;
`champion` moves only when the gate measures a win, or when a person promotes or rolls back.
Lineage goes on the version as tags, the scores on its run as metrics, so
`models:/<name>@champion` always says where it came from.

Safety rules, all enforced here:
- Every change of `champion` happens under the registry lock (`registry_lock`) together with an
  entry in the champion history (registered-model tags `champion_history.NNNNNN`), so racing
  promotions leave one champion and a history whose last entry names it.
- A version is created last, in one request that carries all its tags, after its files are
  uploaded: a registry that fails midway leaves no version at all, or (if only the final alias
  step failed and the clean-up could not reach the server either) a complete version that the
  next registration of the same adapter picks up.
- The same adapter content (weights, config, tokenizer, prompt template) is registered once.
- MLflow's HTTP retries are bounded while a registry call runs (`tracking.bounded_http_retries`); when the
  server stays unreachable the caller gets a `TracesftError` that says so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel

from tracesft.train.adapter import LoraAdapter
from tracesft.config import RegistrySettings
from tracesft.errors import TracesftError
from tracesft.evaluate.evaluation import EvalReport
from tracesft.data.prompting import prompt_template
from tracesft.registry.lock import registry_lock
from tracesft.train.tracking import bounded_http_retries, mlflow_failure, mlflow_tracking, resolve_tracking_uri

CHALLENGER = "challenger"
CHAMPION = "champion"
CONTENT_HASH_TAG = "adapter_content_hash"
HISTORY_TAG_PREFIX = "champion_history."
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
    reused: bool = False  # an identical adapter was already registered as this version


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


class ChampionChange(BaseModel):
    """One entry of the champion history: who holds `champion` from `time` on, and why."""

    seq: int
    time: str  # ISO 8601, UTC
    action: Literal["gate", "promote", "rollback"]
    version: str
    previous: str | None
    reason: str
    forced: bool = False


def eval_metrics(base: EvalReport, tuned: EvalReport) -> dict[str, float]:
    metrics = {}
    for prefix, report in (("base", base), ("finetuned", tuned)):
        metrics.update({f"{prefix}_{name}": float(getattr(report.scores, name)) for name in _METRICS})
    metrics["eval_problems"] = float(tuned.scores.n)
    return metrics


def registration_hash(adapter: LoraAdapter) -> str:
    """What makes two registrations the same: the adapter's files and the prompt it expects."""
    template = json.dumps(prompt_template(), sort_keys=True)
    return hashlib.sha256(f"{adapter.content_hash()}\n{template}".encode()).hexdigest()


@contextmanager
def registry_client(settings: RegistrySettings) -> Iterator[Any]:
    """An `MlflowClient` on the configured registry, with bounded HTTP retries while the block runs;
    MLflow failures become one clear error."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(settings)
    with bounded_http_retries():
        try:
            yield MlflowClient(tracking_uri=uri, registry_uri=uri)
        except MlflowException as err:
            raise mlflow_failure(uri, err) from None


def register_adapter(
    adapter: LoraAdapter, metrics: dict[str, float], lineage: dict[str, str], settings: RegistrySettings
) -> RegisteredVersion:
    """Log the adapter's files and scores to its training run and register them as a new version.

    An adapter whose content is already registered is not registered again: its version is
    returned (`reused=True`) and gets `challenger` back.
    """
    import mlflow

    content_hash = registration_hash(adapter)
    name = settings.model_name
    with registry_client(settings) as client:
        _ensure_registered_model(client, name)
        existing = _version_with_content(client, name, content_hash)
        run_id = adapter.metadata.get("mlflow_run_id")
        with (
            mlflow_tracking(settings) as experiment_id,
            mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run,
        ):
            mlflow.log_metrics(metrics)
            mlflow.set_tags(lineage)
            if existing is None:
                mlflow.log_artifacts(str(adapter.path), artifact_path="adapter")
                mlflow.log_dict(prompt_template(), f"adapter/{PROMPT_TEMPLATE_FILE}")
            source = f"{run.info.artifact_uri}/adapter"
        tags = {**lineage, **_as_tags(metrics), CONTENT_HASH_TAG: content_hash}
        with registry_lock(client, name):
            # Checked again under the lock: a concurrent registration may have won meanwhile.
            existing = _version_with_content(client, name, content_hash)
            if existing is None:
                version = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
            else:
                version = existing
            try:
                client.set_registered_model_alias(name, CHALLENGER, version.version)
            except Exception:
                if existing is None:
                    _delete_quietly(client, name, version.version)
                raise
    return RegisteredVersion(
        name=name,
        version=str(version.version),
        run_id=version.run_id,
        source=version.source,
        content_hash=content_hash,
        reused=existing is not None,
    )


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
    with registry_client(settings) as client, registry_lock(client, name):
        candidate = dict(client.get_model_version(name, registered.version).tags)
        champion = _version_by_alias(client, name, CHAMPION)
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
            _move_champion(client, name, registered.version, champion_version, "gate", reason)
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
    with registry_client(settings) as client, registry_lock(client, name):
        tags = dict(_get_version(client, name, version).tags)
        champion = _version_by_alias(client, name, CHAMPION)
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
        return _move_champion(client, name, version, champion_version, "promote", reason or "promoted by hand", force)


def rollback_champion(settings: RegistrySettings, reason: str = "") -> ChampionChange:
    """Give `champion` back to the version that held it before the current holder.

    The history is a stack: promotions push, rollbacks pop, so repeated rollbacks walk back
    through earlier champions, and a rollback with no earlier champion is refused.
    """
    name = settings.model_name
    with registry_client(settings) as client, registry_lock(client, name):
        history = _read_history(client, name)
        holders = champion_stack(history)
        champion = _version_by_alias(client, name, CHAMPION)
        current = str(champion.version) if champion is not None else None
        if not holders or holders[-1] != current:
            raise TracesftError(
                f"The champion history of {name} ends with {holders[-1] if holders else 'no champion'}, but alias "
                f"`champion` points at {current or 'nothing'} (moved outside tracesft?); set it with "
                "`tracesft adapters promote VERSION` instead."
            )
        if len(holders) < 2:
            raise TracesftError(f"{name} has no earlier champion than version {current} to roll back to.")
        return _move_champion(client, name, holders[-2], current, "rollback", reason or f"rolled back from version {current}")


def champion_stack(history: list[ChampionChange]) -> list[str]:
    """The versions that held `champion`, oldest first, with rolled-back reigns removed."""
    holders: list[str] = []
    for change in history:
        if change.action == "rollback":
            holders.pop()
        else:
            holders.append(change.version)
    return holders


def champion_history(settings: RegistrySettings) -> list[ChampionChange]:
    """Every change of `champion`, oldest first."""
    with registry_client(settings) as client:
        return _read_history(client, settings.model_name)


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


def _move_champion(
    client: Any, name: str, version: str, previous: str | None, action: str, reason: str, forced: bool = False
) -> ChampionChange:
    """Point `champion` at `version` and append the history entry; the caller holds the lock."""
    history = _read_history(client, name)
    change = ChampionChange(
        seq=(history[-1].seq + 1) if history else 1,
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        action=action,
        version=version,
        previous=previous,
        reason=reason,
        forced=forced,
    )
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, f"{HISTORY_TAG_PREFIX}{change.seq:06d}", change.model_dump_json())
    return change


def _read_history(client: Any, name: str) -> list[ChampionChange]:
    tags = client.get_registered_model(name).tags
    return [ChampionChange.model_validate_json(tags[key]) for key in sorted(tags) if key.startswith(HISTORY_TAG_PREFIX)]


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    if client.search_registered_models(filter_string=f"name = '{name}'"):
        return
    try:
        client.create_registered_model(name, description="LoRA adapters fine-tuned on verified Corr2Cause reasoning traces.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another registration created it meanwhile
            raise


def _version_with_content(client: Any, name: str, content_hash: str) -> Any | None:
    for version in client.search_model_versions(filter_string=f"name = '{name}'"):
        if version.tags.get(CONTENT_HASH_TAG) == content_hash:
            return version
    return None


def _get_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TracesftError(f"{name} has no version {version!r}; see `tracesft adapters list`.") from None
        raise


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such alias (yet); anything else, an unreachable server above all, is raised
        raise


def _delete_quietly(client: Any, name: str, version: str) -> None:
    """Undo a version whose registration failed after its creation; the server may be gone too."""
    try:
        client.delete_model_version(name, version)
    except Exception:  # the original failure is what the user needs to see
        pass


def _base_of(tags: dict[str, str]) -> str:
    revision = tags.get("base_model_revision") or ""
    return f"{tags.get('base_model', '?')}{'@' + revision if revision else ''}"


def _as_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {name: f"{value:.6g}" for name, value in metrics.items()}
