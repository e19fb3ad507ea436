"""`benchmarks/train_throughput.py` times the function the training step calls: a CPU smoke test
of its plumbing on a tiny Qwen2, not a measurement."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("train_throughput")


def test_the_measured_path_is_the_function_the_training_step_calls(bench):
    step_module = importlib.import_module("steps.train_adapter")  # `steps` exports the step under this name
    module, name = bench.MEASURED_PATH.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is step_module.train


def test_tiny_run_trains_both_paths_through_trl_with_the_same_loss_before_any_update(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's --tiny: a 128-wide model only loses from threads on a busy CPU
    try:
        report = bench.run((bench.SEED, bench.PROJECT), ("lognormal_1200",), steps=1, tiny=True, workdir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    seed, project = (report["runs"][name]["lognormal_1200"] for name in ("seed", "project"))
    assert report["same_loss"] and seed["tokens"] > 0 and project["tokens"] > 0
    assert not seed["setup"]["packing"] and seed["setup"]["attention"] == "sdpa"
    assert project["setup"]["packing"] and project["packed_attention_calls"] > 0
    assert list(tmp_path.iterdir()) == []  # the random base and the runs' outputs are cleaned up


def test_tiny_budgets_report_the_plan_beside_the_run_with_every_layer_recomputed(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = bench.run(bench.budget_paths([40]), ("lognormal_1200",), steps=1, tiny=True, workdir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    recomputed, budget = report["memory_budget"].values()
    assert recomputed["recomputed_layers"] == 2 and recomputed["kept_layers"] is None and recomputed["speedup"] == 1
    assert (budget["budget_gib"], budget["kept_layers"], budget["recomputed_layers"]) == (40, 2, 0)  # a tiny model fits
    assert 0 < budget["estimated_peak_gib"] < 1 and budget["tokens_per_s"] > 0 and report["same_loss"]


def test_gpu_idle_report_merges_overlapping_kernels_and_names_what_ended_each_gap(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_idle = importlib.import_module("gpu_idle")
    kernels = [(0, 100, "gemm"), (50, 120, "copy"), (170, 200, "dropout"), (2200, 2300, "gemm"), (2305, 2400, "add")]
    report = gpu_idle.idle_report(kernels)
    assert report["window_ms"] == 2.4 and report["idle_ms"] == 2.055
    assert report["busy_share"] == round(345 / 2400, 4)
    assert report["largest_gaps"][0] == {"us": 2000, "before": "dropout", "after": "gemm"}
    assert report["idle_ms_by_next_kernel"] == {"gemm": 2.0, "dropout": 0.05, "add": 0.005}
    assert report["gaps_by_size"] == {"< 10,000 us": {"count": 1, "ms": 2.0}, "< 100 us": {"count": 1, "ms": 0.05},
                                      "< 10 us": {"count": 1, "ms": 0.005}}
    assert "long_gap_ms_by_host_op" not in report  # no host ops given


def test_gpu_idle_report_sums_the_host_ops_running_in_gaps_of_a_millisecond_or_more(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_idle = importlib.import_module("gpu_idle")
    kernels = [(0, 100, "gemm"), (200, 300, "gemm"), (2300, 2400, "gemm")]  # gaps: 100 us (short), 2,000 us
    host_ops = [(0, 2400, "step"), (250, 1300, "optimizer"), (1300, 2350, "item"), (150, 190, "launch")]
    report = gpu_idle.idle_report(kernels, host_ops)
    assert report["long_gap_ms_by_host_op"] == {"step": 2.0, "item": 1.0, "optimizer": 1.0}


def test_garbage_collections_appear_in_a_profile_as_host_ops(monkeypatch):
    import gc

    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_idle = importlib.import_module("gpu_idle")
    marks = gpu_idle.GarbageCollectionMarks()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        marks.install()
        try:
            gc.collect()
        finally:
            marks.remove()
    _, host_ops = gpu_idle.profiled_intervals(profiler)
    assert "python gc (generation 2)" in {name for _, _, name in host_ops}


def test_marked_methods_appear_in_a_profile_and_are_restored(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_idle = importlib.import_module("gpu_idle")

    class Loop:
        def step(self, value):
            return value + 1

    original = Loop.__dict__["step"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        unmark = gpu_idle.mark_methods({Loop: ("step",)})
        try:
            assert Loop().step(1) == 2
        finally:
            unmark()
    assert Loop.__dict__["step"] is original
    _, host_ops = gpu_idle.profiled_intervals(profiler)
    assert "Loop.step" in {name for _, _, name in host_ops}


def test_the_micro_batch_waits_ablation_turns_the_trainers_device_reads_back_on_and_is_undone(bench):
    from tracesft.train import training

    shipped = training.NO_DEVICE_READS_BETWEEN_MICRO_BATCHES
    assert shipped == {"logging_nan_inf_filter": False, "include_num_input_tokens_seen": "no"}
    undo = bench.ABLATIONS["micro-batch-waits"].switch()
    try:
        assert training.NO_DEVICE_READS_BETWEEN_MICRO_BATCHES == {"logging_nan_inf_filter": True,
                                                                  "include_num_input_tokens_seen": "non_padding"}
    finally:
        undo()
    assert training.NO_DEVICE_READS_BETWEEN_MICRO_BATCHES is shipped

