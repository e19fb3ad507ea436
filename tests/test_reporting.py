"""Optional WandB reporting beside MLflow: off by default, real training with WandB in offline
mode, and a warning (once) and MLflow alone when WandB is asked for but unusable."""

import logging
import sys
from pathlib import Path

import pytest

from tracesft.config import TrainingRecipe, load_run_config
from tracesft.data.ingest import ingest
from tracesft.train.reporting import reporting_callbacks
from tracesft.data.sample_data import DATA, TRACE_FILES, tokenizer_corpus
from tracesft.data.sft_dataset import build_sft_dataset
from tracesft.train.tiny_model import build_tiny_model
from tracesft.train.training import train_lora
from tracesft.data.verify import verify

WANDB_VARIABLES = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL")


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def _recipe(**overrides) -> TrainingRecipe:
    embedded = load_run_config().training.model_dump()
    return TrainingRecipe.model_validate(embedded | {"num_train_epochs": 1, "logging_steps": 1} | overrides)


def test_off_by_default_with_the_seeds_project_and_run_name():
    recipe = TrainingRecipe()
    assert recipe.report_to == [] and reporting_callbacks(recipe) == []
    assert recipe.wandb_project == "corr2cause-sft" and recipe.wandb_run_name


def test_unknown_reporter_is_rejected():
    with pytest.raises(ValueError):
        TrainingRecipe(report_to=["tensorboard"])


def test_missing_credentials_warn_once_and_report_nothing(no_wandb_credentials, caplog):
    with caplog.at_level(logging.WARNING, logger="tracesft.train.reporting"):
        assert reporting_callbacks(_recipe(report_to=["wandb"])) == []
    [warning] = caplog.records
    assert "WandB reporting is off" in warning.message and "WANDB_API_KEY" in warning.message


def test_missing_package_warns_and_reports_nothing(no_wandb_credentials, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="tracesft.train.reporting"):
        assert reporting_callbacks(_recipe(report_to=["wandb"])) == []
    [warning] = caplog.records
    assert "not installed" in warning.message


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    model = build_tiny_model(root / "model", tokenizer_corpus())
    batch = ingest([str(DATA / "sample_traces" / name) for name in TRACE_FILES])
    return model, build_sft_dataset(verify(batch).kept, validation_fraction=0.15, seed=0)


def test_offline_wandb_run_records_training_beside_the_trainer(tiny_setup, no_wandb_credentials, monkeypatch, tmp_path):
    model, dataset = tiny_setup
    monkeypatch.setenv("WANDB_MODE", "offline")

    adapter, summary = train_lora(dataset, str(model), _recipe(report_to=["wandb"]), "cpu", tmp_path / "out")

    assert summary.global_steps > 0 and (adapter.path / "adapter_config.json").exists()
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [record] = run_dir.glob("run-*.wandb")
    assert record.stat().st_size > 0
    import wandb

    assert wandb.run is None, "the reporter closes its run when training ends"

