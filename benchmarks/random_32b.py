"""DeepSeek-R1-Distill-Qwen-32B's architecture with random weights: the model every GPU benchmark measures.

Speed and memory do not depend on the values of the weights, and a benchmark should need no hub:
the model is built on the meta device and each linear layer is materialised on its device (and
quantised to NF4 there, as the recipe's loader would) one at a time, so the 32B's 64 layers take
seconds and never exist in bf16 all at once. One builder for all benchmarks, so they all measure
the same model.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tracesft.config import TrainingRecipe


def qwen2_config(tiny: bool, layers: int = 64) -> Any:
    """The 32B's configuration with `layers` decoder layers, or a tiny Qwen2 a CPU trains in seconds."""
    from transformers import Qwen2Config

    if tiny:
        sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    else:  # DeepSeek-R1-Distill-Qwen-32B
        sizes = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=layers, num_attention_heads=40,
                     num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072)
    config = Qwen2Config(**sizes, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return config


def random_base(config: Any, device: torch.device, dtype: torch.dtype, quantization: Any | None,
                generator: torch.Generator) -> nn.Module:
    """`Qwen2ForCausalLM(config)` with random weights on `device`; linear layers in NF4 as the
    `BitsAndBytesConfig` `quantization` says, or plain `dtype` without one.

    The model is not marked as loaded in 4-bit (`from_pretrained` would mark it): PEFT then wraps
    its NF4 layers in its plain LoRA layer, not the bitsandbytes one.
    """
    import bitsandbytes as bnb
    from transformers import Qwen2ForCausalLM

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype) * std

    # Residual-branch outputs scaled by 1/sqrt(2 x layers), as GPT-2 and Megatron initialise them:
    # with 0.02 everywhere a random 64-layer stack is chaotic, and bf16 rounding differences between
    # any two kernels grow to ~10% of the logits (the seed path against itself, too).
    residual_std = 0.02 / (2 * config.num_hidden_layers) ** 0.5

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                weight = randn(child.out_features, child.in_features, std=residual_std if name in ("o_proj", "down_proj") else 0.02)
                if quantization is None:
                    child.weight = nn.Parameter(weight, requires_grad=False)
                else:
                    quantized = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=dtype,
                        compress_statistics=quantization.bnb_4bit_use_double_quant,
                        quant_type=quantization.bnb_4bit_quant_type,
                        quant_storage=quantization.bnb_4bit_quant_storage, device="meta",
                    )
                    # `module=` keeps the quantisation state on the layer too, where bitsandbytes finds it
                    # again after FSDP has flattened the weight into a plain tensor.
                    quantized.weight = bnb.nn.Params4bit(
                        weight, requires_grad=False, compress_statistics=quantization.bnb_4bit_use_double_quant,
                        quant_type=quantization.bnb_4bit_quant_type,
                        quant_storage=quantization.bnb_4bit_quant_storage, module=quantized,
                    ).to(device)
                    setattr(parent, name, quantized)
                    child = quantized
                if child.bias is not None:
                    child.bias = nn.Parameter(randn(child.out_features), requires_grad=False)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.is_meta:
                value = torch.ones(parameter.shape, device=device, dtype=dtype) if "norm" in type(module).__name__.lower() else randn(*parameter.shape)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    with torch.device(device):  # its buffers are computed, not loaded; the signature varies across versions
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def build_seed_model(config: Any, device: torch.device, dtype: torch.dtype, recipe: TrainingRecipe, seed: int) -> nn.Module:
    """The seed's decoding model: the random NF4 base with the recipe's LoRA around it, B random
    (a trained adapter is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    generator = torch.Generator(device=device).manual_seed(seed)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
                             bnb_4bit_use_double_quant=recipe.use_double_quant, bnb_4bit_compute_dtype=dtype)
    model = random_base(config, device, dtype, nf4, generator)
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(False)
                parameter.copy_(torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32).to(parameter.dtype) * 0.02)
    return model.eval()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training-side GPU benchmark takes: the stack's depth and where its random
    base (and that base's 4-bit cache) is written."""
    parser.add_argument("--layers", type=int, default=64, help="decoder layers of the 32B architecture (64)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the random base and its 4-bit cache are written (~18 GB; default: a temporary directory)")


def runs_tiny(asked: bool) -> bool:
    """Whether to run the tiny CPU check: when asked, or when no CUDA device is visible (said so)."""
    tiny = asked or not torch.cuda.is_available()
    if tiny and not asked:
        print("No CUDA device: running the --tiny CPU check instead.")
    if tiny:
        torch.set_num_threads(1)  # a 128-wide model gains nothing from threads and suffers on a shared CPU
    return tiny


def library_versions() -> dict[str, str]:
    """The versions a GPU figure depends on, as installed (absent ones left out), for every benchmark's JSON."""
    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
