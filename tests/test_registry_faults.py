"""The registry's promises under faults, against a real `mlflow server` behind a fault-injecting
proxy (`tests/fault_proxy.py`): a lost create response leaves one version; an adapter written
differently but computing the same is one version; a server switch registers on the new server;
a failed history write, or a failed alias move, leaves a consistent champion and history (never
the stuck state); racing promoters in separate processes, with latency and a holder killed
mid-promotion, leave one champion and a history holding every change reported done.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import fault_proxy
from tests.registry_support import MlflowServer, tiny_adapter, tiny_base
from tracesft.config import RegistrySettings
from tracesft.errors import TracesftError
from tracesft.registry.lock import lock_name
from tracesft.registry.model_registry import (
    CHAMPION,
    champion_history,
    list_versions,
    promote_version,
    register_adapter,
    registry_client,
    rollback_champion,
)
from tracesft.train.adapter import LoraAdapter

FORK = multiprocessing.get_context("fork")  # real processes, started without re-importing torch and MLflow


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, fault_proxy.FaultProxy]]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-faults"))
    server.start()
    proxy = fault_proxy.start(server.uri)
    yield server, proxy
    proxy.close()
    server.stop()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("faults-base"))


@pytest.fixture
def env(servers: tuple[MlflowServer, fault_proxy.FaultProxy], base: Path, request: pytest.FixtureRequest,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The client talks to the proxy, with quick retries; a model name of this test's own."""
    server, proxy = servers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.chdir(tmp_path)
    name = "faults-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)
    yield {"server": server, "proxy": proxy, "base": base, "root": tmp_path,
           "settings": RegistrySettings(experiment_name="faults", model_name=name, lock_lease_s=3.0)}
    proxy.clear()


def scores(f1: float) -> dict[str, float]:
    return {"base_f1": 0.40, "finetuned_f1": f1}


def lineage(adapter: LoraAdapter) -> dict[str, str]:
    return {"base_model": "tiny", "base_model_revision": "", "traces_content_hash": "ab" * 32, "eval_set_hash": "e1" * 32}


def register(env: dict[str, Any], seed: int, **metadata: Any) -> Any:
    lora = tiny_adapter(env["base"], env["root"] / f"adapter-{seed}-{len(metadata)}", seed, **metadata)
    return register_adapter(lora, scores(0.5 + seed / 100), lineage(lora), env["settings"])


def bare_versions(settings: RegistrySettings, count: int) -> None:
    """`count` versions without files: promotion tests need version numbers, not adapters."""
    with registry_client(settings) as client:
        client.create_registered_model(settings.model_name)
        for _ in range(count):
            client.raw.create_model_version(settings.model_name, source="test:/no-files", await_creation_for=0)


def champion(settings: RegistrySettings) -> str | None:
    return next((row["version"] for row in list_versions(settings) if CHAMPION in row["aliases"]), None)


def assert_chain(settings: RegistrySettings) -> list[Any]:
    """Every entry starts where the one before ended, and the last names the alias."""
    history = champion_history(settings)
    assert [h.seq for h in history] == list(range(1, len(history) + 1))
    for earlier, later in zip(history, history[1:]):
        assert later.previous == earlier.version
    assert champion(settings) == (history[-1].version if history else None)
    return history


# --- registration ------------------------------------------------------------------------------


def test_a_lost_create_response_leaves_one_version(env: dict[str, Any]) -> None:
    env["proxy"].add_rule("/model-versions/create", "drop_response", times=2, method="POST")
    registered = register(env, seed=1)
    assert (registered.version, registered.reused) == ("1", False)
    assert [row["version"] for row in list_versions(env["settings"])] == ["1"]
    assert [r for r in env["proxy"].requests if r[1].endswith("/model-versions/create") and r[2] == 504]


def test_an_adapter_written_differently_but_computing_the_same_is_one_version(env: dict[str, Any]) -> None:
    """PEFT writes `target_modules` in set order and records where the base lived: neither makes
    another adapter (issue 17's pairs of byte-identical weights with different hashes)."""
    first = register(env, seed=2)
    lora = tiny_adapter(env["base"], env["root"] / "rewritten", seed=2)
    config = json.loads((lora.path / "adapter_config.json").read_text())
    config |= {"target_modules": sorted(config["target_modules"], reverse=True), "base_model_name_or_path": "/other/place"}
    (lora.path / "adapter_config.json").write_text(json.dumps(config))
    again = register_adapter(lora, scores(0.52), lineage(lora), env["settings"])
    assert (first.reused, again.reused, again.version) == (False, True, first.version)
    assert again.describe() == f"found version {first.version}"
    assert len(list_versions(env["settings"])) == 1


def test_a_server_switch_registers_once_on_the_new_server(env: dict[str, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter's training run lives in the old registry; the new one gets a run of its own."""
    old = f"sqlite:///{tmp_path}/old.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", old)
    on_old = register(env, seed=3)
    training_run = on_old.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["proxy"].url)
    lora = tiny_adapter(env["base"], env["root"] / "switched", seed=3, mlflow_run_id=training_run)
    on_new = register_adapter(lora, scores(0.53), lineage(lora), env["settings"])
    assert (on_new.version, on_new.reused, on_new.registry_uri) == ("1", False, env["proxy"].url)
    assert on_new.run_id != training_run and on_new.source.startswith("mlflow-artifacts:/")
    repeat = register_adapter(lora, scores(0.53), lineage(lora), env["settings"])
    assert (repeat.version, repeat.reused) == ("1", True)
    assert len(list_versions(env["settings"])) == 1


