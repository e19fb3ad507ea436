"""Batched generation that survives what long evaluations meet: out-of-memory and interruption.

- Prompts are sorted longest first and cut into batches, so each batch pads little and the
  batch most likely to exhaust memory comes first.
- A batch that runs out of GPU memory is retried at half the size, down to one prompt; the
  smaller size is kept for the rest of the run (later prompts are no longer).
- Every finished example is written to an on-disk cache at once, keyed by what determines its
  output (model identity, adapter content, prompt, generation settings); a rerun after an
  interruption generates only what is missing.

`generate_in_batches` takes the batch generator as a function, so this control flow is the same
whatever produces the text; `hf_batch_generator` is the transformers one evaluation uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from tracesft.config import EvalSettings
from tracesft.errors import TracesftError

logger = logging.getLogger(__name__)

BatchGenerator = Callable[[list[list[int]]], list[str]]


class GenerationStats(BaseModel):
    examples: int
    from_cache: int
    generated: int
    final_batch_size: int
    engine: str


class GenerationCache:
    """One small JSON file per example under `root`, written atomically (write, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["output"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None  # absent, or torn by a crash mid-write of an older version: generate again

    def put(self, key: str, output: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps({"output": output}), encoding="utf-8")
        os.replace(temporary, path)


def cache_key(model: str, adapter: str | None, prompt: str, generation: dict[str, Any]) -> str:
    """SHA-256 of everything that decides an example's output."""
    payload = json.dumps({"model": model, "adapter": adapter, "prompt": prompt, "generation": generation}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def generation_signature(settings: EvalSettings, engine: str) -> dict[str, Any]:
    """The generation settings that change outputs (not batch size or bucketing, which only pad)."""
    signature: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "engine": engine}
    if settings.do_sample:
        signature |= {"temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed}
    return signature


def generate_in_batches(
    prompts: list[list[int]],
    generate_batch: BatchGenerator,
    batch_size: int,
    keys: list[str] | None = None,
    cache: GenerationCache | None = None,
    description: str = "generating",
) -> tuple[list[str], int]:
    """Outputs for the tokenised `prompts`, in their order, and the batch size that held.

    With a `cache` (and one key per prompt), cached examples are not generated again and each
    new one is cached as soon as its batch finishes.
    """
    if cache is not None and (keys is None or len(keys) != len(prompts)):
        raise ValueError("a generation cache needs one key per prompt")
    outputs: list[str | None] = [cache.get(key) for key in keys] if cache is not None else [None] * len(prompts)
    todo = sorted((i for i, out in enumerate(outputs) if out is None), key=lambda i: -len(prompts[i]))
    size, position = batch_size, 0
    with tqdm(total=len(todo), desc=description, unit="example", disable=not todo) as progress:
        while position < len(todo):
            batch = todo[position : position + size]
            try:
                texts = generate_batch([prompts[i] for i in batch])
            except torch.cuda.OutOfMemoryError:
                if len(batch) == 1:
                    raise TracesftError(
                        "out of GPU memory generating a single example; lower `evaluation.max_new_tokens` "
                        "or use a GPU with more memory."
                    ) from None
                size = max(1, len(batch) // 2)
                logger.warning("out of GPU memory at batch size %d; retrying the batch at %d", len(batch), size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            for index, text in zip(batch, texts, strict=True):
                outputs[index] = text
                if cache is not None:
                    cache.put(keys[index], text)
            position += len(batch)
            progress.update(len(batch))
    return [out if out is not None else "" for out in outputs], size


def generate_options(settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """`generate` keyword arguments for `settings` (shared with benchmarks/eval_throughput.py)."""
    options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens}
    if settings.do_sample:
        options |= {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    else:
        options |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return options


def hf_batch_generator(model: Any, tokenizer: Any, settings: EvalSettings) -> BatchGenerator:
    """`model.generate` on left-padded batches; new tokens decoded without special tokens.

    Prompts are padded to a multiple of `pad_to_multiple_of`, so few distinct shapes occur. The
    KV cache is transformers' dynamic one: a static cache with the step compiled into CUDA graphs
    was measured slower on the 32B (BENCHMARKS.md).
    """
    tokenizer.padding_side = "left"
    options = generate_options(settings, model.device) | {"pad_token_id": tokenizer.pad_token_id}

    def generate_batch(batch: list[list[int]]) -> list[str]:
        inputs = tokenizer.pad(
            {"input_ids": batch}, pad_to_multiple_of=settings.pad_to_multiple_of, return_tensors="pt"
        ).to(model.device)
        with torch.inference_mode():
            generated = model.generate(**inputs, **options)
        return tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate_batch
