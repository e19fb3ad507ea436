"""The production platform, checked without Docker or a cluster: the GPU image's Dockerfile
(hadolint), the build and resource configuration ZenML derives from zenml_config.yaml, the
Kubernetes pod settings, the scheduled variant, the stack recipes (shellcheck) and `make
gpu-check` on a machine without a GPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tracesft.data.sample_data import DATA, EVAL_CSV, TRACE_FILES

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GPU_STEPS = {"train_adapter", "evaluate_base", "evaluate_finetuned"}


def test_dockerfile_is_hadolint_clean_at_warning_level():
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "warning", "docker/Dockerfile"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_a_cuda_base_installs_the_lock_and_runs_as_non_root():
    lines = [line.strip() for line in (REPO / "docker" / "Dockerfile").read_text().splitlines()]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases[-1].startswith("nvidia/cuda:13.0") and ":latest" not in " ".join(bases)
    instructions = [line for line in lines if line and not line.startswith("#")]
    lock_copy = instructions.index("COPY docker/requirements.lock /tmp/requirements.lock")
    first_code_copy = next(i for i, line in enumerate(instructions) if line.startswith("COPY tracesft"))
    assert lock_copy < first_code_copy, "dependencies must be installed before code is copied"
    assert [line for line in instructions if line.startswith("USER ")][-1] == "USER 10001"
    secrets = ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY", "ARG ")
    assert not [line for line in instructions if any(word in line for word in secrets)]


def test_lock_pins_every_package_and_the_cuda_build_of_torch():
    pins = [line for line in (REPO / "docker" / "requirements.lock").read_text().splitlines() if not line.startswith("#")]
    assert all("==" in pin and "+" not in pin for pin in pins)
    names = {pin.split("==")[0] for pin in pins}
    assert {"torch", "zenml", "mlflow", "kubernetes", "s3fs", "wandb", "nvidia-cuda-runtime"} <= names
    assert "tracesft" not in names


@pytest.fixture(scope="module")
def production_snapshot(tmp_path_factory):
    """zenml_config.yaml compiled by ZenML into a pipeline snapshot, without running anything."""
    from zenml.utils import source_utils

    from pipelines.sft_pipeline import sft_pipeline

    work = tmp_path_factory.mktemp("production")
    (work / "data" / "traces").mkdir(parents=True)
    (work / "data" / "corr2cause").mkdir()
    for name in TRACE_FILES:
        shutil.copy(DATA / "sample_traces" / name, work / "data" / "traces")
    shutil.copy(DATA / EVAL_CSV, work / "data" / "corr2cause" / "test.csv")
    patch = pytest.MonkeyPatch()
    patch.setenv("TRACESFT_WORKSPACE", str(work))  # the configuration's relative paths are read against it
    source_utils.set_custom_source_root(str(REPO))
    pipeline = sft_pipeline.with_options(config_path=str(REPO / "zenml_config.yaml"))
    pipeline.prepare()
    # `_compile` is what `pipeline()` and `zenml pipeline run` call before building and running.
    snapshot, schedule, _build = pipeline._compile(**pipeline._run_args)
    patch.undo()
    return snapshot, schedule


def test_zenml_builds_the_image_from_the_dockerfile_and_adds_nothing_on_top(production_snapshot):
    from zenml.client import Client
    from zenml.config.build_configuration import BuildConfiguration
    from zenml.utils.pipeline_docker_image_builder import PipelineDockerImageBuilder

    snapshot, schedule = production_snapshot
    docker = snapshot.pipeline_configuration.docker_settings
    assert docker.dockerfile == "docker/Dockerfile" and docker.build_context_root == "."
    assert (REPO / docker.dockerfile).is_file()
    # What ZenML would install on top of the image: nothing (a layer on top would run as the
    # image's non-root user and fail), so the image is used as built from the Dockerfile.
    build = BuildConfiguration(key="orchestrator", settings=docker)
    assert PipelineDockerImageBuilder.gather_requirements_files(docker, stack=Client().active_stack, log=False) == []
    assert not docker.environment and not docker.apt_packages and not docker.install_stack_requirements
    assert not build.should_include_files(code_repository=None) and build.should_download_files(code_repository=None)
    assert schedule is None, "the schedule lives in configs/production-scheduled.yaml"
    for step in snapshot.step_configurations.values():
        assert step.config.docker_settings == docker
        assert step.config.environment["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_gpu_resources_on_training_and_evaluation_only(production_snapshot):
    snapshot, _ = production_snapshot
    resources = {name: step.config.resource_settings for name, step in snapshot.step_configurations.items()}
    assert set(resources) >= GPU_STEPS | {"ingest_traces", "verify_traces", "validate_traces", "build_sft_dataset"}
    for name, settings in resources.items():
        if name in GPU_STEPS:
            assert settings.gpu_count == 1 and settings.get_memory() >= 64
        else:
            assert not settings.gpu_count, f"{name} is a data step and must stay on CPU"


def test_gpu_steps_take_the_device_as_a_parameter(production_snapshot):
    """A step's parameters are part of its ZenML cache key: a cpu run never reuses a cuda run's outputs."""
    snapshot, _ = production_snapshot
    for name in GPU_STEPS:
        assert snapshot.step_configurations[name].config.parameters["device"] == "cuda", name


def test_kubernetes_pod_settings_put_gpu_steps_on_gpu_nodes():
    from zenml.integrations.kubernetes.flavors.kubernetes_orchestrator_flavor import KubernetesOrchestratorSettings

    document = yaml.safe_load((REPO / "zenml_config.yaml").read_text())
    for name, step in document["steps"].items():
        pod = KubernetesOrchestratorSettings.model_validate(step["settings"]["orchestrator.kubernetes"]).pod_settings
        assert name in GPU_STEPS and pod.node_selectors and pod.tolerations
        assert pod.resources["limits"]["nvidia.com/gpu"] == "1"
    data_pod = KubernetesOrchestratorSettings.model_validate(document["settings"]["orchestrator.kubernetes"]).pod_settings
    assert "nvidia.com/gpu" not in str(data_pod.resources) and not data_pod.tolerations


def test_scheduled_configuration_is_the_production_one_plus_a_cron_schedule():
    from zenml.config.schedule import Schedule

    production = yaml.safe_load((REPO / "zenml_config.yaml").read_text())
    scheduled = yaml.safe_load((REPO / "configs" / "production-scheduled.yaml").read_text())
    schedule = Schedule.model_validate(scheduled.pop("schedule"))
    assert schedule.cron_expression and len(schedule.cron_expression.split()) == 5
    assert scheduled == production


def test_stack_recipes_are_shellcheck_clean():
    recipes = sorted((REPO / "stacks").glob("*.sh"))
    assert recipes
    result = subprocess.run([str(BIN / "shellcheck"), *map(str, recipes)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_check_fails_loudly_without_a_cuda_device():
    # Every GPU test skips without CUDA, and "9 skipped" reads like a pass. `-o` keeps make from
    # (re)installing the venv this test already runs in.
    venv = BIN.parent
    result = subprocess.run(
        ["make", "-s", "-o", f"{venv}/.installed-stamp", "gpu-check", f"VENV={venv}"],
        cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "make gpu-check: no CUDA device is visible" in result.stderr
    assert "skipped" not in result.stdout + result.stderr and "Traceback" not in result.stderr
