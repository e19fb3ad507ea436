"""The whole pipeline on the embedded default, in a throwaway ZenML store and MLflow database,
started as scheduled retraining starts it: `tracesft retrain --traces DIR --config FILE`, a process
of its own.

Three runs, each a module fixture built on the one before: the first trains on the demo's
generated traces, registers version 1 and, the fine-tuned model beating the base beyond the
bootstrap interval, the gate promotes it to champion; the second, with the same inputs, is served entirely from the cache and
registers nothing; after a new trace file lands in a subfolder, ingestion and everything downstream
rerun and version 2 is registered. A fourth, `tracesft grpo`, continues version 2 with GRPO and
registers its child, version 3. Each keeps what it printed and the registry as seen right after
it, so every test holds whatever other tests ran. The traces folder is laid out as users leave one
(`on_bad_record: skip`): a result file in a subfolder with an upper-case extension and a broken
line, a README, a notebook checkpoint folder and a dangling link; both summaries, JSON and text,
must say what was skipped and left unread. Credentials are planted in the environment and in a
ZenML secret on the stack throughout; the last test shows none of them reached a log, an MLflow
parameter, tag or artifact, or either store.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tracesft.config import embedded_config_path, embedded_grpo_config_path, load_grpo_config, load_run_config
from tracesft.registry.model_registry import list_versions
from tracesft.workspace import prepare_demo_workspace

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "corr2cause-e2e-lora"
PLANTED = {
    "HF_TOKEN": "hf_planted0secret0e2e0token",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-e2e",
}
ZENML_SECRET_VALUE = "planted-zenml-secret-value-e2e"


@dataclass(frozen=True)
class Run:
    summary: dict | None  # what `retrain --json` reported (None: run without --json)
    printed: str  # everything the process wrote, stdout and stderr
    versions: list[dict]  # `list_versions` right after the run
    model_version: dict | None  # the run's ZenML model version right after a --json run: name, id, stage, metadata


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    state = root / ".tracesft"
    prepare_demo_workspace(state)
    _lay_out_like_a_user(state / "traces")
    document = yaml.safe_load(embedded_config_path().read_text())
    parameters = document["parameters"]
    parameters["traces"] = ["placeholder: replaced by retrain --traces"]
    parameters["on_bad_record"] = "skip"
    parameters["eval_set"] = str(state / "eval" / "corr2cause_eval.csv")
    parameters["base_model"] = str(state / "tiny-model")
    parameters["registry"] |= {"tracking_uri": "sqlite:///never-used.db", "model_name": MODEL_NAME}
    parameters["evaluation"]["cache_dir"] = str(root / "eval-cache")  # not the user's .tracesft/
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(document))
    return root, config


def _lay_out_like_a_user(traces: Path) -> None:
    jsonl = next(traces.glob("*.jsonl"))
    nested = traces / "harness-b" / jsonl.with_suffix(".JSONL").name
    nested.parent.mkdir()
    nested.write_text(jsonl.read_text() + "{not json\n")
    jsonl.unlink()
    (traces / "README.md").write_text("GPT-4o on Corr2Cause, two harnesses.\n")
    shutil.copytree(nested.parent, traces / ".ipynb_checkpoints")
    (traces / "run0.jsonl").symlink_to(traces / "moved-away.jsonl")


def _traces(config: Path) -> Path:
    return config.parent / ".tracesft" / "traces"


@pytest.fixture(scope="module")
def tracking_uri(workspace):
    """The configured URI is a decoy: MLFLOW_TRACKING_URI must win. Credentials are planted in
    the environment and as a ZenML secret attached to the active stack (how production gets them)."""
    from zenml.client import Client

    root, _ = workspace
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in PLANTED.items():
        patch.setenv(name, value)
    client = Client()
    secret = client.create_secret("tracesft-e2e-credentials", values={"MLFLOW_TRACKING_TOKEN": ZENML_SECRET_VALUE})
    previous = client.active_stack_model
    components = {kind: [c.id for c in found] for kind, found in previous.components.items()}
    stack = client.create_stack("tracesft-e2e-with-secret", components=components, secrets=[secret.id])
    client.activate_stack(stack.id)
    yield uri
    client.activate_stack(previous.id)
    client.delete_stack(stack.id)
    client.delete_secret(secret.id)
    patch.undo()


@pytest.fixture(scope="module")
def first_run(workspace, tracking_uri) -> Run:
    """Run on a fresh workspace, registry and ZenML store."""
    return _retrain(workspace[1])


@pytest.fixture(scope="module")
def unchanged_run(workspace, first_run) -> Run:
    """Run again on the inputs of `first_run`, printing the text summary (as cron mails it)."""
    return _retrain(workspace[1], as_json=False)


@pytest.fixture(scope="module")
def switched_registry_run(workspace, unchanged_run) -> Run:
    """Run again on the same inputs with MLFLOW_TRACKING_URI pointing at another (empty) registry."""
    root, config = workspace
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'team.db'}")
        return _retrain(config)


@pytest.fixture(scope="module")
def fresh_store_run(workspace, tracking_uri, switched_registry_run) -> Run:
    """The same traces retrained from a fresh ZenML store (nothing cached) into the first registry."""
    root, config = workspace
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZENML_CONFIG_PATH", str(root / "another-zenml-store"))
        return _retrain(config, as_json=False)


@pytest.fixture(scope="module")
def new_trace_file_run(workspace, fresh_store_run) -> Run:
    """Run again after a new trace file landed in a subfolder beside those of the earlier runs."""
    _, config = workspace
    jsonl = next((_traces(config) / "harness-b").glob("*.JSONL"))
    first = json.loads(jsonl.read_text().splitlines()[0])
    # A second, differently worded trace of a problem already there: it passes verification,
    # so the training data (and with it the adapter) changes.
    first["reasoning"] = "Restating the problem before reasoning about it.\n\n" + first["reasoning"]
    (_traces(config) / "2026-11").mkdir()
    (_traces(config) / "2026-11" / "gpt4o_corr2cause_run3.jsonl").write_text(json.dumps(first) + "\n")
    return _retrain(config)


@pytest.fixture(scope="module")
def grpo_run(workspace, new_trace_file_run) -> Run:
    """`tracesft grpo` on the embedded GRPO configuration, pointed at this workspace: it continues
    the challenger (version 2) and registers its child."""
    root, config = workspace
    document = yaml.safe_load(embedded_grpo_config_path().read_text())
    parameters = document["parameters"]
    parameters["eval_set"] = load_run_config(config).eval_set
    parameters["registry"] |= {"tracking_uri": "sqlite:///never-used.db", "model_name": MODEL_NAME}
    parameters["evaluation"]["cache_dir"] = str(root / "eval-cache")  # the SFT runs' base outputs are reused
    grpo_config = root / "grpo.yaml"
    grpo_config.write_text(yaml.safe_dump(document))
    command = [str(Path(sys.executable).parent / "tracesft"), "grpo", "--config", str(grpo_config), "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout[done.stdout.rindex('{\n  "run"'):])
    return Run(summary, done.stdout + done.stderr, list_versions(load_run_config(config).registry), None)


def _retrain(config: Path, as_json: bool = True) -> Run:
    """`tracesft retrain --traces <the workspace's traces> --config FILE [--json]` in a process of its own."""
    command = [str(Path(sys.executable).parent / "tracesft"), "retrain", "--traces", str(_traces(config)), "--config", str(config)]
    system_temp = config.parent / "system-temp"  # this run's own, so parallel work elsewhere cannot blur the count
    system_temp.mkdir(exist_ok=True)
    done = subprocess.run(command + ["--json"] * as_json, cwd=REPO, capture_output=True, text=True, check=False,
                          env=os.environ | {"TMPDIR": str(system_temp)})
    assert done.returncode == 0, done.stdout + done.stderr
    # Training checkpoints (optimizer state), adapters and ZenML's own scratch are gone with the run.
    assert not [path.name for path in system_temp.iterdir() if path.name.startswith(("tracesft-", "zenml-"))]
    versions = list_versions(load_run_config(config).registry)
    if not as_json:
        return Run(None, done.stdout + done.stderr, versions, None)
    summary = json.loads(done.stdout)  # stdout holds the one JSON document; every log went to stderr
    return Run(summary, done.stdout + done.stderr, versions, _model_version(summary["run"]))


def _model_version(run_name: str) -> dict:
    from zenml.client import Client

    found = Client().get_pipeline_run(run_name).model_version
    return {"name": found.model.name, "id": str(found.id), "stage": found.stage, "metadata": found.run_metadata}


def test_first_run_registers_a_challenger_with_lineage(workspace, tracking_uri, first_run):
    from mlflow import MlflowClient

    root, _ = workspace
    summary = first_run.summary

    assert summary["status"] == "completed"
    assert set(summary["steps"].values()) == {"completed"}
    assert summary["new_version"] and summary["registered"]["version"] == "1"
    [version] = first_run.versions
    assert version["name"] == MODEL_NAME and "challenger" in version["aliases"]
    tags = version["tags"]
    assert tags["base_model"].endswith("tiny-model") and Path(tags["base_model"]).is_absolute()
    assert len(tags["traces_content_hash"]) == 64 and len(tags["eval_set_hash"]) == 64
    assert tags["zenml_pipeline"] == "sft_pipeline" and tags["zenml_run_name"] == summary["run"]
    assert {"base_f1", "finetuned_f1", "finetuned_parse_failure_rate", "final_train_loss"} <= set(version["metrics"])
    assert not (root / "never-used.db").exists()
    assert tags["zenml_run_url"] == "local store"  # the test's ZenML store has no server
    assert len(tags["run_config_hash"]) == 64 and tags["git_commit"]
    assert tags["train_examples"].isdigit() and tags["adapter_content_hash"]
    params = MlflowClient(tracking_uri).get_run(version["run_id"]).data.params
    assert params["recomputed_layers"] == "0"  # the demo trains without checkpointing: no layer recomputed
    # The demo learns: the fine-tuned model beats the base beyond the interval, and is promoted.
    decision, evaluation = summary["promotion"], summary["evaluation"]
    assert evaluation["finetuned_f1"] > evaluation["base_f1"] and evaluation["f1_difference"]["low"] > 0
    assert decision["promoted"] and decision["f1_difference_ci_low"] == evaluation["f1_difference"]["low"]
    assert set(summary["registered"]["aliases"]) == {"challenger", "champion"} == set(version["aliases"])
    verification = summary["verification"]
    assert verification["kept"] + sum(verification["rejected"].values()) == verification["records"] == summary["ingestion"]["records"]
    assert {"wrong_answer", "flag_contradicts_text", "unparseable_answer"} <= set(verification["rejected"])

    traces = _traces(workspace[1])
    ingestion = summary["ingestion"]
    assert ingestion["files"] == 2 and ingestion["skipped_records"] == 1
    [skipped] = ingestion["skipped_records_listed"]
    nested = next((traces / "harness-b").glob("*.JSONL"))
    assert (skipped["source"], skipped["locator"]) == (str(nested), f"line {len(nested.read_text().splitlines())}")
    assert {i["path"]: i["reason"] for i in ingestion["ignored_files_listed"]} == {
        str(traces / ".ipynb_checkpoints"): "hidden", str(traces / "README.md"): "wrong_extension",
        str(traces / "run0.jsonl"): "dangling_link",
    }
    assert summary["sft_dataset"]["train"] == int(tags["train_examples"])  # what was trained on, said in the summary

    # The ZenML model version records what this run did; who is champion only MLflow's alias says.
    model_version = first_run.model_version
    assert model_version["name"] == MODEL_NAME
    assert model_version["stage"] is None  # no stage mirror
    metadata = model_version["metadata"]
    assert metadata["promotion"]["reason"] == decision["reason"]
    assert metadata["lineage"]["traces_content_hash"] == tags["traces_content_hash"]
    assert metadata["metrics"]["finetuned_f1"] == decision["finetuned_f1"]


def test_unchanged_inputs_are_served_from_cache(workspace, unchanged_run):
    """The text summary: a fully cached run still says what its data left out."""
    text = unchanged_run.printed
    steps = re.search(r"(\d+) of (\d+) steps cached", text)
    assert steps and int(steps[1]) == int(steps[2]) - 2  # all but register (never cached) and promote after it
    assert (f"Registry: {MODEL_NAME} version 1 found in the registry (same adapter content): nothing new registered; "
            "aliases: challenger, champion.") in text
    assert re.search(r"Evaluation on \d+ held-out problems: base F1 0\.000, fine-tuned F1 0\.\d{3}; gain \+0\.\d{3}, "
                     r"95% interval \[\+0\.\d{3}, \+0\.\d{3}\]\.", text)
    assert "Promotion gate: not promoted: version 1 is already champion." in text
    assert re.search(r"Verified: \d+ of \d+ kept, \d+ rejected \(duplicate \d+, flag_contradicts_text 2, ", text)
    assert [v["version"] for v in unchanged_run.versions] == ["1"]
    traces = _traces(workspace[1])
    assert re.search(r"Traces: \d+ records read from 2 file\(s\); 1 unreadable record\(s\) skipped", text)
    assert f"  {next((traces / 'harness-b').glob('*.JSONL'))} (line " in text and "not valid JSON" in text
    assert "3 path(s) in the traces folders not read:" in text
    assert f"  {traces / 'README.md'}: wrong_extension\n" in text and f"  {traces / 'run0.jsonl'}: dangling_link\n" in text
    assert re.search(r"SFT dataset: \d+ train, \d+ validation records\.", text)


def test_the_commands_a_run_points_at_run_as_printed(unchanged_run):
    """Each "Look next" line of the summary works pasted into a shell: the registry list, ZenML's
    run list, and the MLflow UI (started, answering on its page, stopped); and the README's
    `adapters show champion` beside them."""
    import signal
    import time
    import urllib.request

    from tests.registry_support import free_port

    lines = unchanged_run.printed.split("Look next:\n")[1].splitlines()[:3]
    commands = [line.strip().split("   (then open")[0] for line in lines]
    listing = next(c for c in commands if "adapters list" in c)
    assert [c for c in commands if "pipeline runs list" in c]
    commands.append(listing.replace("adapters list", "adapters show champion"))  # the README's next step
    for command in commands:
        if " ui --backend-store-uri " not in command:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (command, done.stderr[-2000:])
            continue
        port = free_port()
        ui = subprocess.Popen(f"{command} --port {port}", shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                        assert page.status == 200
                        break
                except OSError:
                    assert ui.poll() is None, f"{command} exited with {ui.returncode}"
                    time.sleep(0.5)
            else:
                raise AssertionError(f"{command} did not answer within a minute")
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)


def test_the_same_traces_from_a_fresh_zenml_store_find_the_registered_version(fresh_store_run):
    """Nothing cached, training run again: the adapter is the same by content, so it is found."""
    text = fresh_store_run.printed
    assert "completed, 0 of 12 steps cached." in text
    assert f"Registry: {MODEL_NAME} version 1 found in the registry (same adapter content)" in text
    assert [v["version"] for v in fresh_store_run.versions] == ["1"]


def test_a_registry_switch_registers_on_the_new_registry(workspace, switched_registry_run):
    """Everything else cached, the adapter still lands in the registry the run points at."""
    summary = switched_registry_run.summary
    assert {name for name, status in summary["steps"].items() if status != "cached"} == {"register_adapter", "promote_adapter"}
    assert summary["new_version"] and summary["registered"]["version"] == "1"
    assert summary["registered"]["registry_uri"] == f"sqlite:///{workspace[0] / 'team.db'}"
    [version] = switched_registry_run.versions
    assert "champion" in version["aliases"] or not summary["promotion"]["promoted"]


def test_a_new_trace_file_in_a_subfolder_reruns_from_ingest(new_trace_file_run):
    assert all(status == "completed" for status in new_trace_file_run.summary["steps"].values())
    assert new_trace_file_run.summary["ingestion"]["files"] == 3
    versions = new_trace_file_run.versions
    assert [v["version"] for v in versions] == ["2", "1"]
    assert "challenger" in versions[0]["aliases"] and "challenger" not in versions[1]["aliases"]
    assert versions[0]["tags"]["traces_content_hash"] != versions[1]["tags"]["traces_content_hash"]


def test_grpo_registers_a_child_of_the_challenger_with_lineage_and_per_step_metrics(workspace, tracking_uri, grpo_run):
    """The GRPO pipeline after the SFT runs: version 3, stage grpo, parent version 2, scored on its
    parent's eval problems, the gate's decision made, and TRL's per-step figures in its MLflow run."""
    from mlflow import MlflowClient

    summary = grpo_run.summary
    assert summary["status"] == "completed" and summary["registered"]["version"] == "3"
    settings = load_grpo_config(workspace[0] / "grpo.yaml")
    assert summary["grpo"]["steps"] == settings.grpo.max_steps and summary["grpo"]["generation"] == "engine"
    child, parent = grpo_run.versions[0], grpo_run.versions[1]
    assert child["version"] == "3" and "challenger" in child["aliases"] and parent["version"] == "2"
    tags = child["tags"]
    assert tags["stage"] == "grpo" and tags["parent_version"] == "2" and tags["zenml_pipeline"] == "grpo_pipeline"
    assert json.loads(tags["reward"]) == settings.reward.model_dump()
    for inherited in ("base_model", "eval_set_hash", "traces_content_hash"):
        assert tags[inherited] == parent["tags"][inherited]
    assert child["metrics"]["eval_problems"] == parent["metrics"]["eval_problems"]  # the parent's own eval problems
    assert summary["promotion"]["reason"]

    client = MlflowClient(tracking_uri)
    for metric in ("reward", "rewards/correctness/mean", "rewards/closed_think/mean", "rewards/one_answer/mean",
                   "completions/mean_length", "kl"):
        steps = [m.step for m in client.get_metric_history(child["run_id"], metric)]
        assert steps == list(range(1, settings.grpo.max_steps + 1)), metric


