"""Stage 2, training: the base model loaded as the recipe says, QLoRA with TRL, the adapter saved.

`modeling` loads the base (4-bit on CUDA), `training` runs TRL's `SFTTrainer`, `distributed`
launches one process per GPU, `tracking` connects MLflow.
"""
