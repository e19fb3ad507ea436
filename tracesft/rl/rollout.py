"""GRPO's generation phase through the project's continuous-batching engine.

TRL 1.16's `GRPOTrainer` accepts a `rollout_func` (experimental in TRL: it warns once): it gets
the step's prompts, each repeated `num_generations` times, and returns prompt and completion ids.
This one renders each prompt with the chat template as `build_prompt` does, tokenizes it without
added special tokens (the template writes the BOS; TRL's own path for plain-text prompts would add
a second), and decodes all of them at once with `tracesft.generate.engine.Engine` on the policy
being trained: PEFT's LoRA layers compute the unmerged adapter as they do in the loss, in eval
mode (no LoRA dropout), under `inference_mode`.

Why the engine rather than TRL's transformers backend: a GRPO step generates 64 answers of
widely varying length; HF `generate` runs each static batch to its longest answer, the engine
refills a slot as soon as an answer ends. No sampling log-probabilities are returned: the
sampler and the trainer compute the same policy, so TRL's importance-sampling correction (for
vLLM's numerically different policy) has nothing to correct.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from tracesft.config import GrpoSettings
from tracesft.generate.batching import plan_cache, stop_tokens
from tracesft.generate.engine import Engine, Sampling


def engine_rollout(tokenizer: Any, settings: GrpoSettings) -> Any:
    """A TRL `rollout_func` sampling `settings.max_completion_length` tokens at most per prompt."""

    def rollout(prompts: list[list[dict[str, str]]], trainer: Any) -> dict[str, Any]:
        prompt_ids = [
            tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
            for messages in prompts
        ]
        policy = trainer.model
        decoder = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        limits = [settings.max_completion_length] * len(prompt_ids)
        max_len = max(len(ids) for ids in prompt_ids) + settings.max_completion_length
        plan = plan_cache(decoder, prompt_ids, limits, concurrency=len(prompt_ids))  # evaluation's rule for the KV pool
        generator = torch.Generator(device=decoder.device).manual_seed(settings.seed + trainer.state.global_step)
        completions: list[list[int]] = [[] for _ in prompt_ids]

        def finished(index: int, ids: list[int]) -> None:
            completions[index] = list(ids)

        was_training = policy.training
        policy.eval()
        engine = Engine(decoder, plan.rows, max_len, blocks=plan.blocks)
        try:
            engine.run(prompt_ids, limits, finished, stop_tokens=stop_tokens(decoder, tokenizer),
                       sampling=Sampling(settings.temperature, settings.top_p, generator))
        finally:
            policy.train(was_training)
            # The KV pool (the free GPU memory when every row at full length does not fit) and the
            # decode graphs' own memory pool: hand both to the update phase now, not when the
            # collector finds them.
            del engine
            if decoder.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout
