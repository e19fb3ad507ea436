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

from tracesft.errors import TracesftError

METADATA_FILE = "tracesft_adapter.json"
# adapter_config.json fields that do not change what the adapter computes: where the base model
# was found, PEFT's version, and how training started (initialisation, dropout).
ADAPTER_CONFIG_NOT_HASHED = frozenset({
    "base_model_name_or_path", "revision", "inference_mode", "peft_version", "lora_dropout", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "auto_mapping", "megatron_config", "megatron_core",
})


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
        """SHA-256 of what decides the adapter's function, in a canonical form.

        Two trainings that give the same weights must hash the same, or the registry keeps two
        versions of one adapter (it did: `target_modules` is a set that PEFT writes in any order).
        So the hash covers the adapter config's fields that shape the function, keys and lists
        sorted, and each tensor's name, dtype, shape and bytes, in name order (not the
        safetensors file, whose header order and metadata may vary). Left out: the lineage
        file, the tokenizer (the base model's, named in the lineage) and config fields that
        only describe where the base lives or how training started (`ADAPTER_CONFIG_NOT_HASHED`).
        """
        digest = hashlib.sha256()
        config = json.loads(self._required("adapter_config.json").read_text())
        kept = {key: value for key, value in config.items() if key not in ADAPTER_CONFIG_NOT_HASHED}
        digest.update(json.dumps(_canonical(kept), sort_keys=True, separators=(",", ":")).encode())
        weights = sorted(self.path.rglob("*.safetensors"))
        if not weights:
            self._required("adapter_model.safetensors")
        for path in weights:
            for name, dtype, shape, data in _safetensors_tensors(path):
                digest.update(json.dumps([name, dtype, shape]).encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def _required(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise TracesftError(f"adapter folder {self.path} has no {name}; save the adapter with PEFT's save_pretrained")
        return path


def write_metadata(path: Path, metadata: dict[str, Any]) -> LoraAdapter:
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return LoraAdapter(path)


def save_adapter(trainer: Any, adapter_dir: Path) -> None:
    """Write the trained LoRA weights a Trainer holds to `adapter_dir` (see `save_prepared_adapter`)."""
    save_prepared_adapter(trainer.accelerator, trainer.model_wrapped, adapter_dir,
                          fsdp=getattr(trainer, "is_fsdp_enabled", False))


def save_prepared_adapter(accelerator: Any, prepared_model: Any, adapter_dir: Path, fsdp: bool) -> None:
    """Write the trained LoRA weights of an `accelerator.prepare`d PEFT model to `adapter_dir`.

    Takes the accelerator and the prepared model rather than a Trainer so that a benchmark
    training with accelerate directly measures this very save. Under FSDP each rank holds a
    shard. FSDP-QLoRA's gathered state dict leaves the LoRA weights out (on 2 GPUs it held the
    base's 55 tensors and no adapter), so the full parameters are summoned instead, into rank 0's
    CPU memory, and rank 0 writes the LoRA ones. Otherwise (one process, or DDP where each rank
    holds the whole model) the model saves itself.
    """
    model = accelerator.unwrap_model(prepared_model)
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(prepared_model, writeback=False, rank0_only=True, offload_to_cpu=True):
            if accelerator.is_main_process:
                weights = {_without_wrapper_names(name): parameter.detach().cpu().clone()
                           for name, parameter in model.named_parameters() if "lora_" in name}
                if not weights:
                    raise RuntimeError("FSDP training left no LoRA weights to save")
                _write_adapter(model, weights, Path(adapter_dir))
        accelerator.wait_for_everyone()
    else:
        model.save_pretrained(adapter_dir)


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


def _canonical(value: Any) -> Any:
    """`value` with every list sorted (in the adapter config, lists are sets: target modules, layers)."""
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
    return value


def _safetensors_tensors(path: Path) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, raw bytes) of each tensor, read as the safetensors format defines it:
    an 8-byte little-endian header length, a JSON header, then the data."""
    blob = path.read_bytes()
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
        start = 8 + size
        return [
            (name, info["dtype"], info["shape"], blob[start + info["data_offsets"][0] : start + info["data_offsets"][1]])
            for name, info in sorted(header.items())
            if name != "__metadata__"
        ]
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise TracesftError(f"{path} is not a readable safetensors file ({err}); save the adapter again") from None
