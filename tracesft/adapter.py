"""The trained adapter as a directory of files, plus what is known about how it was made.

The directory holds what `PeftModel.from_pretrained` needs (adapter weights in safetensors and
the adapter config), the tokenizer files (so the chat template travels with the weights) and
`tracesft_adapter.json` with lineage. ZenML stores it through `materializers/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA_FILE = "tracesft_adapter.json"


@dataclass(frozen=True)
class LoraAdapter:
    path: Path

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads((self.path / METADATA_FILE).read_text())

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def content_hash(self) -> str:
        """SHA-256 over the files that make the model (weights, adapter config, tokenizer).

        The lineage file is left out: it records when and by which run the adapter was made, so
        two trainings that produce byte-identical weights hash the same and the registry keeps
        one version for them.
        """
        digest = hashlib.sha256()
        for path in self.files():
            relative = path.relative_to(self.path).as_posix()
            if relative == METADATA_FILE:
                continue
            digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()


def write_metadata(path: Path, metadata: dict[str, Any]) -> LoraAdapter:
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return LoraAdapter(path)


def save_adapter(trainer: Any, adapter_dir: Path) -> None:
    """Write the trained LoRA weights to `adapter_dir`, from whatever holds them.

    Under FSDP each rank holds a shard, so every rank must take part in gathering the full state
    dict, and only rank 0 writes it. Otherwise (one process, or DDP where each rank holds the
    whole model) the model saves itself.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        accelerator = trainer.accelerator
        state_dict = accelerator.get_state_dict(trainer.model_wrapped)
        if accelerator.is_main_process:
            accelerator.unwrap_model(trainer.model).save_pretrained(adapter_dir, state_dict=state_dict)
        accelerator.wait_for_everyone()
    else:
        trainer.model.save_pretrained(adapter_dir)
