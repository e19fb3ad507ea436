"""The registry over HTTP against a real `mlflow server`: registration of real adapter files,
loading by alias, the gate, promotion, rollback, racing promotions and a server that dies
mid-registration.

One server for the module; each test registers the versions it needs under a model name of its
own, so it starts from an empty registry whatever ran before it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tracesft.train.adapter import LoraAdapter
from tracesft.cli import main
from tracesft.config import EvalSettings, RegistrySettings
from tracesft.errors import TracesftError
from tracesft.registry.model_registry import (
    CHALLENGER,
    CHAMPION,
    champion_history,
    list_versions,
    promote_if_better,
    promote_version,
    register_adapter,
    registry_client,
    rollback_champion,
)
from tracesft.registry.lock import lock_name, registry_lock
from tracesft.generate.inference import prepare_for_inference
from tracesft.registry.serving import load_registered_adapter

from tests.registry_support import QUERY, MlflowServer, tiny_adapter, tiny_base

MODEL = "corr2cause-server-lora"
EVAL_SET = "e1" * 32


def scores(finetuned_f1: float, base_f1: float = 0.40) -> dict[str, float]:
    return {"base_f1": base_f1, "finetuned_f1": finetuned_f1, "base_accuracy": 0.5, "finetuned_accuracy": 0.6}


def lineage(adapter: LoraAdapter, eval_set: str = EVAL_SET) -> dict[str, str]:
    metadata = adapter.metadata
    return {
        "base_model": metadata["base_model"],
        "base_model_revision": "",
        "traces_content_hash": metadata["traces_content_hash"],
        "train_examples": "7",
        "eval_set_hash": eval_set,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """MLflow pointed at the server; short retries so a dead server fails fast; a tiny base model."""
    root = tmp_path_factory.mktemp("registry-server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        mp.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        mp.chdir(root)
        yield {"root": root, "base": tiny_base(root)}


@pytest.fixture
def env(shared: dict[str, Any], request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """This test's registered model (empty so far), and a run configuration that names it."""
    name = f"{MODEL}-{re.sub(r'[^A-Za-z0-9]+', '-', request.node.name)}"
    config = tmp_path / "run.yaml"
    config.write_text(f"parameters:\n  traces: [t]\n  eval_set: e.csv\n  device: cpu\n  registry:\n    model_name: {name}\n")
    return shared | {"settings": RegistrySettings(experiment_name="server", model_name=name), "config": config}


def adapter(env: dict[str, Any], seed: int) -> LoraAdapter:
    path = env["root"] / f"adapter-{seed}"
    return LoraAdapter(path) if path.exists() else tiny_adapter(env["base"], path, seed)


def other_base_adapter(env: dict[str, Any]) -> LoraAdapter:
    path = env["root"] / "other-base"
    return LoraAdapter(path) if path.exists() else tiny_adapter(env["base"], path, seed=5, base_model="another/base-model")


def aliases(settings: RegistrySettings) -> dict[str, str]:
    return {alias: row["version"] for row in list_versions(settings) for alias in row["aliases"]}


def register_and_gate(env: dict[str, Any], seed: int, f1: float, eval_set: str = EVAL_SET, **kw: Any):
    lora = adapter(env, seed)
    registered = register_adapter(lora, scores(f1), lineage(lora, eval_set), env["settings"])
    return registered, promote_if_better(registered, scores(f1), env["settings"], **kw)


def with_champion(env: dict[str, Any]) -> None:
    """Version 1 (seed 1, F1 0.60 on EVAL_SET) registered and crowned by the gate."""
    registered, decision = register_and_gate(env, seed=1, f1=0.60)
    assert registered.version == "1" and decision.promoted


def register_unevaluated(env: dict[str, Any], seed: int) -> str:
    """A version registered but never evaluated (no scores, no eval-set hash); returns its number."""
    lora = adapter(env, seed)
    bare = {k: v for k, v in lineage(lora).items() if k != "eval_set_hash"}
    return register_adapter(lora, {}, bare, env["settings"]).version


# --- registration and loading ------------------------------------------------------------------


