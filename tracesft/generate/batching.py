"""Generating many answers in a way that survives what long evaluations meet: out-of-memory and interruption.

- Prompts are sorted longest first, so the requests most likely to exhaust memory come first.
- A decoder that runs out of GPU memory is restarted at half the concurrency, down to one
  sequence, with only the answers still missing; the smaller size is kept for the rest of the run.
- Every finished answer is written to an on-disk cache at once, keyed by what determines its
  output (model identity, adapter content, prompt, generation settings); a rerun after an
  interruption generates only what is missing.

`generate_all` takes the decoder as a function, so this control flow is the same whatever
produces the text: `engine_decoder` (continuous batching, `tracesft.generate.engine`) or
`hf_decoder` (transformers' `generate` in static batches, the seed's way).
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
from pydantic import BaseModel, computed_field
from tqdm.auto import tqdm

from tracesft.config import EvalSettings
from tracesft.errors import TracesftError

logger = logging.getLogger(__name__)

# decode(prompts, limits, concurrency, finished): calls finished(position, text) as each answer ends.
Decoder = Callable[[list[list[int]], list[int], int, Callable[[int, str], None]], None]


class GenerationStats(BaseModel):
    """How an evaluation's answers were produced, and what it cost (step metadata, MLflow metrics).

    `seconds` is the wall time of generation (cache reads included); `generated_tokens` and
    `preemptions` are the engine's counts (None when HF `generate` decoded). The timing fields
    default to None so that reports stored before they existed still load.
    """

    examples: int
    from_cache: int
    generated: int
    final_batch_size: int
    engine: str
    seconds: float | None = None
    generated_tokens: int | None = None
    preemptions: int | None = None

    @computed_field
    @property
    def tokens_per_s(self) -> float | None:
        """New tokens per second of generation: the figure BENCHMARKS.md reports for the engine."""
        if self.generated_tokens is None or not self.seconds:
            return None
        return round(self.generated_tokens / self.seconds, 1)


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


def generate_all(
    prompts: list[list[int]],
    decode: Decoder,
    concurrency: int,
    max_new_tokens: int | list[int],
    keys: list[str] | None = None,
    cache: GenerationCache | None = None,
    description: str = "generating",
) -> tuple[list[str], int]:
    """Outputs for the tokenised `prompts`, in their order, and the concurrency that held.

    With a `cache` (and one key per prompt), cached answers are not generated again and each new
    one is cached the moment it is finished.
    """
    if cache is not None and (keys is None or len(keys) != len(prompts)):
        raise ValueError("a generation cache needs one key per prompt")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    outputs: list[str | None] = [cache.get(key) for key in keys] if cache is not None else [None] * len(prompts)
    todo = sorted((i for i, out in enumerate(outputs) if out is None), key=lambda i: -len(prompts[i]))
    size = concurrency
    with tqdm(total=len(todo), desc=description, unit="example", disable=not todo) as progress:
        while todo:

            def finished(position: int, text: str, todo: list[int] = todo) -> None:
                index = todo[position]
                outputs[index] = text
                if cache is not None:
                    cache.put(keys[index], text)
                progress.update(1)

            out_of_memory = False
            try:
                decode([prompts[i] for i in todo], [limits[i] for i in todo], size, finished)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise TracesftError(
                        "out of GPU memory generating a single example; lower `evaluation.max_new_tokens` "
                        "or use a GPU with more memory."
                    ) from None
                out_of_memory = True
            if out_of_memory:  # outside the handler: its traceback no longer holds the failed decoder's memory
                size = max(1, size // 2)
                logger.warning("out of GPU memory; continuing at concurrency %d", size)
                torch.cuda.empty_cache()
            todo = [i for i in todo if outputs[i] is None]
    return [out if out is not None else "" for out in outputs], size


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: the model's generation config's, else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def engine_decoder(model: Any, tokenizer: Any, settings: EvalSettings,
                   on_stats: Callable[[dict[str, Any]], None] | None = None) -> Decoder:
    """Continuous batching (`tracesft.generate.engine`) with a KV cache planned by `plan_cache`.

    Each engine's `EngineStats.summary()` is logged and, with `on_stats`, handed over (one per
    engine: a restart at a smaller concurrency after running out of memory is another engine).
    """
    from tracesft.generate.engine import Engine, Sampling

    stop = stop_tokens(model, tokenizer)

    def decode(prompts: list[list[int]], limits: list[int], concurrency: int, finished: Callable[[int, str], None]) -> None:
        max_len = max(len(p) + n for p, n in zip(prompts, limits))
        plan = plan_cache(model, prompts, limits, concurrency)
        logger.info("decoding %d prompts in %d rows of up to %d positions, %s KV blocks", len(prompts), plan.rows, max_len,
                    plan.blocks if plan.blocks is not None else "enough")
        sampling = Sampling()
        if settings.do_sample:
            generator = torch.Generator(device=model.device).manual_seed(settings.seed)
            sampling = Sampling(settings.temperature, settings.top_p, generator)
        engine = Engine(model, plan.rows, max_len, blocks=plan.blocks)
        engine.run(prompts, limits, lambda i, ids: finished(i, tokenizer.decode(ids, skip_special_tokens=True)),
                   stop_tokens=stop, sampling=sampling)
        summary = engine.stats.summary()
        logger.info("decoded in %.1f s: %d steps, %.1f of %d rows busy on average, prefill %.1f s, %d preempted",
                    summary["run_s"], summary["steps"], summary["mean_busy_rows"], plan.rows, summary["prefill_s"],
                    summary["preemptions"])
        if on_stats is not None:
            on_stats(summary)

    return decode


class CachePlan(BaseModel):
    rows: int  # decoding rows (requests in flight at most)
    blocks: int | None  # KV blocks; None: enough for every row at full length (no GPU limit)


def plan_cache(model: Any, prompts: list[list[int]], limits: list[int], concurrency: int) -> CachePlan:
    """Rows: as many as `concurrency` asks (and as there are prompts). KV blocks: as many as fit
    in the GPU memory left, less room for the prefill's activations (`engine.PREFILL_TOKENS` rows
    through the widest layer, twice over) and 2 GiB besides.

    The rows are not sized for every answer at full length: the engine admits a request when
    its prompt fits and preempts (then recomputes) the latest admitted when growing answers fill
    the pool, so memory holds what is in flight.
    """
    from tracesft.generate.engine import CUDA_BLOCK_SIZE, PREFILL_TOKENS, free_gpu_bytes, kv_bytes_per_position

    rows = min(concurrency, len(prompts))
    if model.device.type != "cuda":
        return CachePlan(rows=rows, blocks=None)
    config = model.config
    element = model.lm_head.weight.element_size()
    activations = 2 * PREFILL_TOKENS * (4 * config.hidden_size + 3 * config.intermediate_size) * element
    free = free_gpu_bytes(model.device)
    blocks = (free - activations - 2 * 2**30) // (kv_bytes_per_position(config, model.lm_head.weight.dtype) * CUDA_BLOCK_SIZE)
    logger.info("KV pool: %d blocks of %d positions (%.1f GiB free, %.1f GiB allocated)", blocks, CUDA_BLOCK_SIZE,
                free / 2**30, torch.cuda.memory_allocated(model.device) / 2**30)
    longest = max(len(p) + n for p, n in zip(prompts, limits))
    if (blocks - 1) * CUDA_BLOCK_SIZE < longest:
        raise torch.cuda.OutOfMemoryError(f"no room for the KV cache of one request of {longest} positions")
    return CachePlan(rows=rows, blocks=None if fits_every_row(blocks, rows, longest, CUDA_BLOCK_SIZE) else int(blocks))


def fits_every_row(blocks: int, rows: int, longest: int, block_size: int) -> bool:
    """Whether `blocks` hold every row at the longest request's length: then the engine's own pool
    (exactly that, `blocks=None`) is planned instead, and the rest of the GPU stays free. A GRPO
    rollout (32 answers of ~330 positions on the 32B) otherwise took the whole card (a 135 GiB
    peak on an H200) for ~3 GB of keys and values."""
    from tracesft.generate.engine import blocks_for_every_row

    return blocks >= blocks_for_every_row(rows, longest, block_size)


def generate_options(settings: EvalSettings) -> dict[str, Any]:
    """`generate` keyword arguments for `settings` (shared with benchmarks/eval_throughput.py)."""
    options: dict[str, Any] = {}
    if settings.do_sample:
        options |= {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    else:
        options |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return options


def hf_decoder(model: Any, tokenizer: Any, settings: EvalSettings) -> Decoder:
    """`model.generate` on left-padded static batches of `concurrency` prompts, as the seed decodes.

    Each batch runs to its longest answer. Prompts are padded to a multiple of
    `pad_to_multiple_of`, so few distinct shapes occur.
    """
    options = generate_options(settings) | {"pad_token_id": tokenizer.pad_token_id}

    def decode(prompts: list[list[int]], limits: list[int], concurrency: int, finished: Callable[[int, str], None]) -> None:
        for start in range(0, len(prompts), concurrency):
            batch = prompts[start : start + concurrency]
            inputs = tokenizer.pad(
                {"input_ids": batch}, padding_side="left", pad_to_multiple_of=settings.pad_to_multiple_of, return_tensors="pt"
            ).to(model.device)
            with torch.inference_mode():
                generated = model.generate(**inputs, **options, max_new_tokens=max(limits[start : start + concurrency]))
            new = generated[:, inputs["input_ids"].shape[1] :]
            for offset, row in enumerate(new):
                finished(start + offset, tokenizer.decode(row[: limits[start + offset]], skip_special_tokens=True))

    return decode
