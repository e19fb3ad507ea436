"""Where MLflow lives for this run, and training metrics flowing into it.

One rule everywhere (pipeline and CLI alike): `MLFLOW_TRACKING_URI` wins, then the run
configuration's `registry.tracking_uri`, then a sqlite file in the local state folder. A relative
sqlite path is made absolute against the working directory, so every process started from the
repo root sees the same registry.

MLflow's run API (`mlflow.start_run`, `mlflow.log_*`, and with it the Trainer callback below)
finds its store through one process-wide setting. `mlflow_tracking` sets it for a block only, so
one step's store never leaks into the next; code that needs no active run takes an explicit
`MlflowClient(uri)` instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracesft.config import Device, RegistrySettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STATE_DIR = Path(".tracesft")
_SQLITE = "sqlite:///"
_TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(settings: RegistrySettings) -> str:
    uri = os.environ.get(_TRACKING_URI_VARIABLE) or settings.tracking_uri or f"{_SQLITE}{STATE_DIR / 'mlflow.db'}"
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE) :])
        if not path.is_absolute():
            uri = f"{_SQLITE}{path.resolve()}"
    return uri


@contextmanager
def mlflow_tracking(settings: RegistrySettings) -> Iterator[str]:
    """MLflow's run API on the resolved store and experiment for the block; yields the experiment id.

    MLflow keeps that store in one process-wide setting and has no scoped way to set it, so the
    block puts it back when it ends: MLflow following `MLFLOW_TRACKING_URI` again, unless a URI
    had been set in code before. Blocks nest; like MLflow's run API itself, they do not let two
    threads track into different stores at once.

    With a sqlite store the artifacts sit beside the database file instead of in an `mlruns/` of
    whatever directory the process happens to start in.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking import is_tracking_uri_set

    uri = resolve_tracking_uri(settings)
    users_variable = os.environ.get(_TRACKING_URI_VARIABLE)
    previous = mlflow.get_tracking_uri()
    set_in_code = is_tracking_uri_set() and previous != users_variable
    _point_mlflow_at(uri, users_variable)
    try:
        yield _experiment_id(MlflowClient(tracking_uri=uri), settings.experiment_name, uri)
    finally:
        _point_mlflow_at(previous if set_in_code else None, users_variable)


def _point_mlflow_at(uri: str | None, users_variable: str | None) -> None:
    """`mlflow.set_tracking_uri(uri)` (None: follow the environment) and nothing else.

    MLflow also exports the URI as `MLFLOW_TRACKING_URI`, where `resolve_tracking_uri` would take
    it for the user's override; the variable is put back at once. Subprocesses that need the
    store get it explicitly (`tracesft.train.distributed.worker_environment`).
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    if users_variable is None:
        os.environ.pop(_TRACKING_URI_VARIABLE, None)
    else:
        os.environ[_TRACKING_URI_VARIABLE] = users_variable


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith(_SQLITE):
        database = Path(uri[len(_SQLITE) :])
        database.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (database.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def mlflow_logging_callback(device: Device) -> Any:
    """A `TrainerCallback` that sends training to the active MLflow run.

    At each logging step: the Trainer's own values (loss, learning rate, gradient norm, and the
    validation loss whenever it evaluates), plus real (non-padding) tokens/s and samples/s over the
    interval and, with `device` cuda, GPU memory allocated and peak. At the end, a loss-curve PNG.
    """
    import time

    import mlflow
    import torch
    from transformers import TrainerCallback

    class MlflowLoggingCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self._examples_per_row = _examples_per_row(train_dataloader)
            self._last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (state.is_world_process_zero and logs):
                return
            numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            now, tokens, step = time.perf_counter(), state.num_input_tokens_seen, state.global_step
            last_time, last_tokens, last_step = self._last
            if "loss" in logs and now > last_time and step > last_step:
                rows = (step - last_step) * args.per_device_train_batch_size * args.gradient_accumulation_steps
                numeric["tokens_per_s"] = (tokens - last_tokens) / (now - last_time)
                numeric["samples_per_s"] = rows * self._examples_per_row / (now - last_time)
                self._last = (now, tokens, step)
            if device == "cuda":
                numeric["gpu_memory_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
                numeric["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            mlflow.log_metrics(numeric, step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                mlflow.log_figure(loss_curve(state.log_history), "loss_curve.png")

    return MlflowLoggingCallback()


def _examples_per_row(dataloader: Any) -> float:
    """Examples in one training row: 1 unpacked; the mean over the packed rows otherwise."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or "seq_lengths" not in getattr(dataset, "column_names", []):
        return 1.0
    return sum(len(lengths) for lengths in dataset["seq_lengths"]) / max(len(dataset), 1)


def loss_curve(log_history: list[dict[str, Any]]) -> Figure:
    """Training and validation loss against the optimizer step, as a matplotlib figure.

    A bare `Figure` rather than a pyplot one: it renders to PNG without a display, so no backend
    is chosen for the whole process, and nothing needs closing.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (completion tokens)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure
