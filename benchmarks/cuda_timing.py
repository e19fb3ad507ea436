"""Milliseconds a call takes on the GPU, for the probes: one warm-up call, then the mean of `repeats`.

`milliseconds` is wall time; `stream_milliseconds` times the calls by events on one stream, so work
other streams run at the same time (a probe's copies beside a product) is not counted.
"""

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


def stream_milliseconds(fn: Callable[[], object], stream: torch.cuda.Stream, repeats: int) -> float:
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats
