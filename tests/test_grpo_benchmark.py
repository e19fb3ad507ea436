"""`benchmarks/grpo_throughput.py` times the trainer the GRPO step trains with: a CPU smoke test
of its plumbing on a tiny Qwen2 (both generation backends, one timed step each), not a measurement."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    return importlib.import_module("grpo_throughput")


def test_the_measured_path_is_the_one_the_grpo_step_trains_with(bench):
    import tracesft.rl.grpo as grpo

    module, name = bench.MEASURED_PATH.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is grpo.prepare_grpo
    assert importlib.import_module("steps.train_grpo_adapter").train_grpo is grpo.train_grpo


def test_tiny_run_times_both_backends_generation_and_update(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's --tiny
    try:
        report = bench.run(bench.BACKENDS, steps=1, tiny=True, prompts=2, generations=2, completion_length=8, workdir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    for backend in bench.BACKENDS:
        run = report["runs"][backend]
        assert "error" not in run, run
        assert run["completion_tokens"] > 0 and run["generation_tokens_per_s"] > 0 and run["update_tokens_per_s"] > 0
        assert run["trainable_parameters"] > 0
    assert list(tmp_path.iterdir()) == []  # the random base, the parent and the runs' outputs are cleaned up
