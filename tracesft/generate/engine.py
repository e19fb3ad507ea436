"""Continuous batching over a pooled KV cache: every decoding row busy, each step one graph launch.

Why a hand-written engine: evaluation generates up to 2,048 tokens for each of ~1,200 prompts,
and reasoning answers range from a few hundred tokens to the limit. Static batches (HF
`generate`) run every batch to its longest answer; transformers' own continuous batching
(`generate_batch`) and its compiled static cache were measured slower than plain eager
`generate` on the 32B architecture (BENCHMARKS.md), and no maintained engine with paged
attention (vLLM, SGLang) installs beside this project's pinned torch. So:

- **Pooled KV cache.** Keys and values live in one pool of positions shared by all requests
  (`kv_pool.KVPool`); each request holds one contiguous run of blocks that grows with its
  answer and returns to the pool when it ends. Memory holds the answers actually in flight, not
  `max_len` positions per row (a row reserved prompt + 2,048 positions while the median answer
  is ~700): on the 32B on an H200, 256 requests at once instead of ~114.
- **Rows.** A request owns a decoding row from its prefill until its answer ends; then the next
  request in the queue takes the row (refill), so the GPU decodes a full batch. Active requests
  are kept in the first rows (a request's row only says where its run starts: moving it copies
  nothing), and the step runs at the smallest captured size that holds them: the tail of a run,
  when the last long answers finish alone, does not pay for idle rows.
- **Out of blocks.** Requests are admitted while blocks are free; when a growing answer finds
  none (after compacting the pool), the most recently admitted request is preempted: its blocks
  are freed and it goes back to the head of the queue with its answer so far, which the next
  prefill recomputes.
- **Attention for decode.** On CUDA, FlashAttention's variable-length kernel
  (`aten._flash_attention_forward`) reads each row from its run's start (`cum_seq_k`) up to its
  own length (`seqused_k`): no padding is attended, and every step has the same shapes. On the
  CPU, SDPA over each row's gathered positions with a length mask (the same arithmetic, slower).
- **CUDA graphs.** With static shapes the whole decode step (64 layers, ~5,000 kernels on the
  32B) is captured once per row count and replayed: the per-operation CPU cost that bound the
  eager path (cuDNN attention alone planned ~5 ms per call at decode) is gone.
- **Prefill** runs eagerly, packed (no padding), several new requests per call, and writes their
  keys and values into their runs. Refills wait until a sixteenth of the rows are free, so one
  prefill call serves several requests.
- **Fewer, fuller kernels, same bits.** On CUDA the rotary embedding, SiLU times the gate,
  each LoRA update's rounding and add are one Triton kernel each, and each residual add with the
  RMS norm after it three (torch's own mean between two kernels) (`fused_ops`), and the LoRA
  branches of sibling projections share one cast of their input and, in decode steps of fewer
  than `SIDE_STREAM_BELOW_ROWS` rows (any, with NF4 layers), run on a side stream beside the base
  products (`inference.project`). Each computes exactly what the torch ops did.
- **Exactness.** Everything else is the model's own modules: its norm weights, projections (the
  unmerged LoRA of `inference.LoraLinear` included) and head; attention is FlashAttention, as the
  seed's SDPA runs it on the flash backend. Greedy outputs equal HF `generate` one prompt at a
  time (tests/test_engine.py).

Supported: decoder-only models with Llama's layer layout (Qwen2, Llama, Mistral), full attention.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tracesft.generate.fused_ops import add_rms_norm, rotary, silu_mul
from tracesft.generate.inference import has_4bit_layers, project
from tracesft.generate.kv_pool import KVPool

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")
# Refill when this share of the rows is free: one prefill call then serves several requests.
REFILL_FRACTION = 1 / 16
# Prompt tokens per prefill call: bounds the prefill's activations (the 32B's MLP: ~0.45 GB per
# 8k rows and tensor), which is memory the KV cache cannot have.
PREFILL_TOKENS = 8_192
# Positions per KV block: the pool's unit of allocation (small on the CPU, so tests exercise it).
CUDA_BLOCK_SIZE = 64
CPU_BLOCK_SIZE = 16
# A run that must grow takes this many blocks beyond what it needs now: fewer moves.
GROWTH_BLOCKS = 2
# Decode at row counts from the full batch down to 1/32 of it, halving: each is one captured graph.
SMALLEST_BUCKET_SHARE = 1 / 32
# Decode steps with fewer rows than this run the LoRA products on a side stream beside the base
# products (`inference.project`) where the base is dense; prefill never does. Measured on the 32B's
# layers (H200, 8 layers, graph step, benchmarks/engine_step_probe.py): 8 rows 4.08 -> 3.88 ms with
# it, 32 rows 4.58 -> 4.38, 64 rows even (5.35 / 5.31), but 128 rows 6.67 -> 7.33, 256 rows 9.48 ->
# 10.11, and a prefill call of 8,100 tokens 129 -> 139 ms: where the bf16 products fill the GPU,
# the rank-16 products beside them only slow them down. Kept NF4 layers are different:
# bitsandbytes dequantises every weight in kernels of its own before each product, and the LoRA
# products hide in those (whole 32B, 300 requests: 128 rows 84.6 ms a step with the side stream,
# 88.7 without; 256 rows 100.0 and 101.2), so with NF4 layers every decode step uses it.
SIDE_STREAM_BELOW_ROWS = 128
# Blocks kept free when admitting beside running requests, for their growth (vLLM keeps 1% too):
# fewer preemptions, each of which recomputes a request's prompt and answer so far.
ADMISSION_WATERMARK = 0.01

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


@dataclass(eq=False)  # identity: a request is itself, whatever its tokens
class _Request:
    """A request in a decoding row: its prompt, its answer so far, and the run of blocks holding both."""

    index: int
    prompt_length: int
    tokens: list[int]  # the answer so far (tokens carried over a preemption included)
    limit: int  # new tokens this request may produce in total
    admitted: int  # admission order: the latest admitted is preempted first
    start: int = 0  # first block of its run
    capacity: int = 0  # blocks in its run

    @property
    def last_position(self) -> int:
        """Where the answer's last token goes in the cache (the next step writes it there); the
        positions before it are written."""
        return self.prompt_length + len(self.tokens) - 1


@dataclass
class EngineStats:
    """What a run did and where its wall time went, so a benchmark can say what binds.

    Times are wall seconds measured where the host waits for the device anyway (reading the
    picked tokens), so they need no extra synchronisation. `tail_*` counts the steps after the
    queue emptied: the last answers finishing at falling occupancy.
    """

    steps: int = 0
    prefill_calls: int = 0
    preemptions: int = 0
    moves: int = 0  # runs copied elsewhere to grow
    compactions: int = 0
    peak_active: int = 0
    busy_rows: int = 0  # sum over steps of the rows decoding a request
    admissions: int = 0  # requests prefilled (a preempted one again when readmitted); also their order
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # step inputs, the step, picking the tokens
    run_s: float = 0.0
    tail_steps: int = 0
    tail_s: float = 0.0
    steps_by_rows: dict[int, int] = field(default_factory=dict)  # captured row count -> steps
    decode_s_by_rows: dict[int, float] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        """New tokens produced: one per busy row of each step, and each admission's first from its prefill."""
        return self.busy_rows + self.admissions

    def summary(self) -> dict[str, Any]:
        """The figures that explain a run's throughput, rounded for a report."""
        return {
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": round(self.generated_tokens / self.run_s, 1) if self.run_s else None,
            "steps": self.steps, "mean_busy_rows": round(self.busy_rows / max(self.steps, 1), 1),
            "prefill_calls": self.prefill_calls, "prefill_tokens": self.prefill_tokens,
            "run_s": round(self.run_s, 2), "prefill_s": round(self.prefill_s, 2), "decode_s": round(self.decode_s, 2),
            "scheduling_s": round(self.run_s - self.prefill_s - self.decode_s, 2),
            "tail_steps": self.tail_steps, "tail_s": round(self.tail_s, 2),
            "step_ms_by_rows": {rows: round(self.decode_s_by_rows[rows] / count * 1000, 2)
                                for rows, count in sorted(self.steps_by_rows.items())},
            "steps_by_rows": dict(sorted(self.steps_by_rows.items())),
            "preemptions": self.preemptions, "moves": self.moves, "compactions": self.compactions,
            "peak_active": self.peak_active,
        }


