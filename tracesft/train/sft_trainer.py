"""TRL's `SFTTrainer`, counting each micro-batch's floating-point operations from a parameter count taken once.

The Trainer adds 6 × tokens × the model's parameters outside its embeddings to `total_flos` after
every micro-batch (`Trainer.floating_point_ops`), and counts those parameters anew each time
(`PreTrainedModel.num_parameters` walks every module and parameter): 7 ms on this project's CPU
for a 64-layer model's 1,667 tensors, and 12-25 ms of idle GPU a micro-batch on an H200 host
(`benchmarks/train_throughput.py --gpu-idle`), where short packed rows leave the GPU waiting on
the host as a backward ends. The model does not change while it trains, so the count is taken
once; the Trainer's docstring names this method as the one to override. The FLOPs reported are
the Trainer's to the unit.
"""

from __future__ import annotations

import functools
from typing import Any

from trl import SFTTrainer as TrlSFTTrainer


class SFTTrainer(TrlSFTTrainer):
    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        return 6 * inputs[main_input].numel() * self._parameters_outside_embeddings

    @functools.cached_property
    def _parameters_outside_embeddings(self) -> int:
        return self.model.num_parameters(exclude_embeddings=True)
