"""The MLflow registry (a real sqlite store in a temporary folder), the promotion gate, and the CLI
that reads the registry back."""

from __future__ import annotations

import io
import json
import re
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from tracesft.train.adapter import METADATA_FILE, LoraAdapter, write_metadata
from tracesft.cli import main
from tracesft.config import RegistrySettings, load_run_config
from tracesft.errors import TracesftError
from tracesft.data.prompting import prompt_template
from tracesft.registry.model_registry import (
    CHALLENGER,
    CHAMPION,
    PROMPT_TEMPLATE_FILE,
    ChampionChange,
    champion_stack,
    incomparable_reason,
    decide_promotion,
    list_versions,
    promote_if_better,
    register_adapter,
    registry_client,
)
from tracesft.data.sample_data import DATA, TRACE_PROBLEMS_CSV, UNPARSEABLE, bundled_rows
from tracesft.train.tracking import mlflow_tracking, resolve_tracking_uri

MODEL = "corr2cause-test-lora"
CLI_MODEL = load_run_config().registry.model_name  # what every CLI command sees without --config
SAMPLE_DIR = Path(str(DATA / "sample_traces"))


# --- tracking URI ----------------------------------------------------------------------------


def test_env_beats_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/config.db")
    assert resolve_tracking_uri(settings) == f"sqlite:///{tmp_path}/env.db"


def test_config_beats_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(RegistrySettings(tracking_uri="http://mlflow.internal:5000")) == "http://mlflow.internal:5000"
    assert resolve_tracking_uri(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/c.db")) == f"sqlite:///{tmp_path}/c.db"


def test_empty_env_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_tracking_uri(RegistrySettings(tracking_uri="http://x:5000")) == "http://x:5000"


def test_absolute_sqlite_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path.resolve()}/abs.db"
    assert resolve_tracking_uri(RegistrySettings(tracking_uri=uri)) == uri


# --- promotion rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finetuned", "base", "champion", "margin", "promoted", "says"),
    [
        (0.60, 0.40, None, 0.0, True, "no champion yet"),
        (0.40, 0.40, None, 0.0, False, "base F1 0.400"),  # a tie with the base does not promote
        (0.30, 0.40, None, 0.0, False, "base F1 0.400"),
        (0.60, 0.40, 0.55, 0.0, True, "champion 0.550"),
        (0.55, 0.40, 0.55, 0.0, False, "champion F1 0.550"),  # a tie with the champion does not promote
        (0.50, 0.40, 0.55, 0.0, False, "champion F1 0.550"),
        (0.45, 0.40, None, 0.05, False, "by more than 0.05"),  # beats the base, but not by the margin
        (0.46, 0.40, None, 0.05, True, "no champion yet"),
        (0.60, 0.40, 0.56, 0.05, False, "champion F1 0.560"),
        (0.62, 0.40, 0.56, 0.05, True, "champion 0.560"),
        (0.10, 0.40, 0.00, 0.0, False, "base F1"),  # the base is checked before the champion
    ],
)
def test_decide_promotion(
    finetuned: float, base: float, champion: float | None, margin: float, promoted: bool, says: str
) -> None:
    decision, reason = decide_promotion(finetuned, base, champion, margin)
    assert decision is promoted
    assert says in reason


@pytest.mark.parametrize(
    ("ci_low", "margin", "promoted", "says"),
    [
        (0.05, 0.0, True, "gain CI from 0.050"),
        (0.0, 0.0, False, "confidence interval"),  # the interval touches zero: could be noise
        (-0.02, 0.0, False, "may be noise"),
        (0.04, 0.05, False, "not above the margin 0.05"),
        (None, 0.0, True, "no champion yet"),  # no interval given: the point estimates decide
    ],
)
def test_decide_promotion_with_the_ci_of_the_gain(ci_low: float | None, margin: float, promoted: bool, says: str) -> None:
    decision, reason = decide_promotion(0.70, 0.40, None, margin, f1_difference_ci_low=ci_low)
    assert decision is promoted
    assert says in reason


def test_the_ci_does_not_excuse_losing_to_the_champion() -> None:
    decision, reason = decide_promotion(0.70, 0.40, 0.72, 0.0, f1_difference_ci_low=0.2)
    assert not decision and "champion F1 0.720" in reason


