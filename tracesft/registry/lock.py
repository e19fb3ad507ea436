"""A mutual-exclusion lock over the MLflow model registry, for any number of processes or hosts.

MLflow has no transactions or compare-and-set, but creating a registered model is atomic: the
store's unique constraint on the name lets exactly one of several concurrent creators succeed
(`RESOURCE_ALREADY_EXISTS` for the rest), whatever the backend (sqlite, PostgreSQL) and whether
the client talks to the store directly or through `mlflow server`. So the lock is a registered
model named `<model>--tracesft-lock` that exists while someone holds it. Promotions, rollbacks
and registrations take it, so moving `champion` and appending to its history happen as one step.

A holder that dies leaves the lock behind; after `stale_after_s` (by the server's clock, which
also stamps the lock) the next taker breaks it, so a crash never blocks the registry for good.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tracesft.errors import TracesftError

LOCK_SUFFIX = "--tracesft-lock"


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


@contextmanager
def registry_lock(client: Any, model_name: str, wait_s: float = 60.0, stale_after_s: float = 300.0) -> Iterator[None]:
    """Hold the registry lock of `model_name` for the duration of the block."""
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    holder = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                name, tags={"holder": holder}, description=f"tracesft: a promotion of {model_name} is in progress."
            )
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _break_if_stale(client, name, stale_after_s)
        if time.monotonic() > deadline:
            raise TracesftError(
                f"The MLflow registry lock {name!r} has been held for over {wait_s:.0f} s by another promotion or "
                f"registration. Wait and retry; if no tracesft command is running, delete the registered model {name!r} "
                "(MLflow UI, or `MlflowClient().delete_registered_model`)."
            )
        time.sleep(random.uniform(0.05, 0.25))
    try:
        yield
    except BaseException:
        try:  # the failure may be the server itself; then the lock goes stale and is broken later
            client.delete_registered_model(name)
        except Exception:
            pass
        raise
    client.delete_registered_model(name)


def _break_if_stale(client: Any, name: str, stale_after_s: float) -> None:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
        if time.time() * 1000 - lock.creation_timestamp > stale_after_s * 1000:
            client.delete_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # released meanwhile: just try again
            raise
