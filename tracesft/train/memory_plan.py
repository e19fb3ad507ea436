"""How many decoder layers may keep their activations instead of being recomputed: an estimate of the peak.

With gradient checkpointing every decoder layer keeps only its input in forward and runs its
forward again in backward, about a third of the layer's compute spent twice. The production
recipe peaks near 25-27 GiB on the 32B (BENCHMARKS.md), far below a GPU's memory, so within
`training.memory_budget_gib` some layers can keep what their backward needs and skip that
recompute. This module answers how many, from the model's shape and the recipe alone; it loads
nothing, so the benchmark, the tests and the training step get the same numbers.

Which layers: the last ones. Backward meets them first, so their activations are freed before
any checkpointed layer is recomputed; the peak, at the start of backward, holds the kept layers'
activations and not a recomputed layer's beside them. The estimate adds both all the same (the
safety margin below), and a headroom for the allocator's fragmentation on top.

The terms, in bytes, for a Qwen2/Llama decoder layer (hidden h, intermediate m, q heads n, KV
heads k of width d = h / n), a row of T tokens, activations of `activation_bytes` each (bf16: 2),
LoRA of rank r with dropout, as the shipped path trains it (bitsandbytes' 4-bit matmul and a
frozen linear save no input; Liger's RMSNorm keeps its input, its SwiGLU the two gate inputs; the
varlen flash kernel keeps q, k, v, its output and one fp32 log-sum-exp per head):
- base weights: the loaded model's parameters and buffers (`get_memory_footprint`: NF4 blocks, bf16
  embeddings and LM head; bitsandbytes' block scales, ~0.45 GiB on the 32B, are left to the headroom).
- LoRA: r x (in + out) parameters per targeted projection and layer, each with its gradient and
  optimizer state (paged 8-bit AdamW: 2 bytes; AdamW: twice the parameter's bytes).
- checkpointed layer inputs: h x T per layer, every layer (a kept layer's input is the same tensor).
- a kept layer's activations, per token: q (h), k and v (2kd), attention output (h), the second
  norm's input (h), gate and up (2m) at `activation_bytes`, plus 4n (log-sum-exp) and 8 (two
  norms' fp32 inverse RMS); and per LoRA target: its input again, copied by dropout, with a
  1-byte mask (without dropout, one shared input per distinct tensor), and the r-wide A output.
  On the 32B at bf16: ~321 kB a token, ~2.4 GiB for a row of 8,192; LoRA dropout is over half.
- one recomputed layer: its activations again, plus its backward's gradient tensors (2m + 4h).
- LM head: TRL's chunked log-probabilities keep the final hidden state (h) and an fp32 gradient of
  it (4h bytes) per token, and one tile of `LM_HEAD_TOKEN_TILE` tokens x `LM_HEAD_VOCAB_TILE`.
- allocator headroom: `HEADROOM` of the sum.

It is an estimate, to be calibrated against a measured peak on a GPU (`benchmarks/train_throughput.py
--budgets` records both). With every layer recomputed on the 32B it gives, before headroom, 24.7 GiB
for rows of 5,391 tokens and 27.7 GiB for 8,192, where 24.1 and 26.9 GiB were measured on an H200
(BENCHMARKS.md); the headroom is the margin beyond that. On the CPU, activations are float32 and
HF's RMSNorm and SwiGLU stand in for Liger's; the plan is applied the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, computed_field

from tracesft.train.recompute_weights import LAST_PROJECTION

GIB = 2**30
# TRL 1.16's chunked LM head (`trl.kernels.chunked_logprob`): tokens and vocabulary entries per tile.
LM_HEAD_TOKEN_TILE = 4096
LM_HEAD_VOCAB_TILE = 32768
HEADROOM = 0.10  # of the estimate, for the allocator's fragmentation and what the terms miss


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Qwen2/Llama-style decoder the estimate reads."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> "DecoderShape":
        """From a transformers config (`Qwen2Config`, `LlamaConfig`, ...)."""
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, config.vocab_size)

    def projection_sizes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection LoRA may target."""
        kv = self.kv_heads * (self.hidden // self.heads)
        h, m = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


# Projections that read the same tensor: without dropout their LoRA A matrices share one saved input.
_SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                 "o_proj": "attention output", "gate_proj": "mlp input", "up_proj": "mlp input",
                 "down_proj": "mlp activation"}


class MemoryPlan(BaseModel):
    """How many layers keep their activations, and the estimated peak with each of its terms."""

    kept_layers: int
    layers: int
    budget_gib: float
    terms_bytes: dict[str, int]  # the estimate's terms with `kept_layers` kept

    @computed_field
    @property
    def estimated_peak_gib(self) -> float:
        return round(sum(self.terms_bytes.values()) / GIB, 2)

    @property
    def recomputed_layers(self) -> int:
        return self.layers - self.kept_layers


