"""Loading the base model and its tokenizer, the same way for training and evaluation.

`base_model` is a hub id or a local directory; both go through `from_pretrained`, so the demo's
locally built tiny model exercises the production loading code. With the run's `device` cuda and
`use_4bit` on, the base is loaded in 4-bit NF4 through bitsandbytes (QLoRA) with bf16 compute;
with `device` cpu the same code path loads it unquantised in fp32, since bitsandbytes' 4-bit
kernels need a GPU.

Quantising a 32B base from its bf16 shards costs minutes on every run; with
`quantized_base_cache` set, the 4-bit base is saved there once (safetensors, with its
quantisation state) and loaded directly afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from tracesft.config import Device, TrainingRecipe
from tracesft.device import require_device
from tracesft.errors import TracesftError

logger = logging.getLogger(__name__)


def quantization_config(recipe: TrainingRecipe, device: Device) -> Any | None:
    if not (recipe.use_4bit and device == "cuda"):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.use_double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # FSDP shards only floating-point tensors: FSDP-QLoRA packs the 4-bit weights in bf16.
        bnb_4bit_quant_storage=torch.bfloat16 if recipe.distributed.strategy == "fsdp_qlora" else torch.uint8,
    )


def load_tokenizer(base_model: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise _load_error(base_model, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    base_model: str,
    recipe: TrainingRecipe,
    device: Device,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    require_device(device)  # callers check earlier, with the config's name; this guards direct use
    quantization = quantization_config(recipe, device)
    cached = quantized_base_path(base_model, recipe, device, revision)
    if cached is not None and (cached / "config.json").exists():
        logger.info("Loading the 4-bit base from its cache %s.", cached)
        # The saved config records the quantisation too; passing it again makes sure the
        # bitsandbytes loader takes the packed 4-bit tensors as they are.
        return _from_pretrained(str(cached), None, quantization, device, attn_implementation)
    model = _from_pretrained(base_model, revision, quantization, device, attn_implementation)
    if cached is not None:
        save_quantized_base(model, cached)
    return model


def quantized_base_path(
    base_model: str, recipe: TrainingRecipe, device: Device, revision: str | None = None
) -> Path | None:
    """Where the 4-bit base of `base_model` is cached: one directory per model, revision and quantisation."""
    quantization = quantization_config(recipe, device)
    if recipe.quantized_base_cache is None or quantization is None:
        return None
    key = json.dumps([base_model, revision, quantization.to_dict()], sort_keys=True, default=str)
    name = f"{Path(base_model).name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return Path(recipe.quantized_base_cache) / name


def save_quantized_base(model: Any, path: Path) -> None:
    """Save a bitsandbytes 4-bit model; written beside and renamed, so a crash leaves no half cache."""
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    partial.rename(path)
    logger.info("Saved the 4-bit base to %s.", path)


def _from_pretrained(
    source: str, revision: str | None, quantization: Any, device: Device, attn_implementation: str | None
) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=False,
            **({"quantization_config": quantization} if quantization is not None else {}),
            dtype=torch.bfloat16 if device == "cuda" else torch.float32,
            # Each rank of a multi-GPU run has set its own GPU as the current device.
            device_map={"": torch.cuda.current_device()} if device == "cuda" else None,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None


def _load_error(base_model: str, err: Exception) -> TracesftError:
    return TracesftError(
        f"Could not load base model {base_model!r}: {err}. Give a local model directory, or a hub id on a "
        "machine that can reach the hub (set HF_TOKEN for gated models); for the embedded demo run "
        "`tracesft tiny-model .tracesft/tiny-model`."
    )
