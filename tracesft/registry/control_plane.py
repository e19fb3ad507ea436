"""Mirroring the registry's story on the ZenML Model Control Plane.

MLflow's aliases decide what is served; ZenML's model versions (one per pipeline run) show the
same facts on the ZenML dashboard: lineage and scores as model-version metadata, and the stage
`production` for the version that holds `champion`, `staging` for one the gate declined. The
registry records which ZenML model version a registered adapter came from (tags
`zenml_model`, `zenml_model_version_id`), so promotions and rollbacks made later from the CLI
move the ZenML stage too.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

ZENML_MODEL_TAG = "zenml_model"
ZENML_MODEL_VERSION_TAG = "zenml_model_version"
ZENML_MODEL_VERSION_ID_TAG = "zenml_model_version_id"


def stage_for(promoted: bool) -> str:
    """`production` for the champion, `staging` for a version the gate registered but declined."""
    from zenml.enums import ModelStages

    return ModelStages.PRODUCTION.value if promoted else ModelStages.STAGING.value


def set_stage(model_name: str, model_version_id: str, stage: str) -> None:
    """Move a ZenML model version to `stage`; the version that held it before is archived."""
    from zenml.client import Client

    Client().update_model_version(model_name, UUID(model_version_id), stage=stage, force=True)


def mirror_champion(tags: dict[str, str]) -> str:
    """After a CLI promotion or rollback: put the new champion's ZenML model version in production.

    Returns what happened, for the CLI to print. Best effort by design: the registry is the
    source of truth, and a version registered outside a ZenML pipeline, or one whose ZenML store
    is not the one configured here, has nothing to mirror.
    """
    model, version_id = tags.get(ZENML_MODEL_TAG), tags.get(ZENML_MODEL_VERSION_ID_TAG)
    if not (model and version_id):
        return "ZenML: not mirrored (this version was not registered by a ZenML pipeline run with a model)"
    try:
        set_stage(model, version_id, stage_for(True))
    except (KeyError, ValueError, RuntimeError) as err:
        return f"ZenML: not mirrored (model version {version_id} of {model!r} not found in the active ZenML store: {err})"
    return f"ZenML: model {model!r} version {tags.get(ZENML_MODEL_VERSION_TAG, version_id)} is now in stage production"


def model_version_tags(model: Any) -> dict[str, str]:
    """Registry tags that point back at the ZenML model version of a pipeline run."""
    return {
        ZENML_MODEL_TAG: model.name,
        ZENML_MODEL_VERSION_TAG: str(model.number),
        ZENML_MODEL_VERSION_ID_TAG: str(model.id),
    }
