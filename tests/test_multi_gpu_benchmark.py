"""`benchmarks/multi_gpu.py`: a CPU smoke test (gloo, tiny Qwen2, ddp) of the plumbing its GPU run
depends on, the adapter save check and the headline fields, not a measurement."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("multi_gpu")


def test_save_check_saves_through_the_training_step_and_the_reloaded_adapter_gives_the_same_loss(tmp_path):
    out = tmp_path / "fsdp_save_tiny.json"
    # ~15 s on 2 idle cores. The launch's own limit comes first, so a stalled launch fails with
    # its workers' log (the benchmark prints its tail) rather than a bare timeout here.
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "multi_gpu.py"), "--tiny", "--save-check",
                                "--run-timeout", "300", "--out", str(out)], capture_output=True, text=True, timeout=480)
    assert completed.returncode == 0 and out.exists(), completed.stderr[-3000:]
    assert "error" not in json.loads(out.read_text())["runs"]["ddp"], completed.stderr[-3000:]
    report = json.loads(out.read_text())
    run = report["runs"]["ddp"]
    assert report["loss_match"] and run["loss_match"] and run["reloaded_loss"] == pytest.approx(run["loss_before_save"], rel=1e-4)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(run["files"])
    assert run["tensor_count"] == 2 * 7 * 2  # lora_A and lora_B on seven projections in 2 layers
    assert run["save_s"] >= 0 and len(run["save_peak_gpu_gib_per_rank"]) == 2
    assert len(run["rank0_max_rss_gib_before_after"]) == 2


def test_headline_names_the_faster_two_gpu_strategy_and_whether_every_loss_matched(bench):
    row = {"error": None, "loss_match": True}
    rows = [row | {"gpus": 1, "strategy": "ddp", "tokens_per_s": 10, "scaling": 1.0},
            row | {"gpus": 2, "strategy": "ddp", "tokens_per_s": 19, "scaling": 1.9},
            row | {"gpus": 1, "strategy": "fsdp_qlora", "tokens_per_s": 8, "scaling": 1.0},
            row | {"gpus": 2, "strategy": "fsdp_qlora", "tokens_per_s": 12, "scaling": 1.5}]
    assert bench.headline(rows) == {"strategy": "ddp", "scaling": 1.9, "loss_match": True}
    rows[3] |= {"loss_match": False}
    assert bench.headline(rows)["loss_match"] is False
