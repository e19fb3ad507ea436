"""Which decoder layers are recomputed in backward: `training.memory_budget_gib`'s plan applied to the model.

transformers turns checkpointing on for every layer inside `Trainer.train`, just before the
`on_train_begin` callbacks (each `GradientCheckpointingLayer` carries its own
`gradient_checkpointing` flag); its own `every_n_layers` only spaces checkpointed layers evenly,
which cannot say "the last N". So a callback switches the flag off on the last `kept_layers`
layers there, and counts the layers left recomputing, which the training summary reports. The
layers left recomputing keep their 4-bit weights dequantised by the recompute for their backward
(`tracesft.train.recompute_weights`).

Where the plan is not applied, every layer is recomputed as before, with a logged reason: under
`fsdp_qlora` (the estimate assumes the whole base on one GPU, and partial checkpointing inside
FSDP's wrapped units is untested on a GPU) and for full fine-tuning (the estimate counts LoRA's
parameters, gradients and optimizer state, not the whole model's). On the CPU it applies as on a
GPU, with float32 sizes: host memory is bounded too, and it keeps one path, tested on the CPU.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from tracesft.config import TrainingRecipe
from tracesft.train.memory_plan import DecoderShape, MemoryPlan, plan_memory
from tracesft.train.recompute_weights import keep_recomputed_weights

logger = logging.getLogger(__name__)


def training_memory_plan(model: Any, recipe: TrainingRecipe, row_tokens: int, optimizer: str) -> MemoryPlan | None:
    """The plan for this loaded base and recipe, or None where every layer is recomputed (or none is)."""
    if not recipe.gradient_checkpointing or recipe.memory_budget_gib is None:
        return None
    if recipe.distributed.num_processes > 1 and recipe.distributed.strategy == "fsdp_qlora":
        logger.info("training.memory_budget_gib is not applied under fsdp_qlora (the estimate assumes the whole base "
                    "on one GPU): every layer is recomputed.")
        return None
    if not recipe.use_lora:
        logger.info("training.memory_budget_gib is not applied to full fine-tuning (the estimate counts LoRA's "
                    "optimizer state only): every layer is recomputed.")
        return None
    element = model.dtype.itemsize  # activations and LoRA weights: bf16 on a GPU (TRL's cast), float32 on the CPU
    return plan_memory(
        DecoderShape.of(model.config),
        row_tokens,
        recipe.lora_r,
        recipe.target_modules,
        recipe.lora_dropout,
        model.get_memory_footprint(),
        recipe.memory_budget_gib,
        activation_bytes=element,
        lora_parameter_bytes=element,
        optimizer_state_bytes=2 if "8bit" in optimizer else 2 * element,
        kept_weight_bytes=element if recipe.fast_lora and getattr(model, "is_loaded_in_4bit", False) else 0,
    )


class LayerCheckpointing(TrainerCallback):
    """Keeps the activations of the plan's last layers once transformers has checkpointed them all."""

    def __init__(self, plan: MemoryPlan | None) -> None:
        self.plan = plan
        self.recomputed_layers: int | None = None  # counted as training begins

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        plan = self.plan
        if plan is not None and len(layers) != plan.layers:
            logger.warning("memory plan for %d layers, but the model has %d checkpointable ones: not applied.",
                           plan.layers, len(layers))
        elif plan is not None:
            for layer in layers[len(layers) - plan.kept_layers:]:
                layer.gradient_checkpointing = False
            logger.info("Keeping the activations of %d of %d layers (estimated peak %.1f GiB of the %g GiB budget, "
                        "training.memory_budget_gib).", plan.kept_layers, plan.layers, plan.estimated_peak_gib,
                        plan.budget_gib)
        for layer in layers:
            if layer.gradient_checkpointing:
                keep_recomputed_weights(layer)
        self.recomputed_layers = sum(bool(layer.gradient_checkpointing) for layer in layers)
