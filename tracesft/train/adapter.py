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
FSDP_WRAPPER = "_fsdp_wrapped_module."  # the name FSDP1 gives the module it wraps
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's name for an adapter's tensors
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
            self._required(WEIGHTS_FILE)
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
    training with accelerate directly measures this very save. One process, or DDP where each
    rank holds the whole model: the model saves itself (PEFT's `save_pretrained`). FSDP: each rank
    holds a shard, so the ranks gather the trainable weights (`gathered_trainable_weights`) and
    rank 0 saves through the same `save_pretrained`, so both strategies write the same files
    (README.md, adapter_config.json, adapter_model.safetensors) with the same tensor names,
    dtypes and shapes (`benchmarks/multi_gpu.py --save-check` compares them).
    """
    model = accelerator.unwrap_model(prepared_model)
    if not fsdp:
        model.save_pretrained(adapter_dir)
        return
    weights = gathered_trainable_weights(prepared_model, accelerator.is_main_process)
    if accelerator.is_main_process:
        if not weights:
            raise RuntimeError("FSDP training left no trainable weights to save")
        # PEFT 0.21 picks an adapter's tensors by the module names of the model it saves, and strips
        # only a leading `_fsdp_wrapped_module.` from them, so under nested FSDP units it picks none.
        # It writes the config and model card; the gathered tensors then replace its empty weights
        # file, under the names it gives them (the adapter's name left out).
        from safetensors.torch import save_file

        model.save_pretrained(adapter_dir, state_dict={})
        adapter = f".{model.active_adapter}."
        save_file({name.replace(adapter, "."): tensor for name, tensor in weights.items()},
                  str(Path(adapter_dir) / WEIGHTS_FILE), metadata={"format": "pt"})
    accelerator.wait_for_everyone()


def gathered_trainable_weights(prepared_model: Any, main_process: bool) -> dict[str, Any]:
    """The full trainable (LoRA) tensors of an FSDP1 model, on the CPU of the main process (empty
    elsewhere), named as the unwrapped model names them. A collective: every rank must call it.

    Only the FSDP units that shard trainable parameters are summoned, one at a time
    (`summon_full_params(unit, recurse=False)`), so the 4-bit base is never gathered: PEFT's wrap
    policy gives every LoRA layer a unit of its own, and an FSDP1 unit's flat parameter is either
    all trainable or all frozen. Summoning the whole model, as this save did before, gathered the
    base too: on the 32B it took 23 s and grew rank 0 by 18 GiB of host memory. torch's
    `get_model_state_dict(ignore_frozen_params=True)` filters only after gathering everything,
    and `offload_to_cpu=True` frees what it summons when that already lives on the CPU
    (pytorch/pytorch#188989), so neither is used here.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    weights: dict[str, Any] = {}
    for unit_name, unit in prepared_model.named_modules():
        if not isinstance(unit, FullyShardedDataParallel):
            continue
        if not any(parameter.requires_grad for _, parameter in _sharded_by(unit)):
            continue
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if main_process:
                for name, parameter in _sharded_by(unit):
                    if parameter.requires_grad:
                        full_name = _without_wrapper_names(f"{unit_name}.{name}" if unit_name else name)
                        weights[full_name] = parameter.detach().to("cpu", copy=True)
    return weights


def _sharded_by(unit: Any) -> list[tuple[str, Any]]:
    """(name, parameter) of what one FSDP unit shards itself, leaving out its nested units'."""
    return [(name, parameter) for name, parameter in unit.module.named_parameters() if FSDP_WRAPPER not in name]


def _without_wrapper_names(key: str) -> str:
    for wrapper in (FSDP_WRAPPER, "_checkpoint_wrapped_module.", "_orig_mod."):
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