def test_register_over_http_and_gate_crowns_the_first_winner(env: dict[str, Any]) -> None:
    registered, decision = register_and_gate(env, seed=1, f1=0.60)
    assert (registered.version, registered.reused) == ("1", False)
    assert registered.source.startswith("mlflow-artifacts:/")  # the files went through the server
    assert decision.promoted and "no champion yet" in decision.reason
    assert aliases(env["settings"]) == {CHALLENGER: "1", CHAMPION: "1"}
    [row] = list_versions(env["settings"])
    assert row["tags"]["adapter_content_hash"] == registered.content_hash
    assert row["tags"]["eval_set_hash"] == EVAL_SET and row["metrics"]["finetuned_f1"] == pytest.approx(0.60)
    [change] = champion_history(env["settings"])
    assert (change.seq, change.action, change.version, change.previous) == (1, "gate", "1", None)


def test_an_identical_adapter_reuses_its_version(env: dict[str, Any]) -> None:
    lora = adapter(env, seed=1)
    first = register_adapter(lora, scores(0.60), lineage(lora), env["settings"])
    again = register_adapter(lora, scores(0.60), lineage(lora), env["settings"])
    assert (first.version, first.reused) == ("1", False)
    assert (again.version, again.reused) == ("1", True)
    assert [row["version"] for row in list_versions(env["settings"])] == ["1"]


def test_the_champion_loads_by_alias_and_answers(env: dict[str, Any]) -> None:
    from peft import PeftModel

    with_champion(env)
    model_name = env["settings"].model_name
    loaded = load_registered_adapter(f"models:/{model_name}@champion", device="cpu")
    assert (loaded.name, loaded.version) == (model_name, "1")
    assert loaded.answer(QUERY, EvalSettings(max_new_tokens=8)) in ("yes", "no", "none")  # random weights: any answer
    # The weights that came back are the ones registered, in the form evaluation decodes with.
    local = PeftModel.from_pretrained(type(loaded.model).from_pretrained(env["base"]), str(adapter(env, 1).path))
    expected = prepare_for_inference(local)
    registered = dict(loaded.model.named_parameters())
    assert registered.keys() == dict(expected.named_parameters()).keys()
    for name, original in expected.named_parameters():
        assert registered[name].equal(original), name


def test_unknown_alias_is_a_clear_error(env: dict[str, Any]) -> None:
    with_champion(env)
    with pytest.raises(TracesftError, match="has no alias 'nope'"):
        load_registered_adapter(env["settings"].model_name, alias="nope", device="cpu")


# --- the gate ----------------------------------------------------------------------------------


def test_gate_needs_the_ci_of_the_gain_above_the_margin(env: dict[str, Any]) -> None:
    with_champion(env)
    registered, decision = register_and_gate(env, seed=2, f1=0.70, f1_difference_ci_low=-0.01)
    assert registered.version == "2" and not decision.promoted
    assert "confidence interval" in decision.reason and decision.f1_difference_ci_low == -0.01
    assert aliases(env["settings"]) == {CHALLENGER: "2", CHAMPION: "1"}


def test_gate_promotes_a_clear_win_on_the_same_eval_set(env: dict[str, Any]) -> None:
    with_champion(env)
    registered, decision = register_and_gate(env, seed=3, f1=0.75, f1_difference_ci_low=0.12)
    assert registered.version == "2" and decision.promoted
    assert decision.champion_version == "1" and "champion 0.600" in decision.reason
    assert aliases(env["settings"])[CHAMPION] == "2"


def test_gate_refuses_a_champion_scored_on_another_eval_set(env: dict[str, Any]) -> None:
    with_champion(env)
    registered, decision = register_and_gate(env, seed=4, f1=0.95, eval_set="e2" * 32)
    assert registered.version == "2" and not decision.promoted
    assert "another eval set" in decision.reason
    assert aliases(env["settings"])[CHAMPION] == "1"


def test_gate_refuses_a_champion_of_another_base_model(env: dict[str, Any]) -> None:
    with_champion(env)
    lora = other_base_adapter(env)
    registered = register_adapter(lora, scores(0.95), lineage(lora), env["settings"])
    decision = promote_if_better(registered, scores(0.95), env["settings"])
    assert registered.version == "2" and not decision.promoted
    assert "another/base-model" in decision.reason and "not comparable" in decision.reason


