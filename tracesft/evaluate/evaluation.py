"""Scoring a model (the base, or the base plus an adapter) on Corr2Cause problems.

Generation uses the same prompt as training (`build_prompt`), greedy by default. One call scores
up to three sets, generated together so batches stay full: the eval set itself (what the gate
reads), the same problems with their variables renamed (robustness), and the traces' validation
split. Outputs are cached per example, so a rerun after an interruption only finishes the job.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, computed_field

from tracesft.data.answers import Answer, extract_answer
from tracesft.config import Device, EvalSettings, TrainingRecipe
from tracesft.evaluate.eval_set import EvalProblem, renamed_problems
from tracesft.generate.batching import (
    GenerationCache,
    GenerationStats,
    cache_key,
    engine_decoder,
    generate_all,
    generation_signature,
    hf_decoder,
)
from tracesft.generate.engine import supports
from tracesft.generate.inference import directory_fingerprint, engine_name, load_for_inference, model_identity
from tracesft.evaluate.metrics import ScoreReport, score_report
from tracesft.train.modeling import load_tokenizer
from tracesft.data.prompting import build_prompt

TEST, RENAMED, VALIDATION = "test", "renamed", "validation"


class Prediction(BaseModel):
    row: int
    label: int
    template: str
    num_variables: int
    output: str
    answer: Answer
    input: str = ""  # the problem as shown to the model (renamed variables in the robustness set)


class SetResult(BaseModel):
    scores: ScoreReport
    predictions: list[Prediction]


class EvalReport(BaseModel):
    model: str  # "base" or "fine-tuned"
    scores: ScoreReport  # on the eval set: what registration and the promotion gate read
    predictions: list[Prediction]
    renamed: SetResult | None = None  # the eval set with variables renamed A→Z, B→Y, …
    validation: SetResult | None = None  # the traces' validation split
    generation: GenerationStats | None = None

    @computed_field
    @property
    def robustness_f1_drop(self) -> float | None:
        """F1 on the eval set minus F1 on the renamed one: what renaming the variables costs."""
        return None if self.renamed is None else self.scores.f1 - self.renamed.scores.f1


def score_predictions(predictions: list[Prediction]) -> ScoreReport:
    return score_report(
        [p.label for p in predictions],
        [p.answer for p in predictions],
        [p.template for p in predictions],
        [p.num_variables for p in predictions],
    )


def evaluate(
    base_model: str,
    problems: list[EvalProblem],
    settings: EvalSettings,
    recipe: TrainingRecipe,
    device: Device,
    adapter_path: Path | None = None,
    revision: str | None = None,
    validation: list[EvalProblem] | None = None,
) -> EvalReport:
    sets = {TEST: problems}
    if settings.renamed_variables:
        sets[RENAMED] = renamed_problems(problems)
    if settings.validation_split and validation:
        sets[VALIDATION] = validation

    tokenizer = load_tokenizer(base_model, revision)
    model = load_for_inference(base_model, recipe, settings, device, adapter_path, revision)
    engine = engine_name(model, recipe, settings, device)
    flat = [(name, problem) for name, items in sets.items() for problem in items]
    prompts = [build_prompt(tokenizer, problem.query) for _, problem in flat]
    cache = GenerationCache(settings.cache_dir) if settings.cache_dir else None
    identity = model_identity(base_model, revision)
    adapter = directory_fingerprint(adapter_path) if adapter_path is not None else None
    signature = generation_signature(settings, engine)
    keys = [cache_key(identity, adapter, prompt, signature) for prompt in prompts]
    from_cache = sum(1 for key in keys if cache is not None and cache.get(key) is not None)

    if settings.do_sample:
        torch.manual_seed(settings.seed)
    label = "base" if adapter_path is None else "fine-tuned"
    on_engine = settings.fast_inference and supports(model)
    engine_runs: list[dict[str, Any]] = []  # one summary per engine (an out-of-memory restart is another)
    decoder = engine_decoder(model, tokenizer, settings, engine_runs.append) if on_engine else hf_decoder(model, tokenizer, settings)
    started = time.perf_counter()
    outputs, final_batch_size = generate_all(
        [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
        decoder,
        settings.batch_size,
        settings.max_new_tokens,
        keys=keys if cache is not None else None,
        cache=cache,
        description=f"evaluating {label}",
    )
    seconds = time.perf_counter() - started
    predictions: dict[str, list[Prediction]] = {name: [] for name in sets}
    for (name, problem), text in zip(flat, outputs):
        predictions[name].append(
            Prediction(
                row=problem.row,
                label=problem.label,
                template=problem.template,
                num_variables=problem.num_variables,
                output=text,
                answer=extract_answer(text),
                input=problem.query,
            )
        )
    extra = {name: SetResult(scores=score_predictions(p), predictions=p) for name, p in predictions.items() if name != TEST}
    return EvalReport(
        model=label,
        scores=score_predictions(predictions[TEST]),
        predictions=predictions[TEST],
        renamed=extra.get(RENAMED),
        validation=extra.get(VALIDATION),
        generation=GenerationStats(
            examples=len(prompts),
            from_cache=from_cache,
            generated=len(prompts) - from_cache,
            final_batch_size=final_batch_size,
            engine=engine,
            seconds=round(seconds, 2),
            generated_tokens=sum(run["generated_tokens"] for run in engine_runs) if on_engine else None,
            preemptions=sum(run["preemptions"] for run in engine_runs) if on_engine else None,
        ),
    )
