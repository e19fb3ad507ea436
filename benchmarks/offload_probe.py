"""Activation offloading's budget on this machine: host-device copies, alone and beside the products (GPU only).

A layer whose activations went to pinned host memory in the forward and came back for its backward
would not be recomputed. Whether that can pay depends on three figures this probe measures:
- how fast a side stream copies 1 GiB to pinned host memory and back, each way alone and both at once;
- how much a side stream's copies slow the bf16 product the training step spends most of its time in
  (gate_proj's shape on the 32B: 5,400 tokens x 5,120 -> 27,648) and how fast they run beside it;
- what pinning host memory costs (allocating 8 GiB of it).

    python benchmarks/offload_probe.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_timing import stream_milliseconds  # noqa: E402

GIB = 2**30
TOKENS, HIDDEN, INTERMEDIATE = 5400, 5120, 27648


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("offload_probe.py times host-device copies: run it on a GPU machine")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    started = time.perf_counter()
    host = torch.empty(8 * GIB, dtype=torch.uint8, pin_memory=True)
    print(json.dumps({"pin 8 GiB s": round(time.perf_counter() - started, 2)}), flush=True)
    device = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    device_back = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    to_host = lambda: host[:GIB].copy_(device, non_blocking=True)  # noqa: E731
    to_device = lambda: device_back.copy_(host[GIB:2 * GIB], non_blocking=True)  # noqa: E731
    out_stream, in_stream, compute = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()

    row: dict[str, float] = {}
    row["to host GB/s"] = round(GIB / stream_milliseconds(to_host, out_stream, 5) / 1e6, 1)
    row["to device GB/s"] = round(GIB / stream_milliseconds(to_device, in_stream, 5) / 1e6, 1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        with torch.cuda.stream(out_stream):
            to_host()
        with torch.cuda.stream(in_stream):
            to_device()
    torch.cuda.synchronize()
    row["both ways at once, GB/s each"] = round(5 * GIB / (time.perf_counter() - started) / 1e9, 1)

    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(INTERMEDIATE, HIDDEN, device="cuda", dtype=torch.bfloat16)
    product = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
    flops = 2 * TOKENS * HIDDEN * INTERMEDIATE
    alone = stream_milliseconds(product, compute, 20)
    row["product alone ms"] = round(alone, 3)
    row["product alone TFLOP/s"] = round(flops / alone / 1e9)
    for name, copies in (("to host", (to_host,)), ("both ways", (to_host, to_device))):
        # Copies enqueued after 100 products run entirely beside them: their own events give their speed.
        with torch.cuda.stream(compute):
            for _ in range(100):
                product()
        events = []
        for copy, stream in zip(copies, (out_stream, in_stream), strict=False):
            with torch.cuda.stream(stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(4):
                    copy()
                end.record()
                events.append((start, end))
        torch.cuda.synchronize()
        slowest = max(start.elapsed_time(end) for start, end in events)
        row[f"copies {name} beside the product, GB/s each"] = round(4 * GIB / slowest / 1e6, 1)
        # Products enqueued after 16 GiB of copies run entirely beside them.
        for copy, stream in zip(copies, (out_stream, in_stream), strict=False):
            with torch.cuda.stream(stream):
                for _ in range(16):
                    copy()
        row[f"product beside copies {name}, ms"] = round(stream_milliseconds(product, compute, 20), 3)
        torch.cuda.synchronize()
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
