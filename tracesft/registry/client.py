"""The one way tracesft talks to the MLflow registry: bounded retries that never repeat a create.

MLflow's HTTP client retries failed requests by itself, POSTs included. When a create reached the
server but its response was lost (a proxy answering 504 after the server committed), MLflow sends
it again and the registry gains a duplicate version per retry. So while a registry call runs,
MLflow's own retries are off (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`: MLflow reads it from the
environment on every request, and from nowhere else) and `RegistryClient` retries instead, with
the bound the user set in that same variable (3 if unset):

- reads and writes that land the same however often they are sent (tags, aliases, deletes, an
  upload) are simply sent again after a transient failure;
- a model-version create is never sent again blind: after a failure that may have hidden a
  success, the caller's lookup (by content hash, by lock-ticket token) asks the registry whether
  it landed, and only if not is it sent again (`create_once`).

When the retries are spent the caller gets one `TracesftError` naming the registry and the
variables that tune the patience.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tracesft.config import RegistrySettings
from tracesft.errors import TracesftError
from tracesft.train.tracking import BOUNDED_RETRIES, resolve_tracking_uri

T = TypeVar("T")
RETRIES_VARIABLE = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_VARIABLE = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
TIMEOUT_VARIABLE = "MLFLOW_HTTP_REQUEST_TIMEOUT"
DEFAULT_RETRIES, DEFAULT_BACKOFF_S, DEFAULT_TIMEOUT_S = (  # the bounds every MLflow block of tracesft uses
    int(BOUNDED_RETRIES[name]) for name in (RETRIES_VARIABLE, BACKOFF_VARIABLE, TIMEOUT_VARIABLE)
)
# Error codes of failures that may pass: the server or a proxy in trouble, or a busy database.
_TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})
# Creates that may not be resent blind (see `create_once`).
_CREATE_ONCE_ONLY = frozenset({"create_model_version"})

_environment_guard = threading.Lock()
_calls_running = 0  # registry blocks open now, in any thread
_SET_HERE = (RETRIES_VARIABLE, TIMEOUT_VARIABLE)
_saved_environment: dict[str, str | None] = {}  # the user's values of _SET_HERE while blocks run


def is_transient(err: BaseException) -> bool:
    """A failure worth sending again: no answer at all, or a 5xx/429 from the server or a proxy."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    if isinstance(err, RequestException):  # artifact uploads raise these directly
        response = getattr(err, "response", None)
        return response is None or response.status_code >= 500 or response.status_code == 429
    if isinstance(err, MlflowException):
        return str(err.message).startswith("API request to") or err.error_code in _TRANSIENT_CODES
    return False


class RegistryClient:
    """An `MlflowClient` whose every call has bounded retries (see the module docstring)."""

    def __init__(self, uri: str, retries: int, backoff_s: float) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.raw = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.retries = retries
        self.backoff_s = backoff_s

    def __getattr__(self, name: str) -> Any:
        if name in _CREATE_ONCE_ONLY:
            raise AttributeError(f"{name} may not be resent blindly; use RegistryClient.create_once")
        attribute = getattr(self.raw, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self.call(attribute, *args, **kwargs)

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)`, sent again after each transient failure, `retries` times at most."""
        for attempt in range(self.retries + 1):
            try:
                return function(*args, **kwargs)
            except Exception as err:
                if attempt == self.retries or not is_transient(err):
                    raise
                self.pause(attempt)
        raise AssertionError("unreachable")

    def create_once(self, create: Callable[[], T], find: Callable[[], T | None]) -> T:
        """`create()`, and after a transient failure `find()` before creating again: a create whose
        response was lost is found, not repeated."""
        for attempt in range(self.retries + 1):
            try:
                return create()
            except Exception as err:
                if attempt == self.retries or not is_transient(err):
                    raise
                self.pause(attempt)
                found = self.call(find)
                if found is not None:
                    return found
        raise AssertionError("unreachable")

    def pause(self, attempt: int) -> None:
        time.sleep(min(self.backoff_s * 2**attempt, 30.0) * random.uniform(0.5, 1.0))


@contextmanager
def registry_client(settings: RegistrySettings) -> Iterator[RegistryClient]:
    """A `RegistryClient` on the configured registry for the block; MLflow failures become one clear error."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    uri = resolve_tracking_uri(settings)
    with _mlflow_retries_off() as (retries, backoff_s):
        try:
            yield RegistryClient(uri, retries, backoff_s)
        except (MlflowException, RequestException) as err:
            unreachable = is_transient(err)
            hint = (
                f" after {retries} retries; check that the MLflow server at {uri} is running and reachable "
                f"({RETRIES_VARIABLE} and {TIMEOUT_VARIABLE} tune the patience)"
                if unreachable
                else ""
            )
            message = err.message if isinstance(err, MlflowException) else str(err)
            raise TracesftError(f"MLflow at {uri} failed{hint}: {message}") from None


@contextmanager
def _mlflow_retries_off() -> Iterator[tuple[int, float]]:
    """MLflow's own retries off, and its request timeout bounded, while any registry block runs;
    yields the retries and backoff the user asked for, which `RegistryClient` applies instead.

    Blocks may overlap (threads promoting at once): the first one in saves and sets the
    variables, the last one out puts the user's values back.
    """
    global _calls_running
    with _environment_guard:
        users = dict(_saved_environment) if _calls_running else {name: os.environ.get(name) for name in _SET_HERE}
        retries = _number(RETRIES_VARIABLE, users[RETRIES_VARIABLE], DEFAULT_RETRIES, int)
        backoff_s = _number(BACKOFF_VARIABLE, os.environ.get(BACKOFF_VARIABLE), DEFAULT_BACKOFF_S, int)
        if _calls_running == 0:
            _saved_environment.clear()
            _saved_environment.update(users)
            os.environ[RETRIES_VARIABLE] = "0"
            os.environ.setdefault(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
        _calls_running += 1
    try:
        yield retries, backoff_s
    finally:
        with _environment_guard:
            _calls_running -= 1
            if _calls_running == 0:
                for name, value in _saved_environment.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def request_timeout_s() -> int:
    """The HTTP timeout MLflow applies to one request now (inside a registry block: the bounded one)."""
    return _number(TIMEOUT_VARIABLE, os.environ.get(TIMEOUT_VARIABLE), DEFAULT_TIMEOUT_S, int)


def _number(variable: str, text: str | None, default: T, kind: Callable[[str], T]) -> T:
    try:
        return default if text is None or not text.strip() else kind(text)
    except ValueError:
        raise TracesftError(f"environment variable {variable} is {text!r}, not a number; set a number or unset it") from None
