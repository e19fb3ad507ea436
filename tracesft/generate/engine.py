"""Continuous batching: every decoding slot busy until the queue is empty, each step one graph launch.

Why a hand-written engine: evaluation generates up to 2,048 tokens for each of ~1,200 prompts,
and reasoning answers range from a few hundred tokens to the limit. Static batches (HF
`generate`) run every batch to its longest answer; transformers' own continuous batching
(`generate_batch`) and its compiled static cache were measured slower than plain eager
`generate` on the 32B architecture (BENCHMARKS.md), and no maintained engine with paged
attention (vLLM, SGLang) installs beside this project's pinned torch. So:

- **Slots.** The KV cache is one static tensor per layer, `slots x max_len` positions. A
  request owns a slot from its prefill until its answer ends, then the next request in the
  queue takes the slot (refill), so the GPU always decodes a full batch.
- **Attention for decode.** On CUDA, FlashAttention's variable-length kernel
  (`aten._flash_attention_forward`) reads each slot only up to its own length (`seqused_k`):
  no padding is attended, and every step has the same shapes. On the CPU, SDPA with a
  length mask (the same arithmetic, slower).
- **CUDA graphs.** With static shapes the whole decode step (64 layers, ~5,000 kernels on the
  32B) is captured once and replayed: the per-operation CPU cost that bound the eager path
  (cuDNN attention alone planned ~5 ms per call at decode) is gone.
- **Prefill** runs eagerly, packed (no padding), several new requests per call, and writes their
  keys and values into their slots. Refills wait until an eighth of the slots are free, so one
  prefill call serves several requests.
- **Exactness.** The model's own modules compute everything except attention: its norms,
  rotary embedding, projections (the unmerged LoRA of `inference.LoraLinear` included), MLP and
  head. Greedy outputs equal HF `generate` one prompt at a time (tests/test_engine.py).

Supported: decoder-only models with Llama's layer layout (Qwen2, Llama, Mistral), full attention.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")
# Refill when this share of the slots is free: one prefill call then serves several requests.
REFILL_FRACTION = 1 / 8
# Prompt tokens per prefill call: bounds the prefill's activations (the 32B's MLP: ~0.45 GB per
# 8k rows and tensor), which is memory the KV cache cannot have.
PREFILL_TOKENS = 8_192

Finished = Callable[[int, list[int]], None]


def supports(model: nn.Module) -> bool:
    """Whether the engine can decode `model` (otherwise callers fall back to HF `generate`)."""
    config = model.config
    sliding = getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    return config.model_type in SUPPORTED_MODEL_TYPES and not sliding


@dataclass
class Sampling:
    """Greedy when `temperature` is None; else temperature and nucleus (top-p) sampling."""

    temperature: float | None = None
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature is None:
            return logits.argmax(dim=-1)
        probabilities = torch.softmax(logits.float() / self.temperature, dim=-1)
        sorted_p, order = probabilities.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > self.top_p  # tokens past the nucleus
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=self.generator)
        return order.gather(-1, choice).squeeze(-1)


@dataclass
class _Slot:
    request: int = -1  # -1: free
    prompt_length: int = 0
    tokens: list[int] = field(default_factory=list)  # the answer so far
    limit: int = 0  # new tokens this request may produce in total

    @property
    def free(self) -> bool:
        return self.request < 0


def head_dim(config: Any) -> int:
    """Width of one attention head (configs name it, or it follows from the hidden size)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def free_gpu_bytes(device: torch.device) -> int:
    """GPU memory that a new large tensor can really have on `device`.

    Cached blocks are returned first: freed 4-bit weights, say, sit in segments too small for a
    layer's KV cache, so counting the allocator's reserve as free promised memory that could not
    be had (two out-of-memory restarts in the first H200 run).
    """
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