def blocks_for_every_row(slots: int, max_len: int, block_size: int) -> int:
    """KV blocks for every row at `max_len` positions, plus the scratch block idle rows write to:
    the pool that can never run out (what the engine builds when given no `blocks`)."""
    return slots * math.ceil(max_len / block_size) + 1


def head_dim(config: Any) -> int:
    """Width of one attention head (configs name it, or it follows from the hidden size)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def free_gpu_bytes(device: torch.device) -> int:
    """GPU memory that a new large tensor can really have on `device`.

    Unreachable objects are collected and cached blocks returned first. The 4-bit layers that
    `inference.dequantize_base` replaces (and PEFT's wrappers around them) sit in reference
    cycles, so only the garbage collector frees them: without it, 15 GiB of NF4 weights stayed
    allocated beside the bf16 copies on the 32B (H200), a fifth of the KV pool. And freed blocks
    sit in segments too small for a layer's cache, so counting the allocator's reserve as free
    promised memory that could not be had (two out-of-memory restarts in the first H200 run).
    Where this process's allocator is capped (`torch.cuda.set_per_process_memory_fraction`, to
    share the card or to stand in for a smaller one), only what the cap leaves counts: the device's
    free memory alone sized a 115 GiB pool under an 80 GiB cap, which ran out at once.
    """
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    cap = int(torch.cuda.get_per_process_memory_fraction(device) * total)
    return min(free, cap - torch.cuda.memory_reserved(device))


def kv_bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values that one token position takes across all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * element


class Engine:
    """Greedy or sampled decoding of many prompts with continuous batching (see the module docstring).

    `slots` decoding rows at most, prompt plus answer at most `max_len` positions each; `blocks`
    KV blocks of `block_size` positions in all (default: enough for every row at `max_len`, so
    nothing is ever preempted).
    """

    def __init__(self, model: nn.Module, slots: int, max_len: int, *, blocks: int | None = None,
                 block_size: int | None = None, cuda_graphs: bool | None = None) -> None:
        if not supports(model):
            raise ValueError(f"the engine does not decode {model.config.model_type!r} models")
        self.model = model
        self.config = model.config
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.head = model.lm_head
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.silu = self.config.hidden_act in ("silu", "swish")
        self.device = next(model.parameters()).device
        self.dtype = self.embed.weight.dtype
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.head_dim = head_dim(self.config)
        self.scale = self.head_dim**-0.5
        self.slots, self.max_len = slots, max_len
        self.block_size = block_size or (CUDA_BLOCK_SIZE if self.device.type == "cuda" else CPU_BLOCK_SIZE)
        self.row_blocks = math.ceil(max_len / self.block_size)  # the longest run a request can need
        # A cache with room for every row at `max_len` never runs out: no watermark needed.
        self.watermark = 0 if blocks is None else math.ceil(blocks * ADMISSION_WATERMARK)
        blocks = blocks if blocks is not None else blocks_for_every_row(slots, max_len, self.block_size)
        self.cache = KVPool.for_model(self.config, blocks, self.block_size, self.device, self.dtype)
        self.on_cuda = self.device.type == "cuda"
        # LoRA branches run on it beside the base products in small decode steps (`inference.project`).
        self.side_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.side_stream_below_rows = math.inf if has_4bit_layers(model) else SIDE_STREAM_BELOW_ROWS
        self.use_graphs = self.on_cuda if cuda_graphs is None else cuda_graphs
        self.buckets = sorted({slots} | {2**k for k in range(slots.bit_length()) if slots * SMALLEST_BUCKET_SHARE <= 2**k < slots})
        # The decode step's inputs live in fixed tensors, so a captured graph reads whatever they hold.
        # Idle rows: token 0 at position 0 of the scratch block, attending to that one position.
        # `key_starts[row]` is where the row's run starts in the pool (its last entry is never read).
        device = self.device
        self.step_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.step_positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.step_lengths = torch.ones(slots, dtype=torch.int32, device=device)  # positions attended, this token included
        self.step_write_at = torch.zeros(slots, dtype=torch.long, device=device)  # flat cache index of this token
        self.key_starts = torch.zeros(slots + 1, dtype=torch.int32, device=device)
        self.query_starts = torch.arange(slots + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool: Any = None
        self.stats = EngineStats()

    # ---- the model, layer by layer ----------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 side: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Hidden states after the final norm for `tokens` (one flat row each); `attend` does the
        rest; the LoRA products run on `side` if given (`inference.project`)."""
        hidden = self.embed(tokens)  # the residual stream
        cos, sin = self.rotary(hidden, positions[None])
        cos, sin = cos[0], sin[0]
        rows = tokens.shape[0]
        output = None  # the last block's output, added to the stream together with the next norm
        for index, layer in enumerate(self.layers):
            hidden, normed = add_rms_norm(hidden, output, layer.input_layernorm)
            attention = layer.self_attn
            query, key, value = project(normed, (attention.q_proj, attention.k_proj, attention.v_proj), side)
            query, key = rotary(query.view(rows, self.heads, self.head_dim), key.view(rows, self.kv_heads, self.head_dim),
                                cos, sin, self.apply_rotary)
            output = attend(index, query, key, value.view(rows, self.kv_heads, self.head_dim))
            (output,) = project(output.reshape(rows, self.heads * self.head_dim), (attention.o_proj,), side)
            hidden, normed = add_rms_norm(hidden, output, layer.post_attention_layernorm)
            mlp = layer.mlp
            gate, up = project(normed, (mlp.gate_proj, mlp.up_proj), side)
            (output,) = project(silu_mul(gate, up) if self.silu else mlp.act_fn(gate) * up, (mlp.down_proj,), side)
        return add_rms_norm(hidden, output, self.norm)[1]

    def _decode_logits(self, rows: int) -> torch.Tensor:
        """One decoding step for the first `rows` rows: each new token's keys and values are
        written at its position, then it attends to its run's first `step_lengths` positions."""
        write_at, lengths, starts = self.step_write_at[:rows], self.step_lengths[:rows], self.key_starts[: rows + 1]

        def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            keys.index_copy_(0, write_at, key)
            values.index_copy_(0, write_at, value)
            if self.on_cuda:
                return torch.ops.aten._flash_attention_forward(
                    query, keys, values, self.query_starts[: rows + 1], starts, 1, self.max_len, 0.0, True, False,
                    scale=self.scale, seqused_k=lengths,
                )[0]
            return self._masked_decode_attention(query, keys, values, starts[:-1], lengths)

        side = self.side_stream if rows < self.side_stream_below_rows else None
        hidden = self._forward(self.step_tokens[:rows], self.step_positions[:rows], attend, side)
        return self.head(hidden)

    def _masked_decode_attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                 starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        window = torch.arange(self.max_len, device=self.device)
        gather = (starts.long()[:, None] + window).clamp(max=keys.shape[0] - 1)  # (rows, max_len) pool positions
        row_keys, row_values = (t[gather].transpose(1, 2) for t in (keys, values))  # (rows, kv_heads, max_len, dim)
        mask = window[None, :] < lengths[:, None]
        output = F.scaled_dot_product_attention(
            query[:, :, None], row_keys, row_values, attn_mask=mask[:, None, None, :], scale=self.scale, enable_gqa=True
        )
        return output[:, :, 0]

    def _prefill_logits(self, prompts: list[list[int]], runs: list[int]) -> torch.Tensor:
        """Process whole prompts (packed, no padding) into the runs starting at blocks `runs`;
        logits at each prompt's end."""
        lengths = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        write_at = torch.cat([torch.arange(n, device=self.device) + run * self.block_size for n, run in zip(lengths, runs)])
        starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=self.device)

        def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            keys.index_copy_(0, write_at, key)
            values.index_copy_(0, write_at, value)
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

    # ---- the decode step as CUDA graphs, one per row count ------------------------------------
    def _decode(self, active: int) -> torch.Tensor:
        """Logits of the first `active` rows, computed at the smallest bucket that holds them."""
        rows = self._bucket(active)
        if not self.use_graphs:
            return self._decode_logits(rows)[:active]
        if rows not in self.graphs:
            self.graphs[rows] = self._capture(rows)
        graph, logits = self.graphs[rows]
        graph.replay()
        return logits[:active]

    def _bucket(self, active: int) -> int:
        """The smallest captured row count that holds `active` rows."""
        return next(size for size in self.buckets if size >= active)

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (as torch's CUDA-graph guide says), then capture one step.

        All row counts share one memory pool: they never run at once, and each step's logits are
        read before the next replay.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_logits(rows)
        torch.cuda.current_stream().wait_stream(stream)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._decode_logits(rows)
        return graph, logits

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
        self._prompts, self._limits, self._sampling, self._stop, self._finished = prompts, limits, sampling, set(stop_tokens), finished
        self._queue: deque[tuple[int, list[int]]] = deque((i, []) for i in range(len(prompts)))  # (request, answer so far)
        self._active: list[_Request] = []
        refill_at = max(1, int(self.slots * REFILL_FRACTION))

        stats = self.stats
        run_started = time.perf_counter()
        with torch.inference_mode():
            while self._queue or self._active:
                free_rows = self.slots - len(self._active)
                if self._queue and (free_rows >= min(refill_at, len(self._queue)) or not self._active):
                    self._admit()
                if not self._active:
                    continue
                self._grow_or_preempt()
                if not self._active:
                    continue
                step_started = time.perf_counter()
                self._set_step_inputs()
                active = len(self._active)
                rows = self._bucket(active)
                picked = self._sampling.pick(self._decode(active)).tolist()
                step_s = time.perf_counter() - step_started
                stats.steps += 1
                stats.busy_rows += active
                stats.peak_active = max(stats.peak_active, active)
                stats.decode_s += step_s
                stats.steps_by_rows[rows] = stats.steps_by_rows.get(rows, 0) + 1
                stats.decode_s_by_rows[rows] = stats.decode_s_by_rows.get(rows, 0.0) + step_s
                if not self._queue:
                    stats.tail_steps += 1
                    stats.tail_s += step_s
                for request, token in zip(list(self._active), picked):
                    request.tokens.append(token)
                    if token in self._stop or len(request.tokens) >= request.limit:
                        self._end(request)
        stats.run_s += time.perf_counter() - run_started

    def _end(self, request: _Request) -> None:
        self._finished(request.index, request.tokens)
        self._release(request)

    def _release(self, request: _Request) -> None:
        """Free the request's row and run; the last active request moves into its row."""
        self.cache.release(request.start, request.capacity)
        row = self._active.index(request)
        last = self._active.pop()
        if last is not request:
            self._active[row] = last

    def _blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def _admit(self) -> None:
        """Prefill queued requests into free rows and free runs, in calls of at most PREFILL_TOKENS tokens.

        A request is admitted only if a run for its prompt (and some growth) is free, beside
        running requests with `ADMISSION_WATERMARK` of the pool to spare; with nothing else
        running, a prompt longer than the whole pool is an error, not a hang.
        """
        while self._queue and len(self._active) < self.slots:
            batch: list[_Request] = []
            budget = PREFILL_TOKENS
            while self._queue and len(self._active) + len(batch) < self.slots:
                index, carried = self._queue[0]
                context = len(self._prompts[index]) + len(carried)
                wanted = min(self._blocks_for(context + 1) + GROWTH_BLOCKS, self.row_blocks)
                reserve = self.watermark if self._active or batch else 0
                if (batch and context > budget) or wanted + reserve > self.cache.free_blocks:
                    break
                start = self.cache.allocate(wanted)
                if start is None and not batch:  # free blocks are scattered: gather them, once
                    self._compact()
                    start = self.cache.allocate(wanted)
                if start is None:
                    break
                self._queue.popleft()
                self.stats.admissions += 1
                batch.append(_Request(index, len(self._prompts[index]), carried, self._limits[index], self.stats.admissions, start, wanted))
                budget -= context
            if not batch:
                if not self._active:
                    index, carried = self._queue[0]
                    raise torch.cuda.OutOfMemoryError(
                        f"request {index} needs {self._blocks_for(len(self._prompts[index]) + len(carried) + 1)} KV blocks; "
                        f"the cache has {self.cache.free_blocks}"
                    )
                return
            contexts = [list(self._prompts[r.index]) + r.tokens for r in batch]
            started = time.perf_counter()
            first = self._sampling.pick(self._prefill_logits(contexts, [r.start for r in batch])).tolist()
            self.stats.prefill_s += time.perf_counter() - started
            self.stats.prefill_calls += 1
            self.stats.prefill_tokens += sum(map(len, contexts))
            for request, token in zip(batch, first):
                self._active.append(request)
                request.tokens = [*request.tokens, token]
                if token in self._stop or len(request.tokens) >= request.limit:
                    self._end(request)

    def _grow_or_preempt(self) -> None:
        """Give every request's run room for the position its next token goes to; where the pool
        has none, preempt the most recently admitted request (recomputed when readmitted)."""
        order = sorted(self._active, key=lambda r: r.admitted)  # a victim is always the last of it
        position = 0
        while position < len(order):
            request = order[position]
            needed = self._blocks_for(request.last_position + 1)
            while needed > request.capacity and not self._grow(request, needed):
                victim = order.pop()
                self._release(victim)
                self._queue.appendleft((victim.index, victim.tokens))
                self.stats.preemptions += 1
                if victim is request:
                    break
            position += 1

    def _grow(self, request: _Request, needed: int) -> bool:
        """Grow `request`'s run to at least `needed` blocks (plus growth room where it fits): in
        place, else by moving it to a free run, else after compacting the pool."""
        roomy = min(needed + GROWTH_BLOCKS, self.row_blocks)
        for size in (roomy, needed):
            if self.cache.grow(request.start, request.capacity, size - request.capacity):
                request.capacity = size
                return True
        for attempt in ("as is", "compacted"):
            if attempt == "compacted":
                if self.cache.free_blocks < needed:
                    return False
                self._compact()
            for size in (roomy, needed):
                start = self.cache.allocate(size)
                if start is not None:
                    self.cache.move(request.start, start, request.last_position)
                    self.cache.release(request.start, request.capacity)
                    request.start, request.capacity = start, size
                    self.stats.moves += 1
                    return True
        return False

    def _compact(self) -> None:
        starts = self.cache.compact([(r.start, r.capacity, r.last_position) for r in self._active])
        for request, start in zip(self._active, starts):
            request.start = start
        self.stats.compactions += 1

    def _set_step_inputs(self) -> None:
        """The next step's token, position, write index, attended length and run start per row
        (idle rows: token 0 at position 0 of the scratch block)."""
        size = self.block_size
        tokens, positions, write_at, starts = [0] * self.slots, [0] * self.slots, [0] * self.slots, [0] * (self.slots + 1)
        for row, request in enumerate(self._active):
            position = request.last_position
            tokens[row], positions[row] = request.tokens[-1], position
            starts[row] = request.start * size
            write_at[row] = starts[row] + position
        self.step_tokens.copy_(torch.tensor(tokens))
        self.step_positions.copy_(torch.tensor(positions))
        self.step_lengths.copy_(torch.tensor(positions) + 1)
        self.step_write_at.copy_(torch.tensor(write_at))
        self.key_starts.copy_(torch.tensor(starts, dtype=torch.int32))