# --- promote and rollback from the CLI ---------------------------------------------------------


def test_cli_promote_refuses_another_base_model_unless_forced(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with_champion(env)
    lora = other_base_adapter(env)
    assert register_adapter(lora, scores(0.95), lineage(lora), env["settings"]).version == "2"
    assert main(["adapters", "promote", "2", "--config", str(env["config"])]) == 2
    err = capsys.readouterr().err
    assert "another/base-model" in err and "--force" in err and "Traceback" not in err
    assert aliases(env["settings"])[CHAMPION] == "1"


def test_cli_promote_refuses_a_version_without_evaluation(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with_champion(env)
    assert register_unevaluated(env, seed=6) == "2"
    config = str(env["config"])
    assert main(["adapters", "promote", "2", "--config", config]) == 2
    assert "no completed evaluation" in capsys.readouterr().err
    assert main(["adapters", "promote", "2", "--force", "--reason", "hotfix", "--json", "--config", config]) == 0
    change = json.loads(capsys.readouterr().out)
    assert (change["version"], change["previous"], change["forced"], change["reason"]) == ("2", "1", True, "hotfix")
    assert "not mirrored" in change["zenml"]  # registered outside a ZenML pipeline
    assert aliases(env["settings"])[CHAMPION] == "2"


def test_cli_promote_of_the_champion_is_refused(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with_champion(env)
    assert main(["adapters", "promote", "1", "--config", str(env["config"])]) == 2
    assert "already champion" in capsys.readouterr().err


def test_cli_rollback_walks_back_through_earlier_champions(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with_champion(env)  # 1 by the gate
    assert register_and_gate(env, seed=3, f1=0.75, f1_difference_ci_low=0.12)[1].promoted  # 2 by the gate
    promote_version(env["settings"], register_unevaluated(env, seed=6), force=True)  # 3 by hand
    config = str(env["config"])
    assert main(["adapters", "rollback", "--config", config]) == 0
    assert "champion is now version 2 (was 3" in capsys.readouterr().out
    assert main(["adapters", "rollback", "--json", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    assert main(["adapters", "rollback", "--config", config]) == 2  # version 1 was the first champion
    assert "no earlier champion" in capsys.readouterr().err
    assert aliases(env["settings"])[CHAMPION] == "1"
    assert main(["adapters", "history", "--json", "--config", config]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(h["action"], h["previous"], h["version"]) for h in history] == [
        ("gate", None, "1"), ("gate", "1", "2"), ("promote", "2", "3"), ("rollback", "3", "2"), ("rollback", "2", "1"),
    ]
    assert [h["seq"] for h in history] == [1, 2, 3, 4, 5]


def test_cli_export_merges_the_champion(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with_champion(env)
    capsys.readouterr()  # MLflow's "View run" lines from the registration
    out = env["root"] / f"merged-{env['settings'].model_name}"
    assert main(["adapters", "export", "champion", "--merged", str(out), "--json", "--config", str(env["config"])]) == 0
    assert json.loads(capsys.readouterr().out)["merged"] == str(out)
    info = json.loads((out / "tracesft_merged.json").read_text())
    assert info["merged_from"] == f"models:/{env['settings'].model_name}/1" and info["dtype"] == "bfloat16"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    [row] = list_versions(env["settings"])  # the measured deviation is recorded on the version it came from
    assert float(row["tags"]["merged_logit_deviation.bfloat16.cpu"]) == pytest.approx(info["max_logit_deviation"], rel=1e-5)


def test_cli_export_by_default_is_the_adapter_and_its_base(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with_champion(env)
    capsys.readouterr()
    out = env["root"] / f"adapter-{env['settings'].model_name}"
    assert main(["adapters", "export", "champion", str(out), "--json", "--config", str(env["config"])]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == str(out)
    info = json.loads((out / "tracesft_export.json").read_text())
    assert info["exported_from"] == f"models:/{env['settings'].model_name}/1" and info["base_model"] == str(env["base"])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


# --- concurrency -------------------------------------------------------------------------------


def test_racing_promotions_leave_one_champion_and_a_consistent_history(env: dict[str, Any]) -> None:
    settings = env["settings"]
    with_champion(env)
    for seed in (2, 3, 4, 6):
        lora = adapter(env, seed)
        register_adapter(lora, scores(0.60), lineage(lora), settings)
    contenders = ["2", "3", "4", "5", "2", "3"]  # at most two can find their version already champion
    barrier = threading.Barrier(len(contenders))
    outcomes: list[str] = []

    def promote(version: str) -> None:
        barrier.wait()
        try:
            outcomes.append(promote_version(settings, version, force=True).version)
        except TracesftError as err:  # promoting the version that just became champion
            assert "already champion" in str(err)
            outcomes.append("refused")

    threads = [threading.Thread(target=promote, args=(v,)) for v in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    history = champion_history(settings)
    new = history[1:]  # after the gate's first entry
    assert len(new) == sum(1 for o in outcomes if o != "refused") >= 4
    assert [h.seq for h in history] == list(range(1, len(history) + 1))
    for earlier, later in zip(history, history[1:]):
        assert later.previous == earlier.version  # each change starts from where the last one ended
    assert aliases(settings)[CHAMPION] == history[-1].version
    with registry_client(settings) as client:
        assert not client.search_registered_models(filter_string=f"name = '{lock_name(settings.model_name)}'")  # released


def test_racing_cli_processes(env: dict[str, Any]) -> None:
    """Two separate `tracesft adapters promote` processes at once, as two people would."""
    settings = env["settings"]
    with_champion(env)
    for seed in (2, 3):
        lora = adapter(env, seed)
        register_adapter(lora, scores(0.60), lineage(lora), settings)
    targets = ["2", "3"]
    command = [sys.executable, "-m", "tracesft.cli", "adapters", "promote", "--force", "--json", "--config", str(env["config"])]
    processes = [subprocess.Popen(command[:5] + [v] + command[5:], cwd=Path(__file__).parent.parent,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in targets]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in processes]
    assert [code for _, _, code in results] == [0, 0], results
    history = champion_history(settings)
    assert sorted(h.version for h in history[1:]) == sorted(targets)
    assert history[2].previous == history[1].version
    assert aliases(settings)[CHAMPION] == history[-1].version


def test_a_stale_lock_is_broken(env: dict[str, Any]) -> None:
    name = env["settings"].model_name
    with registry_client(env["settings"]) as client:
        client.create_registered_model(lock_name(name))  # left behind by a crashed holder
        with registry_lock(client, name, wait_s=10, stale_after_s=0.0):
            pass
        assert not client.search_registered_models(filter_string=f"name = '{lock_name(name)}'")


# --- a server that dies mid-registration (it is restarted whatever happens) ---------------------


def test_server_dying_mid_registration_is_a_clear_error_and_leaves_no_version(
    env: dict[str, Any], server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    with_champion(env)
    upload = mlflow.log_artifacts

    def crash_then_upload(*args: Any, **kwargs: Any) -> None:
        server.kill()  # the run exists and its metrics are logged; the server dies before the files go up
        upload(*args, **kwargs)

    lora = adapter(env, seed=7)
    monkeypatch.setattr(mlflow, "log_artifacts", crash_then_upload)
    try:
        with pytest.raises(TracesftError) as failure:
            register_adapter(lora, scores(0.9), lineage(lora), env["settings"])
    finally:
        monkeypatch.setattr(mlflow, "log_artifacts", upload)
        if not server.running():
            server.start()
    message = str(failure.value)
    assert server.uri in message and "after 2 retries" in message and "is running" in message

    assert [row["version"] for row in list_versions(env["settings"])] == ["1"]  # no half-registered version
    registered = register_adapter(lora, scores(0.9), lineage(lora), env["settings"])  # a retry just works
    assert registered.version == "2" and not registered.reused


def test_unreachable_server_is_one_clear_cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.registry_support import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    assert main(["adapters", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow at {uri} failed after 1 retries") and "Traceback" not in err
