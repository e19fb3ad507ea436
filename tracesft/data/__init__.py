"""Stage 1, the data: GPT results in, verified traces out, validated, split for training.

ingest → verify (answer extraction, the exact solver) → quality gate (Great Expectations) →
SFT dataset. `prompting` writes every prompt and target, for training and evaluation alike.
"""
