"""ZenML materializers for the project's own artifact types."""

from materializers.lora_adapter_materializer import LoraAdapterMaterializer

__all__ = ["LoraAdapterMaterializer"]
