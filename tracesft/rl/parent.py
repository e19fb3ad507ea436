"""Which registered adapter a GRPO run continues, resolved before the pipeline starts.

The configured `parent` is an alias (`champion` by default) or a version number. It is resolved to
a version number on the client, as the SFT pipeline hashes its input files there: the steps get
the number and the adapter's content hash, so ZenML's cache keys on what the alias pointed at
when the run started, and a moved `champion` reruns everything downstream.
"""

from __future__ import annotations

from pydantic import BaseModel

from tracesft.config import RegistrySettings
from tracesft.errors import TracesftError
from tracesft.registry.model_registry import CONTENT_HASH_TAG, list_versions


class ParentVersion(BaseModel):
    name: str
    version: str
    content_hash: str
    base_model: str
    base_model_revision: str | None
    zenml_run_id: str  # the pipeline run that registered it: where its eval problems are
    eval_set_hash: str


def resolve_parent(settings: RegistrySettings, parent: str, eval_set_hash: str) -> ParentVersion:
    """The registered version `parent` names, checked to be one a GRPO run can continue and compare."""
    versions = list_versions(settings)
    by_number = parent.isdigit()
    found = [v for v in versions if (v["version"] == parent if by_number else parent in v["aliases"])]
    if not found:
        known = ", ".join(f"{v['version']} {v['aliases']}" for v in versions) or "none registered"
        raise TracesftError(
            f"parameters.parent: {settings.model_name} has no {'version' if by_number else 'alias'} {parent!r} "
            f"(versions: {known}); train one with the SFT pipeline first (`tracesft demo`), or set parent to a "
            "version from `tracesft adapters list`."
        )
    version = found[0]
    tags = version["tags"]
    missing = [t for t in ("base_model", "zenml_run_id", "eval_set_hash", CONTENT_HASH_TAG) if t not in tags]
    if missing:
        raise TracesftError(
            f"parameters.parent: {settings.model_name} version {version['version']} lacks the lineage tags {missing} "
            "that a pipeline run registers; continue a version a pipeline registered."
        )
    if tags["eval_set_hash"] != eval_set_hash:
        raise TracesftError(
            f"parameters.eval_set: not the eval set {settings.model_name} version {version['version']} was scored on "
            f"(hash {eval_set_hash[:12]}, the version's {tags['eval_set_hash'][:12]}); point eval_set at that CSV, "
            "so the gate compares scores on the same problems."
        )
    return ParentVersion(
        name=settings.model_name,
        version=version["version"],
        content_hash=tags[CONTENT_HASH_TAG],
        base_model=tags["base_model"],
        base_model_revision=tags.get("base_model_revision") or None,
        zenml_run_id=tags["zenml_run_id"],
        eval_set_hash=tags["eval_set_hash"],
    )
