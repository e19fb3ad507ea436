"""slurm/sft_train.slurm: shellcheck clean, and its body run as SLURM would run it (SLURM variables
faked, no sbatch here), on the embedded tiny model on the CPU, in a temporary working directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracesft.data.sample_data import DATA, TRACE_FILES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "sft_train.slurm"


def test_script_is_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_header_asks_for_one_gpu_node_and_logs_by_job_name_and_id():
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    options = dict(line.split()[1].lstrip("-").split("=", 1) for line in header)
    assert options["nodes"] == "1" and options["gres"] == "gpu:1"
    assert {"partition", "time", "mem", "cpus-per-task"} <= set(options)
    assert options["output"] == "%x-%j.out"


def _run_job(workdir: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "tracesft-sft",
        "SLURM_SUBMIT_DIR": str(REPO),
        "TRACESFT_WORKDIR": str(workdir),
        "TRACESFT_VENV": sys.prefix,
        "TRACESFT_IMAGE": str(workdir / "no-such-image.sif"),
        "CUDA_VISIBLE_DEVICES": "",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'team-mlflow.db'}",
        **environment,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_job_runs_the_pipeline_in_the_venv_and_registers_an_adapter(tmp_path):
    traces = tmp_path / "incoming"
    traces.mkdir()
    for name in TRACE_FILES:
        shutil.copy(DATA / "sample_traces" / name, traces)

    job = _run_job(tmp_path, TRACESFT_CONFIG="", TRACESFT_TRACES=str(traces), PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True,max_split_size_mb:256")

    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "job 4242 (tracesft-sft)" in job.stdout
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,max_split_size_mb:256" in job.stdout
    assert "venv " + sys.prefix in job.stdout
    assert "Registry: corr2cause-tiny-lora version 1 registered" in job.stdout
    assert (tmp_path / "team-mlflow.db").exists(), "MLFLOW_TRACKING_URI from the environment must win"
    assert (tmp_path / ".tracesft" / "tiny-model" / "config.json").exists()
    assert not (REPO / ".tracesft" / "incoming").exists()


def test_job_exits_non_zero_when_the_pipeline_fails(tmp_path):
    job = _run_job(tmp_path, TRACESFT_CONFIG="", TRACESFT_TRACES=str(tmp_path / "missing"), PYTORCH_CUDA_ALLOC_CONF="")

    assert job.returncode == 2
    assert "no such file or folder" in job.stderr and "tracesft failed with exit code 2" in job.stderr
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in job.stdout  # the default when unset
