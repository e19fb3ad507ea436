"""Stage 3, evaluation: score the base and the fine-tuned model on the same Corr2Cause problems.

`eval_set` reads the problems, `evaluation` generates and extracts answers, `metrics` computes
the benchmark's own F1, `comparison` pairs base against fine-tuned for the promotion gate.
"""
