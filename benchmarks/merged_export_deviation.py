"""How far a merged export is from the evaluated adapter, on the real architecture (GPU).

`tracesft adapters export --merged` refuses a merge whose logits move more than
`registry.max_merged_logit_deviation` (0.02, relative) from the function evaluation measured: the
base as the recipe loads it (NF4 on cuda) with the LoRA update unmerged. On the tiny model on a
CPU a bf16 merge moves them by ~0.009 (`tests/test_serving.py`); on the 32B's random-weight stack
it moved 0.143 (BENCHMARKS.md). Whether a trained adapter on the real
DeepSeek-R1-Distill-Qwen-32B stays within the bound is what this measures, with the very function
the export calls (`tracesft.registry.serving.merged_deviation`), once per dtype:

    python benchmarks/merged_export_deviation.py --adapter DIR [--base-model deepseek-ai/DeepSeek-R1-Distill-Qwen-32B]
    python benchmarks/merged_export_deviation.py --registered models:/corr2cause-r1-distill-qwen-32b-lora@champion

Needs one GPU with room for the bf16 32B (~65 GB) beside nothing else: the evaluated model is
loaded, measured and freed before the merge. Results: benchmarks/results/merged_export_deviation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tracesft, not an installed one

import torch

from tracesft.config import load_run_config
from tracesft.registry.merge_deviation import fixed_queries
from tracesft.registry.serving import DTYPES, download_registered_adapter, merged_deviation
from tracesft.train.adapter import LoraAdapter

RESULTS = Path(__file__).resolve().parent / "results" / "merged_export_deviation.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="a trained adapter directory (as training saves it)")
    source.add_argument("--registered", help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--config", type=Path, default=None, help="run configuration naming the registry")
    parser.add_argument("--base-model", default=None, help="the base here, if not where the adapter records it")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated, of " + ", ".join(DTYPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("merged_export_deviation: needs a CUDA device (the evaluated base is NF4, which exists only on a GPU).")
    bound = load_run_config(args.config).registry.max_merged_logit_deviation
    with tempfile.TemporaryDirectory(prefix="tracesft-adapter-") as scratch:
        if args.adapter:
            adapter, where = LoraAdapter(args.adapter), str(args.adapter)
        else:
            adapter, version = download_registered_adapter(args.registered, Path(scratch),
                                                           settings=load_run_config(args.config).registry)
            where = f"{args.registered} (version {version})"
        deviations = {dtype: merged_deviation(adapter, "cuda", args.base_model, DTYPES[dtype]) for dtype in args.dtypes.split(",")}
    result = {"date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "adapter": where,
              "measured_path": f"{merged_deviation.__module__}.{merged_deviation.__name__}",
              "base_model": args.base_model or adapter.metadata.get("base_model"), "prompts": len(fixed_queries()),
              "bound": bound, "deviation": deviations, "within_bound": {d: v <= bound for d, v in deviations.items()}}
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
