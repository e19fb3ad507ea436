"""Stores a `LoraAdapter` directory in the artifact store, whatever the store is (local, S3, GCS).

Files are copied one by one through ZenML's file I/O, so a remote orchestrator's steps read the
adapter from the shared artifact store, never from a path on the training machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.materializers.base_materializer import BaseMaterializer
from zenml.utils import io_utils

from tracesft.train.adapter import LoraAdapter


class LoraAdapterMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (LoraAdapter,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def load(self, data_type: type[Any]) -> LoraAdapter:
        with self.get_temporary_directory(delete_at_exit=False) as local:
            io_utils.copy_dir(os.path.join(self.uri, "adapter"), local)
            return LoraAdapter(Path(local))

    def save(self, data: LoraAdapter) -> None:
        io_utils.copy_dir(str(data.path), os.path.join(self.uri, "adapter"))

    def extract_metadata(self, data: LoraAdapter) -> dict[str, Any]:
        metadata = data.metadata
        training = metadata.get("training", {})
        return {
            "base_model": metadata.get("base_model", ""),
            "traces_content_hash": metadata.get("traces_content_hash", ""),
            "train_loss": training.get("train_loss"),
            "files": len(data.files()),
            "size_bytes": data.size_bytes(),
        }