def lora_parameter_count(shape: DecoderShape, rank: int, targets: list[str]) -> int:
    """LoRA's trainable parameters: r x (in + out) for each targeted projection of every layer."""
    sizes = shape.projection_sizes()
    return shape.layers * sum(rank * sum(sizes[name]) for name in targets if name in sizes)


def recompute_kept_weights(shape: DecoderShape, targets: list[str]) -> int:
    """Weight elements a layer's recompute dequantises and keeps for the targeted projections
    (`tracesft.train.recompute_weights`): all but the last, whose base product it never reaches."""
    sizes = shape.projection_sizes()
    return sum(n_in * n_out for name, (n_in, n_out) in sizes.items() if name in targets and name != LAST_PROJECTION)


def kept_layer_bytes_per_token(shape: DecoderShape, rank: int, targets: list[str], dropout: float,
                               activation_bytes: int) -> int:
    """What one layer keeps for its backward when it is not checkpointed, per token, its input aside."""
    h, m, a = shape.hidden, shape.intermediate, activation_bytes
    kv = shape.kv_heads * (h // shape.heads)
    attention = (h + 2 * kv + h) * a + 4 * shape.heads  # q, k, v, output; fp32 log-sum-exp per head
    norms = h * a + 2 * 4  # the second norm's input (the first's is the layer input); fp32 inverse RMS
    mlp = 2 * m * a  # gate and up, kept by SwiGLU
    sizes = {name: size for name, size in shape.projection_sizes().items() if name in targets}
    if dropout > 0:  # each target's own dropped-out copy of its input, and the mask
        lora_inputs = sum(n_in * (a + 1) for n_in, _ in sizes.values())
    else:  # A reads the tensor itself; count each tensor once
        lora_inputs = sum({_SHARED_INPUT[name]: n_in * a for name, (n_in, _) in sizes.items()}.values())
    return attention + norms + mlp + lora_inputs + len(sizes) * rank * a


def plan_memory(
    shape: DecoderShape,
    row_tokens: int,
    lora_rank: int,
    lora_targets: list[str],
    lora_dropout: float,
    base_weight_bytes: int,
    budget_gib: float,
    activation_bytes: int = 2,
    lora_parameter_bytes: int = 2,
    optimizer_state_bytes: int = 2,
    kept_weight_bytes: int = 0,
) -> MemoryPlan:
    """The most layers (from the last) that can keep their activations with the estimated peak within the budget.

    `row_tokens` is the tokens of one forward: the packed row length, or batch x max_seq_length
    unpacked. `optimizer_state_bytes` is per trainable parameter (paged 8-bit AdamW: 2).
    `kept_weight_bytes` is per element of a targeted projection's weight that a recompute keeps
    dequantised for its backward (`tracesft.train.recompute_weights`; 0 where none is kept).
    Never fewer than 0 layers (the fixed terms alone may exceed the budget) nor more than all.
    """
    per_token_kept = kept_layer_bytes_per_token(shape, lora_rank, lora_targets, lora_dropout, activation_bytes)
    backward_gradients = (2 * shape.intermediate + 4 * shape.hidden) * activation_bytes
    lora = lora_parameter_count(shape, lora_rank, lora_targets)
    head_tile = min(row_tokens, LM_HEAD_TOKEN_TILE) * min(shape.vocab, LM_HEAD_VOCAB_TILE) * activation_bytes
    fixed = {
        "base_weights": base_weight_bytes,
        "lora_parameters_gradients_optimizer": lora * (2 * lora_parameter_bytes + optimizer_state_bytes),
        "checkpointed_layer_inputs": shape.layers * row_tokens * shape.hidden * activation_bytes,
        "recomputed_layer": row_tokens * (per_token_kept + backward_gradients)
        + recompute_kept_weights(shape, lora_targets) * kept_weight_bytes,
        "lm_head": row_tokens * shape.hidden * (activation_bytes + 4) + head_tile,
    }
    per_layer = row_tokens * per_token_kept
    budget = budget_gib * GIB / (1 + HEADROOM)
    kept = max(0, min(shape.layers, int((budget - sum(fixed.values())) // per_layer)))
    terms = fixed | {"kept_layer_activations": kept * per_layer}
    terms["allocator_headroom"] = round(HEADROOM * sum(terms.values()))
    return MemoryPlan(kept_layers=kept, layers=shape.layers, budget_gib=budget_gib, terms_bytes=terms)
