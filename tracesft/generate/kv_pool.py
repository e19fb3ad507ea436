"""The KV cache as one pool of positions, each request holding one contiguous run of blocks.

Why contiguous runs and not a block table (vLLM's paging): torch 2.11's FlashAttention entry
(`aten._flash_attention_forward`) has no `block_table` argument (torch 2.13's has), but its
variable-length form reads each sequence from its own start offset (`cum_seq_k`) up to its own
length (`seqused_k`), and nothing requires the offsets to be ordered. So a request's keys may sit
anywhere in the pool as long as they are contiguous, and the decode step keeps the exact kernel
(and arithmetic) it had with one fixed slot per row. What paging gains, holding only the answers
actually in flight instead of `max_len` positions per row, this gains by growing runs: in place
when the blocks after a run are free, else by moving the run (a copy of its keys and values,
~0.1 ms for 1,000 positions of the 32B on an H200, against a ~60 ms decoding step), and by
compacting the pool when free blocks are scattered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class KVPool:
    """Keys and values of every layer for `blocks` x `block_size` positions, one row per position.

    Block 0 is scratch: idle decoding rows write their (ignored) keys there and attend to it,
    so a step's shapes never depend on how many rows are busy.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (layers, blocks * block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.used = np.zeros(blocks, dtype=bool)
        self.used[0] = True

    @classmethod
    def for_model(cls, config: Any, blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> KVPool:
        from tracesft.generate.engine import head_dim

        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim(config), blocks, block_size, device, dtype)

    @property
    def free_blocks(self) -> int:
        return int((~self.used).sum())

    def _free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every run of free blocks."""
        edges = np.diff(np.concatenate(([0], (~self.used).astype(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return list(zip(starts.tolist(), (ends - starts).tolist()))

    def allocate(self, count: int) -> int | None:
        """First block of `count` free contiguous blocks, at the start of the largest free run
        (room after it to grow in place); None if no run is that long."""
        runs = self._free_runs()
        if not runs:
            return None
        start, length = max(runs, key=lambda run: run[1])
        if length < count:
            return None
        self.used[start : start + count] = True
        return start

    def grow(self, start: int, count: int, extra: int) -> bool:
        """Extend the run `start, count` by `extra` blocks in place, if they are free."""
        following = self.used[start + count : start + count + extra]
        if len(following) < extra or following.any():
            return False
        following[:] = True
        return True

    def release(self, start: int, count: int) -> None:
        self.used[start : start + count] = False

    def move(self, source: int, target: int, positions: int) -> None:
        """Copy the first `positions` keys and values of the run at block `source` to block `target`."""
        size = self.block_size
        for tensor in (self.keys, self.values):
            data = tensor[:, source * size : source * size + positions]
            if abs(source - target) * size < positions:  # overlapping ranges: copy through a temporary
                data = data.clone()
            tensor[:, target * size : target * size + positions].copy_(data)

    def compact(self, runs: list[tuple[int, int, int]]) -> list[int]:
        """Move the live `runs` (start, blocks, positions written) to the front of the pool, in
        their order, leaving one free run at the end; returns their new starts."""
        order = sorted(range(len(runs)), key=lambda i: runs[i][0])
        new_starts = [0] * len(runs)
        self.used[1:] = False
        cursor = 1
        for i in order:
            start, count, positions = runs[i]
            if start != cursor:
                self.move(start, cursor, positions)
            self.used[cursor : cursor + count] = True
            new_starts[i] = cursor
            cursor += count
        return new_starts