class SlotCache:
    """Keys and values of every layer, `slots x max_len` positions, flat per layer for the kernels."""

    def __init__(self, config: Any, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.num_hidden_layers, slots * max_len, config.num_key_value_heads, head_dim(config))
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def bytes_per_slot(config: Any, max_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * max_len * config.num_key_value_heads * head_dim(config) * element


class Engine:
    """Greedy or sampled decoding of many prompts with continuous batching (see the module docstring)."""

    def __init__(self, model: nn.Module, slots: int, max_len: int, *, cuda_graphs: bool | None = None) -> None:
        if not supports(model):
            raise ValueError(f"the engine does not decode {model.config.model_type!r} models")
        self.model = model
        self.config = model.config
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.head = model.lm_head
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = self.embed.weight.dtype
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.head_dim = head_dim(self.config)
        self.scale = self.head_dim**-0.5
        self.cache = SlotCache(self.config, slots, max_len, self.device, self.dtype)
        self.slots, self.max_len = slots, max_len
        self.on_cuda = self.device.type == "cuda"
        self.use_graphs = self.on_cuda if cuda_graphs is None else cuda_graphs
        # The decode step's inputs live in fixed tensors, so a captured graph reads whatever they hold.
        self.step_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.step_positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.step_lengths = torch.ones(slots, dtype=torch.int32, device=self.device)  # positions attended, this token included
        self.slot_starts = torch.arange(slots + 1, dtype=torch.int32, device=self.device) * max_len
        self.query_starts = torch.arange(slots + 1, dtype=torch.int32, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None

    # ---- the model, layer by layer ----------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states after the final norm for `tokens` (one flat row each); `attend` does the rest."""
        hidden = self.embed(tokens)
        cos, sin = self.rotary(hidden, positions[None])
        cos, sin = cos[0], sin[0]
        rows = tokens.shape[0]
        for index, layer in enumerate(self.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            attention = layer.self_attn
            query = attention.q_proj(hidden).view(rows, self.heads, self.head_dim)
            key = attention.k_proj(hidden).view(rows, self.kv_heads, self.head_dim)
            value = attention.v_proj(hidden).view(rows, self.kv_heads, self.head_dim)
            query, key = self.apply_rotary(query, key, cos, sin, unsqueeze_dim=1)
            output = attend(index, query, key, value)
            hidden = residual + attention.o_proj(output.reshape(rows, self.heads * self.head_dim))
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)

    def _decode_logits(self) -> torch.Tensor:
        """One decoding step for every slot: the new token's keys and values are written at its
        position, then it attends to its slot's first `step_lengths` positions."""
        write_at = self.slot_starts[:-1].long() + self.step_positions

        def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            keys.index_copy_(0, write_at, key)
            values.index_copy_(0, write_at, value)
            if self.on_cuda:
                return torch.ops.aten._flash_attention_forward(
                    query, keys, values, self.query_starts, self.slot_starts, 1, self.max_len, 0.0, True, False,
                    scale=self.scale, seqused_k=self.step_lengths,
                )[0]
            return self._masked_decode_attention(query, keys, values)

        hidden = self._forward(self.step_tokens, self.step_positions, attend)
        return self.head(hidden)

    def _masked_decode_attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        shape = (self.slots, self.max_len, self.kv_heads, self.head_dim)
        keys, values = keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)
        mask = torch.arange(self.max_len, device=self.device)[None, :] < self.step_lengths[:, None]
        output = F.scaled_dot_product_attention(
            query[:, :, None], keys, values, attn_mask=mask[:, None, None, :], scale=self.scale, enable_gqa=True
        )
        return output[:, :, 0]

    def _prefill_logits(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Process whole prompts (packed, no padding) into their slots; logits at each prompt's end."""
        lengths = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        write_at = torch.cat([torch.arange(n, device=self.device) + slot * self.max_len for n, slot in zip(lengths, slots)])
        starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=self.device)

        def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            self.cache.keys[layer].index_copy_(0, write_at, key)
            self.cache.values[layer].index_copy_(0, write_at, value)
            if self.on_cuda:
                return torch.ops.aten._flash_attention_forward(
                    query, key, value, starts, starts, max(lengths), max(lengths), 0.0, True, False, scale=self.scale
                )[0]
            outputs = []
            for begin, end in zip(starts[:-1].tolist(), starts[1:].tolist()):
                q, k, v = (t[begin:end].transpose(0, 1)[None] for t in (query, key, value))
                outputs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)[0].transpose(0, 1))
            return torch.cat(outputs)

        hidden = self._forward(tokens, positions, attend)
        return self.head(hidden[starts[1:].long() - 1])

    # ---- the decode step as a CUDA graph ------------------------------------------------------
    def _decode(self) -> torch.Tensor:
        if not self.use_graphs:
            return self._decode_logits()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.graph_logits

    def _capture(self) -> None:
        """Warm up on a side stream (as torch's CUDA-graph guide says), then capture one step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_logits()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._decode_logits()

    # ---- the scheduler ----------------------------------------------------------------------
    def run(
        self,
        prompts: Sequence[list[int]],
        max_new_tokens: int | Sequence[int],
        finished: Finished,
        *,
        stop_tokens: Sequence[int] = (),
        sampling: Sampling | None = None,
    ) -> None:
        """Decode every prompt; call `finished(index, new_tokens)` as each answer ends.

        An answer ends at a stop token (kept as the last token) or after its `max_new_tokens`
        (one number for all, or one per prompt). Requests enter in the given order.
        """
        sampling = sampling or Sampling()
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        too_long = [i for i, p in enumerate(prompts) if len(p) + limits[i] > self.max_len or not p]
        if too_long:
            raise ValueError(f"prompt {too_long[0]} is empty or does not fit {self.max_len} positions with its answer")
        stop = set(stop_tokens)
        queue = deque(range(len(prompts)))
        table = [_Slot() for _ in range(self.slots)]
        refill_at = max(1, int(self.slots * REFILL_FRACTION))

        def end(slot: _Slot) -> None:
            finished(slot.request, slot.tokens)
            slot.request, slot.tokens = -1, []

        with torch.inference_mode():
            while queue or any(not s.free for s in table):
                free = [i for i, s in enumerate(table) if s.free]
                if queue and (len(free) >= min(refill_at, len(queue)) or len(free) == self.slots):
                    self._admit(queue, free, prompts, limits, table, sampling, stop, end)
                active = [i for i, s in enumerate(table) if not s.free]
                if not active:
                    continue
                logits = self._decode()
                picked = sampling.pick(logits).tolist()
                for i in active:
                    slot = table[i]
                    slot.tokens.append(picked[i])
                    if picked[i] in stop or len(slot.tokens) >= slot.limit:
                        end(slot)
                self._set_step_inputs(table)

    def _admit(self, queue: deque, free: list[int], prompts: Sequence[list[int]], limits: list[int],
               table: list[_Slot], sampling: Sampling, stop: set[int], end: Callable[[_Slot], None]) -> None:
        """Prefill queued requests into free slots, in calls of at most PREFILL_TOKENS tokens."""
        while free and queue:
            batch, slots, budget = [], [], PREFILL_TOKENS
            while free and queue and (not batch or len(prompts[queue[0]]) <= budget):
                request = queue.popleft()
                batch.append(request)
                slots.append(free.pop(0))
                budget -= len(prompts[request])
            first = sampling.pick(self._prefill_logits([list(prompts[r]) for r in batch], slots)).tolist()
            for request, slot_index, token in zip(batch, slots, first):
                slot = table[slot_index]
                slot.request, slot.prompt_length, slot.tokens, slot.limit = request, len(prompts[request]), [token], limits[request]
                if token in stop or slot.limit <= 1:
                    end(slot)
                    free.insert(0, slot_index)
        self._set_step_inputs(table)

    def _set_step_inputs(self, table: list[_Slot]) -> None:
        """The next step's token, position and attended length per slot (free slots: harmless zeros)."""
        tokens, positions = [], []
        for slot in table:
            if slot.free:
                tokens.append(0)
                positions.append(0)
            else:
                tokens.append(slot.tokens[-1])
                positions.append(slot.prompt_length + len(slot.tokens) - 1)  # where its last token goes
        self.step_tokens.copy_(torch.tensor(tokens))
        self.step_positions.copy_(torch.tensor(positions))
        self.step_lengths.copy_(torch.tensor(positions) + 1)
