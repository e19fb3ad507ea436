from typing import Annotated

from zenml import log_metadata, step

from tracesft.config import RegistrySettings, TrainingRecipe
from tracesft.registry.serving import download_registered_adapter
from tracesft.rl.grpo import parent_recipe
from tracesft.train.adapter import LoraAdapter

from steps.scratch import scratch_directory


@step
def load_parent_adapter(
    version: str, content_hash: str, registry: RegistrySettings
) -> tuple[Annotated[LoraAdapter, "parent_adapter"], Annotated[TrainingRecipe, "parent_recipe"]]:
    """The registered adapter GRPO continues, and the recipe its base is loaded with.

    `content_hash` (the version's `adapter_content_hash` tag, read by the pipeline) keys the cache
    on the adapter's files, not only on a version number a fresh registry would reuse.
    """
    scratch = scratch_directory("tracesft-parent-")
    adapter, number = download_registered_adapter(registry.model_name, version=version, settings=registry, dst=scratch)
    log_metadata({"parent_version": number, "adapter_content_hash": content_hash})
    return adapter, parent_recipe(adapter)
