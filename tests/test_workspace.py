"""One workspace for every command: the registry, the caches and a configuration's relative paths
are found the same way from any working directory, and a registry that is not there is an error
for the commands that read it, never a new empty one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tracesft.cli import main
from tracesft.config import RegistrySettings, load_run_config
from tracesft.train.tracking import existing_tracking_uri, resolve_tracking_uri
from tracesft.workspace import WORKSPACE_VARIABLE, model_source, state_dir, use_workspace_zenml_store, workspace_root

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace of its own, while the commands run from another, unrelated folder."""
    root = tmp_path / "workspace"
    (root / ".tracesft" / "tiny-model").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv(WORKSPACE_VARIABLE, str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(elsewhere)
    return root


def test_without_the_variable_the_workspace_is_the_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(WORKSPACE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    assert workspace_root() == REPO and state_dir() == REPO / ".tracesft"


def test_the_registry_is_found_against_the_workspace_not_the_working_directory(workspace: Path) -> None:
    assert resolve_tracking_uri(RegistrySettings()) == f"sqlite:///{workspace / '.tracesft' / 'mlflow.db'}"
    relative = RegistrySettings(tracking_uri="sqlite:///state/registry.db")
    assert resolve_tracking_uri(relative) == f"sqlite:///{workspace / 'state' / 'registry.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///env.db"  # the fixture's monkeypatch restores it
    assert resolve_tracking_uri(RegistrySettings()) == f"sqlite:///{workspace / 'env.db'}"
    assert not list(Path.cwd().iterdir())  # resolving creates nothing


def test_relative_paths_of_a_configuration_are_read_against_the_workspace(workspace: Path) -> None:
    config = load_run_config()  # the embedded default, relative throughout
    state = workspace / ".tracesft"
    assert config.traces == [str(state / "traces")]
    assert config.eval_set == str(state / "eval" / "corr2cause_eval.csv")
    assert config.base_model == str(state / "tiny-model")  # absolute: lineage tags load from anywhere
    assert config.evaluation.cache_dir == str(state / "eval-cache")
    assert model_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B") == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert model_source("./models/base") == str(workspace / "models" / "base")  # a folder, even before it exists


def test_zenml_pipeline_run_resolves_the_same_way(workspace: Path) -> None:
    """`zenml pipeline run -c FILE` validates the parameters with the pipeline's own signature."""
    from zenml.utils.pydantic_utils import validate_function_args

    from pipelines.sft_pipeline import sft_pipeline

    arguments = validate_function_args(
        sft_pipeline.entrypoint, None, traces=["data/traces"], eval_set="data/test.csv", base_model=".tracesft/tiny-model"
    )
    assert arguments["traces"] == [str(workspace / "data" / "traces")]
    assert arguments["eval_set"] == str(workspace / "data" / "test.csv")
    assert arguments["base_model"] == str(workspace / ".tracesft" / "tiny-model")


def test_the_embedded_default_keeps_its_zenml_store_in_the_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZENML_CONFIG_PATH")  # conftest's; the fixture's monkeypatch puts it back
    use_workspace_zenml_store()
    assert os.environ["ZENML_CONFIG_PATH"] == str(workspace / ".tracesft" / "zenml")
    monkeypatch.setenv("ZENML_CONFIG_PATH", "/the/users/own")
    use_workspace_zenml_store()
    assert os.environ["ZENML_CONFIG_PATH"] == "/the/users/own"  # the variable wins


def test_adapters_from_another_folder_read_the_workspaces_registry(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(RegistrySettings())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = load_run_config().registry.model_name
    client.create_registered_model(name)
    client.create_model_version(name, source="mlflow-artifacts:/somewhere/adapter")

    assert main(["adapters", "list", "--json"]) == 0
    assert [row["version"] for row in json.loads(capsys.readouterr().out)] == ["1"]
    assert not list(Path.cwd().iterdir())  # no registry, no mlruns/ in the working directory


@pytest.mark.parametrize("command", [["list"], ["show", "1"], ["history"], ["promote", "1"], ["rollback"],
                                     ["export", "1", "--merged", "out"]])
@pytest.mark.parametrize("source", ["variable", "config"])
def test_a_registry_that_is_not_there_is_an_error_not_a_new_one(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str], source: str
) -> None:
    typo = workspace / "no-such-folder" / "mlfow.db"
    arguments = ["adapters", *command]
    if source == "variable":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{typo}")
    else:
        config = workspace / "run.yaml"
        config.write_text(f"parameters:\n  traces: [t]\n  eval_set: e.csv\n  device: cpu\n"
                          f"  registry:\n    tracking_uri: sqlite:///{typo.relative_to(workspace)}\n")
        arguments += ["--config", str(config)]

    assert main(arguments) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"error: sqlite:///{typo} (") and "no MLflow registry there" in line
    assert ("MLFLOW_TRACKING_URI" if source == "variable" else "registry.tracking_uri") in line
    assert not typo.parent.exists() and not (Path.cwd() / "out").exists()


def test_existing_tracking_uri_accepts_a_server_it_cannot_check(workspace: Path) -> None:
    assert existing_tracking_uri(RegistrySettings(tracking_uri="http://mlflow.internal:5000")) == "http://mlflow.internal:5000"
