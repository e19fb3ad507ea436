"""Reinforcement learning on the fine-tuned model: GRPO with a reward the exact solver verifies."""
