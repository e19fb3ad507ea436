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

    Under FSDP each rank holds a shard. FSDP-QLoRA's gathered state dict leaves the LoRA weights
    out (on 2 GPUs it held the base's 55 tensors and no adapter), so the full parameters are
    summoned instead, into rank 0's CPU memory, and rank 0 writes the LoRA ones. Otherwise (one
    process, or DDP where each rank holds the whole model) the model saves itself.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        from torch.distributed.fsdp import FullyShardedDataParallel

        accelerator = trainer.accelerator
        model = accelerator.unwrap_model(trainer.model)
        with FullyShardedDataParallel.summon_full_params(trainer.model_wrapped, writeback=False, rank0_only=True, offload_to_cpu=True):
            if accelerator.is_main_process:
                weights = {_without_wrapper_names(name): parameter.detach().cpu().clone()
                           for name, parameter in model.named_parameters() if "lora_" in name}
                if not weights:
                    raise RuntimeError("FSDP training left no LoRA weights to save")
                _write_adapter(model, weights, Path(adapter_dir))
        accelerator.wait_for_everyone()
    else:
        trainer.model.save_pretrained(adapter_dir)


def _write_adapter(model: Any, weights: dict[str, Any], adapter_dir: Path) -> None:
    """The files `PeftModel.from_pretrained` reads, written directly: PEFT's `save_pretrained`
    filtered these summoned weights down to nothing on 2 GPUs."""
    from safetensors.torch import save_file

    adapter = model.active_adapter
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file({name.replace(f".{adapter}.", "."): tensor.contiguous() for name, tensor in weights.items()},
              str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(str(adapter_dir))


def _without_wrapper_names(key: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        key = key.replace(wrapper, "")
    return key