def test_planted_secrets_reach_no_log_parameter_artifact_or_store(workspace, tracking_uri, first_run, unchanged_run, new_trace_file_run, grpo_run):
    """After the three runs: no planted value in what they printed, in MLflow's parameters and
    tags, or anywhere on disk under the MLflow database and artifacts or the ZenML store
    (which holds step logs, artifacts and run metadata)."""
    from mlflow import MlflowClient

    root, _ = workspace
    secrets = [*PLANTED.values(), ZENML_SECRET_VALUE]
    printed = "\n".join(run.printed for run in (first_run, unchanged_run, new_trace_file_run, grpo_run))
    assert printed and not [s for s in secrets if s in printed]

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    recorded = json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs])
    assert not [s for s in secrets if s in recorded]

    # The ZenML secret's value belongs in ZenML's own secret store (the SQL store's `secret`
    # table, encoded, encrypted when a key is configured): any other place is a leak.
    stores = [root, Path(os.environ["ZENML_CONFIG_PATH"])]
    files = [path for store in stores for path in store.rglob("*") if path.is_file()]
    leaks = [path for path in files if any(s.encode() in path.read_bytes() for s in secrets)]
    leaks = [path for path in leaks if not (path.suffix == ".db" and _only_the_secret_table_holds(path, secrets))]
    assert not leaks, leaks


def _only_the_secret_table_holds(database: Path, secrets: list[str]) -> bool:
    import sqlite3

    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = [row for table in tables if table != "secret" for row in connection.execute(f'SELECT * FROM "{table}"')]
    return not any(secret in str(row) for row in rows for secret in secrets)
