"""The NF4 decoding kernel against bitsandbytes, one linear layer of the 32B at a time.

For each of the 32B's weight shapes and a range of row counts (decoding: one row per sequence),
the time of one `x @ W.T` on the same NF4 weights:
- `bitsandbytes`: `Linear4bit`, what the seed path runs (bitsandbytes picks its fused kernel or
  dequantise-then-cuBLAS by shape);
- `tracesft`: `tracesft.nf4_matmul` (autotuned; the chosen tile sizes are printed), plus the
  float32 -> bf16 rounding and bias add that `NF4Linear` does;
- `bf16 dense`: cuBLAS on the dequantised bf16 weight, the floor of a dequantise-then-multiply path.
`per step` adds the seven products of a layer x 64 layers: the linear-layer time of one decoding
step of the 32B. Weights are random (speed does not depend on them).

    python benchmarks/nf4_kernel.py              # one CUDA GPU, about a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
# (out_features, in_features): how many of each a 32B decoder layer has
LAYER = {(5120, 5120): 2, (1024, 5120): 2, (27648, 5120): 2, (5120, 27648): 1}
LAYERS = 64


def main() -> None:
    import bitsandbytes as bnb
    from triton.testing import do_bench

    from tracesft import nf4_matmul
    from tracesft.inference import NF4Linear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    parser.add_argument("--out", type=Path, default=RESULTS / "nf4_kernel.json")
    args = parser.parse_args()

    results = []
    for (out_features, in_features), count in LAYER.items():
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda")
        dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        prepared = NF4Linear(layer)
        for rows in args.rows:
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                ours = lambda: torch.ops.tracesft.nf4_matmul(x, prepared.packed, prepared.absmax, prepared.code, out_features).to(torch.bfloat16)  # noqa: E731
                row = {
                    "shape": [out_features, in_features], "rows": rows, "per_layer": count,
                    "bitsandbytes_us": do_bench(lambda: layer(x)) * 1e3,
                    "tracesft_us": do_bench(ours) * 1e3,
                    "bf16_dense_us": do_bench(lambda: torch.nn.functional.linear(x, dense)) * 1e3,
                    "config": str(nf4_matmul._autotuned_kernel().best_config),
                    "splits": nf4_matmul.k_splits(rows, out_features, in_features, torch.cuda.get_device_properties(0).multi_processor_count),
                }
            row["tracesft_weight_gb_s"] = out_features * in_features / 2 / (row["tracesft_us"] * 1e-6) / 1e9
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{torch.cuda.get_device_name()}: one product, microseconds")
    print(f"{'shape':>14} {'rows':>5} {'bitsandbytes':>12} {'tracesft':>9} {'bf16 dense':>10} {'NF4 GB/s':>9}  config")
    for row in results:
        print(f"{str(tuple(row['shape'])):>14} {row['rows']:>5} {row['bitsandbytes_us']:>12.1f} {row['tracesft_us']:>9.1f} "
              f"{row['bf16_dense_us']:>10.1f} {row['tracesft_weight_gb_s']:>9.0f}  {row['config']} splits {row['splits']}")
    per_step = {}
    for rows in args.rows:
        subset = [row for row in results if row["rows"] == rows]
        per_step[rows] = {path: sum(row[f"{path}_us"] * row["per_layer"] for row in subset) * LAYERS / 1e3
                          for path in ("bitsandbytes", "tracesft", "bf16_dense")}
    print("\nlinear layers of one decoding step of the 32B (7 products x 64 layers), milliseconds")
    print(f"{'rows':>5} {'bitsandbytes':>12} {'tracesft':>9} {'bf16 dense':>10}")
    for rows, step in per_step.items():
        print(f"{rows:>5} {step['bitsandbytes']:>12.1f} {step['tracesft']:>9.1f} {step['bf16_dense']:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "per_step_ms": per_step, "products": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