@pytest.mark.parametrize(
    ("champion", "says"),
    [
        ({"base_model": "b", "eval_set_hash": "e1"}, None),
        ({"base_model": "b", "base_model_revision": "", "eval_set_hash": "e1"}, None),  # no revision either way
        ({"base_model": "other", "eval_set_hash": "e1"}, "adapts base model other"),
        ({"base_model": "b", "base_model_revision": "abc", "eval_set_hash": "e1"}, "b@abc"),
        ({"base_model": "b", "eval_set_hash": "e2"}, "another eval set"),
    ],
)
def test_incomparable_reason(champion: dict[str, str], says: str | None) -> None:
    reason = incomparable_reason({"base_model": "b", "eval_set_hash": "e1"}, champion, "4")
    assert reason is None if says is None else (says in reason and "version 4" in reason)


def _change(seq: int, action: str, version: str) -> ChampionChange:
    return ChampionChange(seq=seq, time="t", action=action, version=version, previous=None, reason="r")


def test_champion_stack_pops_rolled_back_reigns() -> None:
    history = [_change(1, "gate", "1"), _change(2, "gate", "3"), _change(3, "promote", "5"), _change(4, "rollback", "3")]
    assert champion_stack(history) == ["1", "3"]
    assert champion_stack(history + [_change(5, "rollback", "1")]) == ["1"]


def test_lineage_helpers(tmp_path: Path) -> None:
    from tracesft.registry.lineage import config_hash, git_commit

    assert config_hash({"a": 1, "b": {"c": [1, 2]}}) == config_hash({"b": {"c": [1, 2]}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert git_commit(tmp_path) == "unknown"  # not a git checkout
    commit = git_commit()
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40


def test_content_hash_ignores_lineage_but_not_weights(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path, "a")
    before = adapter.content_hash()
    write_metadata(adapter.path, adapter.metadata | {"mlflow_run_id": "another run"})
    assert adapter.content_hash() == before
    save_weights(adapter.path, b"other weights")
    assert adapter.content_hash() != before


def test_content_hash_is_canonical(tmp_path: Path) -> None:
    """What PEFT writes differently for the same function hashes the same: the order of
    `target_modules`, key order, where the base lived, the safetensors header's order and metadata."""
    from safetensors.numpy import save_file

    first, second = make_adapter(tmp_path, "first"), make_adapter(tmp_path, "second")
    save_weights(second.path, b"first")
    config = json.loads((first.path / "adapter_config.json").read_text())
    reordered = dict(reversed(list(config.items()))) | {
        "target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": "/elsewhere/tiny-base", "peft_version": "9.9",
    }
    (second.path / "adapter_config.json").write_text(json.dumps(reordered))
    tensors = {"b": np.arange(4, dtype=np.float32), "a": np.frombuffer(b"first".ljust(8, b"\0"), dtype=np.uint8)}
    save_file(tensors, str(first.path / "adapter_model.safetensors"))
    save_file(dict(reversed(tensors.items())), str(second.path / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert first.content_hash() == second.content_hash()
    (second.path / "adapter_config.json").write_text(json.dumps(reordered | {"lora_alpha": 64}))  # scales the update
    assert first.content_hash() != second.content_hash()


def test_content_hash_of_a_folder_without_weights_is_one_clear_error(tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path, "a")
    (adapter.path / "adapter_model.safetensors").unlink()
    with pytest.raises(TracesftError, match="has no adapter_model.safetensors"):
        adapter.content_hash()
    (adapter.path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TracesftError, match="not a readable safetensors file"):
        adapter.content_hash()


# --- a real registry -------------------------------------------------------------------------


def make_adapter(root: Path, name: str, **metadata: Any) -> LoraAdapter:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]})
    )
    save_weights(path, name.encode())  # distinct content per name
    return write_metadata(path, {"base_model": "tiny-base", "traces_content_hash": "ab" * 32, **metadata})


def save_weights(path: Path, content: bytes) -> None:
    from safetensors.numpy import save_file

    save_file({"lora_A": np.frombuffer(content.ljust(64, b"\0"), dtype=np.uint8)}, str(path / "adapter_model.safetensors"))


