"""The whole pipeline on the embedded default, in a throwaway ZenML store and MLflow database.

Three runs: the first trains and registers version 1 (alias challenger); the second, with the
same inputs, is served entirely from the cache and registers nothing; after one trace file
changes, ingestion and everything downstream rerun and version 2 is registered.
"""

import json
from pathlib import Path

import pytest
import yaml

from tracesft.config import embedded_config_path
from tracesft.workspace import prepare_demo_workspace

pytestmark = pytest.mark.integration

MODEL_NAME = "corr2cause-e2e-lora"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    state = root / ".tracesft"
    prepare_demo_workspace(state)
    document = yaml.safe_load(embedded_config_path().read_text())
    parameters = document["parameters"]
    parameters["traces"] = [str(state / "traces")]
    parameters["eval_set"] = str(state / "eval" / "corr2cause_eval.csv")
    parameters["base_model"] = str(state / "tiny-model")
    parameters["registry"] |= {"tracking_uri": "sqlite:///never-used.db", "model_name": MODEL_NAME}
    parameters["evaluation"]["cache_dir"] = str(root / "eval-cache")  # not the user's .tracesft/
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(document))
    return root, config


@pytest.fixture(scope="module")
def tracking_uri(workspace):
    """The configured URI is a decoy: MLFLOW_TRACKING_URI must win."""
    root, _ = workspace
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    patch.undo()


def _run(config: Path) -> dict:
    from pipelines.run import run_pipeline, run_summary

    return run_summary(run_pipeline(config))


def _versions(config: Path) -> list[dict]:
    from tracesft.config import load_run_config
    from tracesft.registry import list_versions

    return list_versions(load_run_config(config).registry)


def test_first_run_registers_a_challenger_with_lineage(workspace, tracking_uri):
    root, config = workspace
    summary = _run(config)

    assert summary["status"] == "completed"
    assert set(summary["steps"].values()) == {"completed"}
    assert summary["new_version"] and summary["registered"]["version"] == "1"
    [version] = _versions(config)
    assert version["name"] == MODEL_NAME and "challenger" in version["aliases"]
    tags = version["tags"]
    assert tags["base_model"].endswith("tiny-model")
    assert len(tags["traces_content_hash"]) == 64 and len(tags["eval_set_hash"]) == 64
    assert tags["zenml_pipeline"] == "sft_pipeline" and tags["zenml_run_name"] == summary["run"]
    assert {"base_f1", "finetuned_f1", "finetuned_parse_failure_rate", "final_train_loss"} <= set(version["metrics"])
    assert not (root / "never-used.db").exists()
    decision = summary["promotion"]
    assert decision["promoted"] == (decision["finetuned_f1"] > decision["base_f1"])


def test_unchanged_inputs_are_served_from_cache(workspace, tracking_uri):
    _, config = workspace
    summary = _run(config)

    assert set(summary["steps"].values()) == {"cached"}
    assert not summary["new_version"]
    assert [v["version"] for v in _versions(config)] == ["1"]


def test_a_changed_trace_file_reruns_from_ingest(workspace, tracking_uri):
    root, config = workspace
    jsonl = next((root / ".tracesft" / "traces").glob("*.jsonl"))
    first = json.loads(jsonl.read_text().splitlines()[0])
    first["question"] = first["question"].replace("Hypothesis:", "Hypothesis (restated):")
    with jsonl.open("a") as handle:
        handle.write(json.dumps(first) + "\n")

    summary = _run(config)

    assert all(status == "completed" for status in summary["steps"].values())
    versions = _versions(config)
    assert [v["version"] for v in versions] == ["2", "1"]
    assert "challenger" in versions[0]["aliases"] and "challenger" not in versions[1]["aliases"]
    assert versions[0]["tags"]["traces_content_hash"] != versions[1]["tags"]["traces_content_hash"]
