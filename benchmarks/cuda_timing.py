"""Milliseconds a call takes on the GPU, for the probes: one warm-up call, then the mean of `repeats`."""

from __future__ import annotations

import time
from typing import Callable

import torch


def milliseconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000
