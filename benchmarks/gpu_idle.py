"""Where the GPU waits: the idle time between kernels of a profiled window, and what came after each wait.

A step's kernel shares (`train_throughput.py --profile`) say where GPU time goes, not whether the
GPU was busy: time the host spends launching, waiting on a synchronisation or running the Trainer's
own bookkeeping shows only as gaps between kernels. This turns a profile's kernels into the busy
share of the window, the gaps by size, and the gaps summed by the kernel that ended them (the work
the host was late to launch); and, given the host's ops, the ops that were running during the gaps
of a millisecond or more (nested ops each count), which say what the host was doing meanwhile.
Python's own work runs in no op: `GarbageCollectionMarks` adds the collector's pauses as ops and
`mark_methods` the phases of a training loop (each method named, as "Class.method"), so the time
left unattributed narrows to Python between them. Recording the host's ops costs the host time of
its own, so the busy share then reads a little low.
"""

from __future__ import annotations

import functools
import gc
from collections import defaultdict
from typing import Any, Callable

import numpy as np

GAP_SIZES_US = (10, 100, 1_000, 10_000)
ATTRIBUTED_GAP_US = 1_000

Interval = tuple[float, float, str]  # (start µs, end µs, name)


def idle_report(kernels: list[Interval], host_ops: list[Interval] = (), top: int = 15) -> dict[str, Any]:
    """Busy share and idle gaps of `kernels` (any order, overlaps allowed), the long gaps' host ops."""
    if not kernels:
        return {"kernels": 0}
    ordered = sorted(kernels)
    busy = 0.0
    gaps: list[tuple[float, str, str, float]] = []  # (µs, kernel before, kernel after, when it began)
    span_start, span_end, last_name = ordered[0][0], ordered[0][1], ordered[0][2]
    for start, end, name in ordered[1:]:
        if start > span_end:
            busy += span_end - span_start
            gaps.append((start - span_end, last_name, name, span_end))
            span_start = start
        if end >= span_end:
            span_end, last_name = end, name
    busy += span_end - span_start
    window = span_end - ordered[0][0]
    by_size: dict[str, list[float]] = {}
    for gap, *_ in gaps:
        bound = next((f"< {size:,} us" for size in GAP_SIZES_US if gap < size), f">= {GAP_SIZES_US[-1]:,} us")
        count_and_sum = by_size.setdefault(bound, [0, 0.0])
        count_and_sum[0] += 1
        count_and_sum[1] += gap
    by_next: dict[str, float] = defaultdict(float)
    for gap, _, after, _ in gaps:
        by_next[after] += gap
    report = {
        "kernels": len(kernels),
        "window_ms": round(window / 1000, 3),
        "busy_share": round(busy / window, 4),
        "idle_ms": round((window - busy) / 1000, 3),
        "gaps_by_size": {bound: {"count": count, "ms": round(total / 1000, 3)}
                         for bound, (count, total) in sorted(by_size.items(), key=lambda item: -item[1][1])},
        "idle_ms_by_next_kernel": {name[:90]: round(total / 1000, 3)
                                   for name, total in sorted(by_next.items(), key=lambda item: -item[1])[:top]},
        "largest_gaps": [{"us": round(gap, 1), "before": before[:60], "after": after[:60]}
                         for gap, before, after, _ in sorted(gaps, reverse=True)[:top]],
    }
    if host_ops:
        long_gaps = [(began, began + gap) for gap, _, _, began in gaps if gap >= ATTRIBUTED_GAP_US]
        report["long_gap_ms_by_host_op"] = host_time_in(long_gaps, host_ops, top)
    return report


def host_time_in(windows: list[tuple[float, float]], host_ops: list[Interval], top: int) -> dict[str, float]:
    """Milliseconds each host op name spent inside `windows`, the `top` largest."""
    starts = np.array([op[0] for op in host_ops])
    ends = np.array([op[1] for op in host_ops])
    overlap = np.zeros(len(host_ops))
    for low, high in windows:
        overlap += np.clip(np.minimum(ends, high) - np.maximum(starts, low), 0, None)
    by_name: dict[str, float] = defaultdict(float)
    for index in np.flatnonzero(overlap):
        by_name[host_ops[index][2]] += overlap[index]
    largest = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {name[:90]: round(total / 1000, 3) for name, total in largest}


class GarbageCollectionMarks:
    """Python's garbage collections, while installed, as host ops of the running profile: "python gc (generation N)"."""

    def __init__(self) -> None:
        self._open: list[Any] = []

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        from torch.autograd.profiler import record_function

        if phase == "start":
            mark = record_function(f"python gc (generation {info['generation']})")
            mark.__enter__()
            self._open.append(mark)
        elif self._open:
            self._open.pop().__exit__(None, None, None)

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def remove(self) -> None:
        gc.callbacks.remove(self._callback)


def mark_methods(methods: dict[type, tuple[str, ...]]) -> Callable[[], None]:
    """Each method named (defined by its class itself), until undone, as a host op of the running profile:
    "Class.method". Returns the undo."""
    from torch.autograd.profiler import record_function

    originals = []
    for owner, names in methods.items():
        for name in names:
            original = owner.__dict__[name]

            def marked(*args: Any, _original: Any = original, _label: str = f"{owner.__name__}.{name}",
                       **kwargs: Any) -> Any:
                with record_function(_label):
                    return _original(*args, **kwargs)

            setattr(owner, name, functools.wraps(original)(marked))
            originals.append((owner, name, original))
    return lambda: [setattr(owner, name, original) for owner, name, original in reversed(originals)]


def profiled_intervals(profiler: Any) -> tuple[list[Interval], list[Interval]]:
    """The device activities (kernels, copies, fills) and the host ops of a finished `torch.profiler.profile`."""
    from torch.autograd import DeviceType

    kernels, host_ops = [], []
    for event in profiler.events():
        interval = (event.time_range.start, event.time_range.end, event.name)
        (kernels if event.device_type == DeviceType.CUDA else host_ops).append(interval)
    return kernels, host_ops
