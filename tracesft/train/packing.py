"""Packed training rows with attention kept inside each example.

Reasoning traces vary in length (median ~1,200 tokens, up to 4,096), so one example per step
leaves the GPU waiting on per-step overhead and a padded batch spends compute on padding. TRL's
padding-free packing lays several tokenized examples end to end in one row, restarts the
position ids at each example and hands the model the example boundaries (`cu_seq_lens_q`).

What remains is attention: a packed row must attend only within each example. `VARLEN_ATTENTION`
is an attention implementation that reads those boundaries: on CUDA it calls PyTorch's varlen
flash kernel (`torch.nn.attention.varlen`), so no mask is built and no compute goes to pairs of
tokens from different examples; elsewhere (CPU, or a torch without it) it runs causal SDPA on each
example in turn. Without boundaries (generation, padded batches) it is plain SDPA.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "tracesft_varlen"


def packed_row_plan(lengths: list[int], examples_per_step: int, packing_length: int) -> tuple[int, int]:
    """(row length, rows per optimizer step) that keep the seed's tokens per optimizer step.

    The seed's step sees `examples_per_step` examples (batch x accumulation), about that many times
    the mean length in tokens. Packed, the same tokens are split over as few rows of at most
    `packing_length` as possible (longer rows amortise per-step overhead); every row must still hold
    the longest example.
    """
    tokens_per_step = examples_per_step * sum(lengths) / len(lengths)
    rows = max(1, math.ceil(tokens_per_step / packing_length))
    row_length = max(max(lengths), math.ceil(tokens_per_step / rows))
    return min(row_length, max(packing_length, max(lengths))), rows


def register_varlen_attention() -> str:
    """Register `VARLEN_ATTENTION` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
        # Packed rows carry no padding mask: their boundaries travel as `cu_seq_lens_q` instead.
        if attention_mask is None:
            return None
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, mask)
    return VARLEN_ATTENTION


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example; shapes as transformers' `sdpa_attention_forward`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boundaries = _boundaries(kwargs)
    if boundaries is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    cu_seq_lens, max_length = boundaries
    out = None
    if q.is_cuda and _torch_varlen() is not None:
        try:
            out = _torch_varlen()(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scaling)
        except (RuntimeError, TypeError, NotImplementedError) as err:  # a young API: fall back, once, loudly
            global _VARLEN
            _VARLEN = None
            logger.warning("torch varlen attention failed (%s); using per-example SDPA instead.", err)
    if out is None:
        out = _per_example_sdpa(q, k, v, cu_seq_lens, scaling)
    return out.unsqueeze(0), None


def _boundaries(kwargs: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None:
        max_length = kwargs.get("max_length_q")
        return cu_seq_lens, int(max_length) if max_length is not None else int(cu_seq_lens.diff().max())
    return None


def _per_example_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, scaling: float | None) -> torch.Tensor:
    # Every layer sees the same boundaries tensor: read it to the host once per forward, not per layer.
    starts = getattr(cu_seq_lens, "_host_starts", None)
    if starts is None:
        starts = cu_seq_lens.tolist()
        cu_seq_lens._host_starts = starts
    outputs = []
    for start, end in zip(starts[:-1], starts[1:]):
        if end > start:
            segment = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, tokens, head_dim)
            outputs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    *segment, is_causal=True, scale=scaling, enable_gqa=segment[0].shape[0] != segment[1].shape[0]
                ).transpose(0, 1)
            )
    return torch.cat(outputs, dim=0)


_VARLEN: Any = False  # not looked up yet


def _torch_varlen() -> Any:
    """PyTorch's varlen flash attention as `f(q, k, v, cu_q, cu_k, max_q, max_k, scale)`, or None.

    The API is recent and has moved between releases (`is_causal` became `window_size`), so the
    call is fitted to the signature found.
    """
    global _VARLEN
    if _VARLEN is False:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN = None
            return None
        parameters = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
        gqa = "enable_gqa" in parameters

        def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            if q.shape[1] != k.shape[1] and not gqa:
                repeat = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            extra = {"enable_gqa": True} if gqa and q.shape[1] != k.shape[1] else {}
            return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale=scale, **causal, **extra)

        _VARLEN = call
    return _VARLEN
