"""Scoring a model (the base, or the base plus an adapter) on Corr2Cause problems.

Generation uses the same prompt as training (`build_prompt`), greedy by default, in batches of
similar prompt lengths so little compute goes to padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from tracesft.answers import Answer, extract_answer
from tracesft.config import EvalSettings, TrainingRecipe
from tracesft.eval_set import EvalProblem
from tracesft.metrics import ScoreReport, score_report
from tracesft.modeling import load_base_model, load_tokenizer
from tracesft.prompting import build_prompt


class Prediction(BaseModel):
    row: int
    label: int
    template: str
    num_variables: int
    output: str
    answer: Answer


class EvalReport(BaseModel):
    model: str  # "base" or "fine-tuned"
    scores: ScoreReport
    predictions: list[Prediction]


def generate(model: Any, tokenizer: Any, prompts: list[str], settings: EvalSettings) -> list[str]:
    """Completions for `prompts`, in their order, batched longest-first."""
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            generated = model.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if settings.do_sample else {"do_sample": False}),
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        for index, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[index] = text
    return outputs


def is_full_model(path: Path) -> bool:
    """A fully fine-tuned model's directory (weights + config), as opposed to a LoRA adapter's."""
    return not (Path(path) / "adapter_config.json").exists() and (Path(path) / "config.json").exists()


def evaluate(
    base_model: str,
    problems: list[EvalProblem],
    settings: EvalSettings,
    recipe: TrainingRecipe,
    adapter_path: Path | None = None,
    revision: str | None = None,
) -> EvalReport:
    tokenizer = load_tokenizer(base_model, revision)
    if adapter_path is not None and is_full_model(adapter_path):  # trained with use_lora: false
        model = load_base_model(str(adapter_path), recipe)
    else:
        model = load_base_model(base_model, recipe, revision)
    if adapter_path is not None and not is_full_model(adapter_path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    model.eval()
    outputs = generate(model, tokenizer, [build_prompt(tokenizer, p.query) for p in problems], settings)
    predictions = [
        Prediction(
            row=p.row,
            label=p.label,
            template=p.template,
            num_variables=p.num_variables,
            output=text,
            answer=extract_answer(text),
        )
        for p, text in zip(problems, outputs)
    ]
    report = score_report(
        [p.label for p in predictions],
        [p.answer for p in predictions],
        [p.template for p in predictions],
        [p.num_variables for p in predictions],
    )
    return EvalReport(model="base" if adapter_path is None else "fine-tuned", scores=report, predictions=predictions)