# --- promotion atomicity -----------------------------------------------------------------------


def test_a_failed_history_write_leaves_the_champion_where_it_was(env: dict[str, Any]) -> None:
    settings, proxy = env["settings"], env["proxy"]
    bare_versions(settings, 2)
    promote_version(settings, "1", force=True)
    proxy.add_rule("/registered-models/set-tag", "error", times=99, method="POST")
    with pytest.raises(TracesftError, match="failed"):
        promote_version(settings, "2", force=True)
    proxy.clear()
    assert champion(settings) == "1" and [h.version for h in assert_chain(settings)] == ["1"]


def test_a_failed_alias_move_takes_its_history_entry_back(env: dict[str, Any]) -> None:
    settings, proxy = env["settings"], env["proxy"]
    bare_versions(settings, 2)
    promote_version(settings, "1", force=True)
    proxy.add_rule("/registered-models/alias", "error", times=99, method="POST")
    with pytest.raises(TracesftError, match="moving champion of .* to version 2 failed"):
        promote_version(settings, "2", force=True)
    proxy.clear()
    assert champion(settings) == "1" and [h.version for h in assert_chain(settings)] == ["1"]


def test_when_the_server_goes_away_mid_promotion_the_registry_is_not_stuck(env: dict[str, Any]) -> None:
    """Issue 17's stuck state: the entry is written, the alias move and its undo both fail. Readers
    see a history ending at the alias; promote and rollback work on."""
    settings, proxy = env["settings"], env["proxy"]
    bare_versions(settings, 3)
    promote_version(settings, "1", force=True)
    promote_version(settings, "2", force=True)
    proxy.add_rule("/registered-models/alias", "error", times=99, method="POST")
    proxy.add_rule("/registered-models/delete-tag", "error", times=99, method="DELETE")
    with pytest.raises(TracesftError):
        promote_version(settings, "3", force=True)
    proxy.clear()
    with registry_client(settings) as client:
        assert len([k for k in client.get_registered_model(settings.model_name).tags if k.startswith("champion_history.")]) == 3
    assert [h.version for h in assert_chain(settings)] == ["1", "2"]  # the unsettled entry is not shown
    assert rollback_champion(settings).version == "1"  # and the next change clears it first
    assert promote_version(settings, "3", force=True).previous == "1"
    assert [h.version for h in assert_chain(settings)] == ["1", "2", "1", "3"]


# --- racing processes --------------------------------------------------------------------------


def _promoter(settings: RegistrySettings, version: str, results: Any) -> None:
    """One promoting process: `tracesft adapters promote VERSION --force`, retried while the lock is busy
    (as a person would), reporting what it was told."""
    deadline = time.monotonic() + 60
    while True:
        try:
            change = promote_version(settings, version, force=True)
            results.put(("done", version, change.seq, change.previous))
            return
        except TracesftError as err:
            if "already champion" in str(err):
                results.put(("refused", version, None, None))
                return
            if time.monotonic() > deadline:
                results.put(("failed", version, None, str(err)))
                return
            time.sleep(0.1)


@pytest.mark.parametrize("trial", [1, 2])
def test_racing_promoters_with_latency_and_a_killed_holder(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, trial: int) -> None:
    settings, proxy = env["settings"], env["proxy"]
    monkeypatch.setattr("tracesft.registry.lock.TAKEOVER_MARGIN_S", 0.5)  # inherited by the forked promoters
    bare_versions(settings, 5)
    promote_version(settings, "1", force=True)

    # A holder killed mid-promotion: it holds the lock, has written its history entry, and dies
    # while its alias move is in flight.
    proxy.add_rule("/registered-models/alias", "stall", times=1, method="POST")
    holder = FORK.Process(target=_promoter, args=(settings, "5", FORK.Queue()))
    holder.start()
    assert proxy.stalled.wait(30)
    holder.kill()
    holder.join()
    assert holder.exitcode == -signal.SIGKILL

    proxy.latency_s = (0.0, 0.1)
    proxy.error_rate, proxy.error_status = 0.03, 503
    results = FORK.Queue()
    targets = ["2", "3", "4", "5", "2", "3", "4", "5"]
    racers = [FORK.Process(target=_promoter, args=(settings, version, results)) for version in targets]
    for racer in racers:
        racer.start()
    reports = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join()
    proxy.clear()

    done = [r for r in reports if r[0] == "done"]
    assert not [r for r in reports if r[0] == "failed"], reports
    assert done, reports
    history = assert_chain(settings)  # one champion, named by the history's end
    entries = {(h.seq, h.version, h.previous) for h in history}
    assert {(seq, version, previous) for _, version, seq, previous in done} <= entries  # every change reported done
    assert len(history) == 1 + len(done)  # and nothing else: the killed holder's entry was settled away
    with registry_client(settings) as client:
        assert not client.search_model_versions(filter_string=f"name = '{lock_name(settings.model_name)}'")
