"""ZenML steps: thin wrappers that connect the `tracesft` library functions into a pipeline."""

from steps.build_sft_dataset import build_sft_dataset
from steps.compare_models import compare_models
from steps.evaluate_model import evaluate_model
from steps.generate_grpo_problems import generate_grpo_problems
from steps.ingest_traces import ingest_traces
from steps.load_eval_problems import load_eval_problems
from steps.load_parent_adapter import load_parent_adapter
from steps.load_validation_problems import load_validation_problems
from steps.promote_adapter import promote_adapter
from steps.register_adapter import register_adapter
from steps.train_adapter import train_adapter
from steps.train_grpo_adapter import train_grpo_adapter
from steps.validate_traces import validate_traces
from steps.verify_traces import verify_traces

__all__ = [
    "build_sft_dataset",
    "compare_models",
    "evaluate_model",
    "generate_grpo_problems",
    "ingest_traces",
    "load_eval_problems",
    "load_parent_adapter",
    "load_validation_problems",
    "promote_adapter",
    "register_adapter",
    "train_adapter",
    "train_grpo_adapter",
    "validate_traces",
    "verify_traces",
]
