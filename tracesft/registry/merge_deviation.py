"""How far a merged model is from the function evaluation measured, on fixed prompts.

Evaluation scores the base as the recipe loads it (NF4 on cuda) with the LoRA update kept
unmerged (`tracesft.generate.inference`); promotion rests on those scores. Folding the update
into the weights rounds every merged weight once more, in the export's dtype: on the 32B's 64
layers a bf16 merge moved teacher-forced logits by a relative error of 0.143 (BENCHMARKS.md),
enough to change answers. A merged export therefore measures itself against the evaluated
function before it is written, and is refused above `registry.max_merged_logit_deviation`.

The measure is the one the benchmarks hold the fast evaluation paths to: over the prompt
positions of each fixed prompt, ||merged - evaluated|| / ||evaluated|| of the logits, and the
largest of these over the prompts. `tracesft.registry.serving.merged_deviation` is the whole
measurement in one call, for `benchmarks/merged_export_deviation.py` on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from tracesft.config import Device, EvalSettings, TrainingRecipe
from tracesft.data.prompting import build_prompt
from tracesft.data.sample_data import EVAL_CSV, bundled_rows
from tracesft.train.adapter import LoraAdapter

PROMPTS = 4  # the first queries of the bundled eval set: every template and variable count the demo uses


def fixed_queries() -> list[str]:
    """The Corr2Cause queries every measurement uses, so figures are comparable across exports."""
    return [row["input"] for row in bundled_rows(EVAL_CSV)[:PROMPTS]]


def prompt_logits(model: Any, tokenizer: Any, queries: list[str]) -> list[torch.Tensor]:
    """Teacher-forced float32 logits over each query's prompt, one sequence at a time (no padding)."""
    device = next(model.parameters()).device
    logits = []
    with torch.no_grad():
        for query in queries:
            ids = tokenizer(build_prompt(tokenizer, query), add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits.append(model(input_ids=ids.to(device)).logits[0].float().cpu())
    return logits


def evaluated_logits(adapter: LoraAdapter, base: str, revision: str | None, recipe: TrainingRecipe, device: Device,
                     tokenizer: Any, queries: list[str]) -> list[torch.Tensor]:
    """The logits of the model as evaluation decodes it: the base as the recipe loads it on
    `device`, the adapter unmerged (`load_for_inference`); the model is freed before returning."""
    from tracesft.generate.inference import load_for_inference

    model = load_for_inference(base, recipe, EvalSettings(), device, adapter.path, revision)
    logits = prompt_logits(model, tokenizer, queries)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return logits


def relative_deviation(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """The largest per-prompt ||other - reference|| / ||reference||."""
    return max(float((b - a).norm() / a.norm()) for a, b in zip(reference, other, strict=True))

