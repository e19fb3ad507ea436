"""Where the GPU waits: the idle time between kernels of a profiled window, and what came after each wait.

A step's kernel shares (`train_throughput.py --profile`) say where GPU time goes, not whether the
GPU was busy: time the host spends launching, waiting on a synchronisation or running the Trainer's
own bookkeeping shows only as gaps between kernels. This turns the kernels of a CUDA-only profile
(CUPTI's activity records, which cost the host far less than recording every CPU op) into the busy
share of the window, the gaps by size, and the gaps summed by the kernel that ended them (the work
the host was late to launch).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

GAP_SIZES_US = (10, 100, 1_000, 10_000)


def idle_report(kernels: list[tuple[float, float, str]], top: int = 15) -> dict[str, Any]:
    """Busy share and idle gaps of `kernels` ((start µs, end µs, name), any order, overlaps allowed)."""
    if not kernels:
        return {"kernels": 0}
    ordered = sorted(kernels)
    busy = 0.0
    gaps: list[tuple[float, str, str]] = []  # (µs, kernel before, kernel after)
    span_start, span_end, last_name = ordered[0][0], ordered[0][1], ordered[0][2]
    for start, end, name in ordered[1:]:
        if start > span_end:
            busy += span_end - span_start
            gaps.append((start - span_end, last_name, name))
            span_start = start
        if end >= span_end:
            span_end, last_name = end, name
    busy += span_end - span_start
    window = span_end - ordered[0][0]
    by_size: dict[str, list[float]] = {}
    for gap, _, _ in gaps:
        bound = next((f"< {size:,} us" for size in GAP_SIZES_US if gap < size), f">= {GAP_SIZES_US[-1]:,} us")
        count_and_sum = by_size.setdefault(bound, [0, 0.0])
        count_and_sum[0] += 1
        count_and_sum[1] += gap
    by_next: dict[str, float] = defaultdict(float)
    for gap, _, after in gaps:
        by_next[after] += gap
    return {
        "kernels": len(kernels),
        "window_ms": round(window / 1000, 3),
        "busy_share": round(busy / window, 4),
        "idle_ms": round((window - busy) / 1000, 3),
        "gaps_by_size": {bound: {"count": count, "ms": round(total / 1000, 3)}
                         for bound, (count, total) in sorted(by_size.items(), key=lambda item: -item[1][1])},
        "idle_ms_by_next_kernel": {name[:90]: round(total / 1000, 3)
                                   for name, total in sorted(by_next.items(), key=lambda item: -item[1])[:top]},
        "largest_gaps": [{"us": round(gap, 1), "before": before[:60], "after": after[:60]}
                         for gap, before, after in sorted(gaps, reverse=True)[:top]],
    }


def profiled_kernels(profiler: Any) -> list[tuple[float, float, str]]:
    """The device activities (kernels, copies, fills) of a finished `torch.profiler.profile`, in µs."""
    from torch.autograd import DeviceType

    return [(event.time_range.start, event.time_range.end, event.name) for event in profiler.events()
            if event.device_type == DeviceType.CUDA]
