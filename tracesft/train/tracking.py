"""Where MLflow lives for this run, how long a call to it may wait, and training metrics flowing into it.

One rule everywhere (pipeline and CLI alike): `MLFLOW_TRACKING_URI` wins, then the run
configuration's `registry.tracking_uri`, then `mlflow.db` in the workspace's `.tracesft/`
(`tracesft.workspace`). A relative sqlite path is read against the workspace, so every command,
from any working directory, sees the same registry; a command that only reads refuses a local
store that does not exist (`existing_tracking_uri`) instead of letting MLflow create an empty one.

MLflow's run API (`mlflow.start_run`, `mlflow.log_*`, and with it the Trainer callback below)
finds its store through one process-wide setting. `mlflow_tracking` sets it for a block only, so
one step's store never leaks into the next; code that needs no active run takes an explicit
`MlflowClient(uri)` instead.

Every MLflow call tracesft makes, in a pipeline step or a command, runs with bounded HTTP
retries (`bounded_http_retries`), and a failure reaches the user as one line naming the server
(`mlflow_failure`): MLflow's own default retries an unreachable server for minutes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracesft.config import Device, RegistrySettings
from tracesft.errors import TracesftError
from tracesft.workspace import state_dir, workspace_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_SQLITE = "sqlite:///"
_FILE = "file://"
_TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
# MLflow retries an unreachable server 7 times with doubling waits (minutes in all, ~8 in a
# training step); a user waiting on `tracesft adapters promote`, or a pipeline step whose server
# went away, wants an answer in seconds. Values already in the environment win. MLflow reads these
# from the environment only (neither `MlflowClient` nor its calls take them), so
# `bounded_http_retries` sets them there while tracesft's MLflow calls run.
BOUNDED_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_retry_guard = threading.Lock()
_retry_holders = 0  # MLflow blocks running now, in any thread
_retry_variables_added: tuple[str, ...] = ()  # what the first of them added to the environment


def resolve_tracking_uri(settings: RegistrySettings) -> str:
    uri = os.environ.get(_TRACKING_URI_VARIABLE) or settings.tracking_uri or f"{_SQLITE}{state_dir() / 'mlflow.db'}"
    if uri.startswith(_SQLITE):
        uri = f"{_SQLITE}{workspace_path(uri[len(_SQLITE) :])}"
    return uri


def existing_tracking_uri(settings: RegistrySettings) -> str:
    """`resolve_tracking_uri`, refused when it names a local store that does not exist.

    For commands that only read the registry: MLflow would create an empty sqlite database (or
    file store) wherever a mistyped URI points and answer "no versions", which reads like
    "nothing registered yet" rather than "wrong place".
    """
    uri = resolve_tracking_uri(settings)
    prefix = next((prefix for prefix in (_SQLITE, _FILE) if uri.startswith(prefix)), None)
    if prefix is not None and not Path(uri[len(prefix) :]).exists():
        source = ("MLFLOW_TRACKING_URI" if os.environ.get(_TRACKING_URI_VARIABLE)
                  else "registry.tracking_uri" if settings.tracking_uri else "the default registry")
        raise TracesftError(
            f"{uri} ({source}): no MLflow registry there; check the path (relative ones are read against "
            f"{state_dir().parent}), or run the pipeline first (make demo, tracesft run) to create it."
        )
    return uri


@contextmanager
def bounded_http_retries() -> Iterator[None]:
    """`BOUNDED_RETRIES` in the environment while any MLflow block runs; variables the user set stay.

    MLflow blocks may overlap (threads promoting at once, a registry call around a tracking
    block), so the first one in sets the variables and the last one out removes them again.
    Subprocesses started inside (the training workers) inherit them.
    """
    global _retry_holders, _retry_variables_added
    with _retry_guard:
        if _retry_holders == 0:
            _retry_variables_added = tuple(name for name in BOUNDED_RETRIES if name not in os.environ)
            os.environ.update({name: BOUNDED_RETRIES[name] for name in _retry_variables_added})
        _retry_holders += 1
    try:
        yield
    finally:
        with _retry_guard:
            _retry_holders -= 1
            if _retry_holders == 0:
                for name in _retry_variables_added:
                    os.environ.pop(name, None)


def mlflow_failure(uri: str, err: Any) -> TracesftError:
    """One line for an `MlflowException`: which server, and for an unreachable one what to check."""
    message = str(getattr(err, "message", err)).strip().splitlines()[0]
    unreachable = "API request to" in message
    hint = (
        f" after {os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', BOUNDED_RETRIES['MLFLOW_HTTP_REQUEST_MAX_RETRIES'])} "
        f"retries; check that the MLflow server at {uri} is running and reachable (MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
        "MLFLOW_HTTP_REQUEST_TIMEOUT tune the patience)"
        if unreachable
        else ""
    )
    return TracesftError(f"MLflow at {uri} failed{hint}: {message}")


@contextmanager
def mlflow_tracking(settings: RegistrySettings) -> Iterator[str]:
    """MLflow's run API on the resolved store and experiment for the block; yields the experiment id.

    MLflow keeps that store in one process-wide setting and has no scoped way to set it, so the
    block puts it back when it ends: MLflow following `MLFLOW_TRACKING_URI` again, unless a URI
    had been set in code before. Blocks nest; like MLflow's run API itself, they do not let two
    threads track into different stores at once.

    With a sqlite store the artifacts sit beside the database file instead of in an `mlruns/` of
    whatever directory the process happens to start in. MLflow calls inside the block have
    bounded retries, and one that still fails leaves it as one `TracesftError` line; an
    `mlflow.start_run` inside has already ended its run as FAILED on the way out, if the server
    still answered.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import is_tracking_uri_set

    uri = resolve_tracking_uri(settings)
    users_variable = os.environ.get(_TRACKING_URI_VARIABLE)
    previous = mlflow.get_tracking_uri()
    set_in_code = is_tracking_uri_set() and previous != users_variable
    _point_mlflow_at(uri, users_variable)
    try:
        with bounded_http_retries():
            yield _experiment_id(MlflowClient(tracking_uri=uri), settings.experiment_name, uri)
    except MlflowException as err:
        raise mlflow_failure(uri, err) from None
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
    The tokens are TRL's count, logged as `num_tokens`. It starts where the Trainer state's count
    stands as training starts: 0 for SFT, whose Trainer keeps no count of its own
    (`NO_DEVICE_READS_BETWEEN_MICRO_BATCHES`), and for GRPO, which keeps TRL's count there, the
    count restored on resume.
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
            now, tokens, step = time.perf_counter(), logs.get("num_tokens"), state.global_step
            last_time, last_tokens, last_step = self._last
            if "loss" in logs and tokens is not None and now > last_time and step > last_step:
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