def metrics(finetuned_f1: float, base_f1: float = 0.40) -> dict[str, float]:
    return {
        "base_f1": base_f1,
        "base_accuracy": 0.5,
        "base_parse_failure_rate": 0.1,
        "finetuned_f1": finetuned_f1,
        "finetuned_accuracy": 0.7,
        "finetuned_parse_failure_rate": 0.0,
        "eval_problems": 40.0,
    }


def lineage(n: int) -> dict[str, str]:
    return {"base_model": "tiny-base", "traces_content_hash": f"{n:02d}" * 32, "eval_set_hash": "cd" * 32, "train_examples": "91"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One sqlite registry for this module: three versions registered and gated in turn.

    Each step's results, and the registry as seen right after it, are kept for the tests below.
    """
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)  # anything relative lands in the temporary folder, never in the repo
        settings = RegistrySettings(experiment_name="tracesft-tests", model_name=MODEL)
        steps: list[dict[str, Any]] = []

        def step(adapter: LoraAdapter, scores: dict[str, float], n: int) -> None:
            registered = register_adapter(adapter, scores, lineage(n), settings)
            after_register = list_versions(settings)
            decision = promote_if_better(registered, scores, settings)
            steps.append(
                {"adapter": adapter, "registered": registered, "after_register": after_register,
                 "decision": decision, "after_promotion": list_versions(settings)}
            )

        step(make_adapter(root, "v1"), metrics(0.60), 1)  # beats the base: champion
        step(make_adapter(root, "v2"), metrics(0.55), 2)  # beats the base, not the champion
        # v3 comes from a training run that already exists, as the train_adapter step leaves it.
        with mlflow_tracking(settings) as experiment_id, mlflow.start_run(experiment_id=experiment_id) as training_run:
            mlflow.log_metric("train_loss", 0.25)
        step(make_adapter(root, "v3", mlflow_run_id=training_run.info.run_id), metrics(0.70), 3)

        yield {"root": root, "settings": settings, "steps": steps, "training_run_id": training_run.info.run_id}


def test_register_creates_version_1_with_challenger_and_lineage(registry: dict[str, Any]) -> None:
    first = registry["steps"][0]
    assert first["registered"].name == MODEL
    assert first["registered"].version == "1"
    assert first["registered"].source.endswith("/adapter")
    [row] = first["after_register"]
    assert row["version"] == "1"
    assert row["aliases"] == [CHALLENGER]
    assert row["run_id"] == first["registered"].run_id
    for key, value in lineage(1).items():
        assert row["tags"][key] == value
    assert float(row["tags"]["finetuned_f1"]) == pytest.approx(0.60)
    assert row["metrics"]["finetuned_f1"] == pytest.approx(0.60)
    assert row["metrics"]["base_f1"] == pytest.approx(0.40)


def test_registered_artifacts_are_the_adapter_files(registry: dict[str, Any]) -> None:
    from mlflow.artifacts import download_artifacts

    first = registry["steps"][0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry['root']}/mlflow.db")
        local = Path(download_artifacts(artifact_uri=first["registered"].source, dst_path=str(registry["root"] / "dl")))
    adapter: LoraAdapter = first["adapter"]
    assert sorted(p.name for p in local.iterdir()) == sorted([PROMPT_TEMPLATE_FILE] + [p.name for p in adapter.files()])
    assert json.loads((local / METADATA_FILE).read_text()) == adapter.metadata
    assert json.loads((local / PROMPT_TEMPLATE_FILE).read_text()) == prompt_template()
    # With a sqlite store the artifacts sit beside the database, not in the working directory's mlruns/.
    assert (registry["root"] / "mlartifacts").is_dir()
    assert not (registry["root"] / "mlruns").exists()


def test_first_version_beating_the_base_becomes_champion(registry: dict[str, Any]) -> None:
    first = registry["steps"][0]
    decision = first["decision"]
    assert decision.promoted
    assert (decision.version, decision.champion_version, decision.champion_f1) == ("1", None, None)
    assert "no champion yet" in decision.reason
    assert first["after_promotion"][0]["aliases"] == sorted([CHALLENGER, CHAMPION])


def test_worse_second_version_is_not_promoted(registry: dict[str, Any]) -> None:
    second = registry["steps"][1]
    assert second["registered"].version == "2"
    decision = second["decision"]
    assert not decision.promoted
    assert decision.champion_version == "1"
    assert decision.champion_f1 == pytest.approx(0.60)
    assert "does not beat champion" in decision.reason
    aliases = {row["version"]: row["aliases"] for row in second["after_promotion"]}
    assert aliases == {"2": [CHALLENGER], "1": [CHAMPION]}


def test_better_third_version_is_promoted(registry: dict[str, Any]) -> None:
    third = registry["steps"][2]
    assert third["registered"].version == "3"
    assert third["registered"].run_id == registry["training_run_id"]  # logged to the training run
    decision = third["decision"]
    assert decision.promoted
    assert decision.champion_version == "1"
    aliases = {row["version"]: row["aliases"] for row in third["after_promotion"]}
    assert aliases == {"3": sorted([CHALLENGER, CHAMPION]), "2": [], "1": []}


def test_list_versions_newest_first(registry: dict[str, Any]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry['root']}/mlflow.db")
        rows = list_versions(registry["settings"])
    assert [row["version"] for row in rows] == ["3", "2", "1"]
    for row in rows:
        assert row["name"] == MODEL
        assert isinstance(row["aliases"], list)
        assert isinstance(row["tags"], dict) and row["tags"]["base_model"] == "tiny-base"
        assert isinstance(row["metrics"], dict)
    assert [row["metrics"]["finetuned_f1"] for row in rows] == pytest.approx([0.70, 0.55, 0.60])
    assert rows[0]["metrics"]["train_loss"] == pytest.approx(0.25)  # the training run's own metrics
    assert [row["tags"]["traces_content_hash"][:2] for row in rows] == ["03", "02", "01"]


def test_list_versions_of_an_unknown_model_is_empty(registry: dict[str, Any]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry['root']}/mlflow.db")
        assert list_versions(registry["settings"].model_copy(update={"model_name": "nobody"})) == []


def test_a_second_configuration_in_the_same_process_gets_its_own_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    set_before = mlflow.tracking.is_tracking_uri_set()
    first = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/first.db", experiment_name="one")
    second = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/second.db", experiment_name="two")
    with mlflow_tracking(first):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/first.db"
        assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's export is not taken for the user's
        assert resolve_tracking_uri(second) == f"sqlite:///{tmp_path}/second.db"
    with mlflow_tracking(second):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/second.db"
    assert mlflow.tracking.is_tracking_uri_set() == set_before  # MLflow is left as it was found


def test_mlflow_retries_are_off_while_registry_calls_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MLflow's own retries (which resend creates) are off while any call runs (calls may overlap, in
    threads); tracesft retries instead, as often as the user's variable says; after the last call
    the user's values are back."""
    retries, timeout = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
    monkeypatch.setenv(retries, "5")
    monkeypatch.delenv(timeout, raising=False)
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    first, second = registry_client(settings), registry_client(settings)
    assert first.__enter__().retries == 5
    assert (os.environ[retries], os.environ[timeout]) == ("0", "60")
    assert second.__enter__().retries == 5
    first.__exit__(None, None, None)  # the first call ends while the second still runs
    assert os.environ[retries] == "0"
    second.__exit__(None, None, None)
    assert os.environ[retries] == "5" and timeout not in os.environ


def test_a_retry_setting_that_is_not_a_number_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "three")
    with pytest.raises(TracesftError, match="MLFLOW_HTTP_REQUEST_MAX_RETRIES is 'three', not a number"):
        with registry_client(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")):
            pass
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "three"


def test_tracking_leaves_mlflow_following_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """After a block MLflow's own default is the user's again, even when the variable changes later."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/user.db")
    with mlflow_tracking(RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/ignored.db")):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/user.db"  # the variable wins
        with mlflow_tracking(RegistrySettings(experiment_name="nested")):
            pass
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/user.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/later.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/later.db"


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def cli_registry(registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The module's registry, plus one version under the embedded config's model name."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry['root']}/mlflow.db")
    monkeypatch.chdir(registry["root"])
    settings = load_run_config().registry
    if not list_versions(settings):
        adapter = make_adapter(registry["root"], "cli-v1")
        registered = register_adapter(adapter, metrics(0.65), lineage(9), settings)
        promote_if_better(registered, metrics(0.65), settings)
    return registry


def test_cli_adapters_list_json(cli_registry: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 1
    assert rows[0]["name"] == CLI_MODEL == "corr2cause-tiny-lora"
    assert rows[0]["version"] == "1"
    assert rows[0]["aliases"] == sorted([CHALLENGER, CHAMPION])
    assert rows[0]["metrics"]["finetuned_f1"] == pytest.approx(0.65)


def test_cli_adapters_list_text(cli_registry: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "list"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[1:3]
    assert header.split() == ["version", "registered", "(UTC)", "base", "F1", "fine-tuned", "F1", "aliases"]
    assert re.fullmatch(r"\s+1  \d{4}-\d\d-\d\d \d\d:\d\d  +\d\.\d{3}  +0\.650  challenger, champion", row), row


def test_cli_adapters_show(cli_registry: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "show", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["version"]) == (CLI_MODEL, "1")
    assert main(["adapters", "show", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{CLI_MODEL} version 1") and "traces_content_hash" in out
    # An alias names a version, as in `adapters export`.
    assert main(["adapters", "show", "champion"]) == 0
    assert capsys.readouterr().out.startswith(f"{CLI_MODEL} version 1")


def test_cli_adapters_show_unknown_version(cli_registry: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "show", "99"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert f"{CLI_MODEL} has no version or alias '99'" in captured.err
    assert "tracesft adapters list" in captured.err
    assert "Traceback" not in captured.err


def test_cli_adapters_list_with_a_config(cli_registry: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"parameters:\n  traces: [t]\n  eval_set: e.csv\n  registry:\n    model_name: {MODEL}\n")
    assert main(["adapters", "list", "--json", "--config", str(config)]) == 0
    assert [row["version"] for row in json.loads(capsys.readouterr().out)] == ["3", "2", "1"]


@pytest.mark.parametrize(("text", "expected"), [("Reasoning...\n\nAnswer: Yes\n", "yes"), ("**Answer:** No", "no"), ("I am not sure.", "none")])
def test_cli_parse_answer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["parse-answer"]) == 0
    assert capsys.readouterr().out == f"{expected}\n"


def test_cli_verify_traces_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-traces", str(SAMPLE_DIR), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    problems = len(bundled_rows(TRACE_PROBLEMS_CSV))
    assert report["records"] == problems + 1
    assert report["kept"] == report["records"] - sum(report["rejected"].values())
    assert report["rejected"]["unparseable_answer"] == len(UNPARSEABLE)
    assert set(report["rejected"]) == {
        "duplicate",
        "flag_contradicts_text",
        "gold_contradicted_by_solver",
        "unparseable_answer",
        "wrong_answer",
    }
    assert len(report["rejections"]) == sum(report["rejected"].values())
    assert all(r["where"].startswith(str(SAMPLE_DIR)) for r in report["rejections"])
    assert len(report["content_hash"]) == 64


def test_cli_verify_traces_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-traces", str(SAMPLE_DIR)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("rejected") and "kept" in out
    assert "unparseable_answer" in out


def test_cli_verify_traces_with_a_field_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "run.jsonl"
    problem = (
        "Premise: Suppose there is a closed system of 2 variables, A and B. All the statistical relations among "
        "these 2 variables are as follows: A correlates with B.\nHypothesis: A directly causes B."
    )
    results.write_text(json.dumps({"problem": problem, "completion": "Answer: No", "verdict": 0}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text("parameters:\n  traces: [t]\n  eval_set: e.csv\n  field_map: {query: problem, trace: completion, gold: verdict}\n")
    assert main(["verify-traces", str(results), "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 1


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        ('[{"input": "q", "response": "Answer: Yes", "label": "maybe"}]', ["(record 1)", "gold label", "'maybe'"]),
        ('[{"input": "q", "label": 1}]', ["(record 1)", "missing field 'trace'"]),
        ('{"input": "q",', ["not valid JSON", "line 1"]),
    ],
)
def test_cli_bad_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, parts: list[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["verify-traces", str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {bad}")
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err
    for part in parts:
        assert part in captured.err


def test_cli_bad_config_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("parameters:\n  traces: [t]\n  eval_set: e.csv\n  registry:\n    modelname: x\n")
    assert main(["adapters", "list", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}") and "parameters.registry.modelname" in err
    assert "Traceback" not in err

