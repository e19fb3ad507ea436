"""Where MLflow lives for this run, and training metrics flowing into it.

One rule everywhere (pipeline and CLI alike): `MLFLOW_TRACKING_URI` wins, then the run
configuration's `registry.tracking_uri`, then a sqlite file in the local state folder. A relative
sqlite path is made absolute against the working directory, so every process started from the
repo root sees the same registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tracesft.config import RegistrySettings

STATE_DIR = Path(".tracesft")
_SQLITE = "sqlite:///"
_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def resolve_tracking_uri(settings: RegistrySettings) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.tracking_uri or f"{_SQLITE}{STATE_DIR / 'mlflow.db'}"
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE) :])
        if not path.is_absolute():
            uri = f"{_SQLITE}{path.resolve()}"
    return uri


def use_tracking(settings: RegistrySettings) -> str:
    """Point MLflow at the resolved store and experiment; return the experiment id.

    With a sqlite store the artifacts sit beside the database file instead of in an `mlruns/`
    of whatever directory the process happens to start in.
    """
    import mlflow

    uri = resolve_tracking_uri(settings)
    # MLflow exports the URIs it is given into the environment, where the next
    # `resolve_tracking_uri` would mistake them for the user's override: put the user's back.
    user_environment = {name: os.environ.get(name) for name in _MLFLOW_URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in user_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith(_SQLITE):
        database = Path(uri[len(_SQLITE) :])
        database.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (database.parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(settings.experiment_name, artifact_location=artifact_location)


def mlflow_logging_callback() -> Any:
    """A `TrainerCallback` that logs every Trainer log line to the active MLflow run, by step."""
    import mlflow
    from transformers import TrainerCallback

    class MlflowLoggingCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                mlflow.log_metrics(numeric, step=state.global_step)

    return MlflowLoggingCallback()
