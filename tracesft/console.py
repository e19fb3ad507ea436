"""What a pipeline run started by `tracesft demo|run|retrain` shows a person, and where.

Two streams, two readers: stdout carries only the result (the run summary, or with `--json` one
JSON document a script can parse), stderr carries everything said along the way, ZenML's and
the libraries' logs and progress bars included. The split is made at the file-descriptor level,
because ZenML's console handler writes to the original stdout behind `sys.stdout`'s back and
training prints its metrics through tqdm onto stdout.

A step that fails is one message, not ZenML's traceback of its own launcher: the local
orchestrator logs every step failure with `logger.exception` before re-raising it, so a refused
input (`TracesftError`) would scroll off under ~40 lines of frames from ZenML's internals. The
filter below drops that traceback (and the launcher's repeat of the message) from the console,
remembers which step failed, and leaves the message to the command line. Any other exception is
a bug or an outage: its traceback goes to a log file the message names. `--debug` keeps ZenML's
console output untouched.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tracesft.errors import TracesftError

# ZenML's two log lines for a failed step (zenml.orchestrators.local.local_orchestrator and
# zenml.orchestrators.step_launcher); their first argument is the step's name.
_STEP_FAILED = "Step %s failed."
_FAILED_TO_RUN = "Failed to run step `%s`: %s"


@dataclass
class StepFailure:
    """The step a run stopped at, as ZenML reported it."""

    step: str | None = None


class _StepFailureFilter(logging.Filter):
    def __init__(self, failure: StepFailure) -> None:
        super().__init__()
        self.failure = failure

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _STEP_FAILED and record.args:
            self.failure.step = str(record.args[0])
            return False
        return not (record.msg == _FAILED_TO_RUN and record.args)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever the block writes to stdout, from Python or below it, to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def quiet_step_failures(debug: bool) -> Iterator[StepFailure]:
    """Keep ZenML's step-failure tracebacks off the console (unless `debug`); yield which step failed."""
    failure = StepFailure()
    if debug:
        yield failure
        return
    from zenml.logger import ZenMLConsoleHandler

    step_filter = _StepFailureFilter(failure)
    # The console only: ZenML's own log store keeps the traceback with the step's logs.
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, ZenMLConsoleHandler)]
    for handler in handlers:
        handler.addFilter(step_filter)
    try:
        yield failure
    finally:
        for handler in handlers:
            handler.removeFilter(step_filter)


def failure_message(error: BaseException, step: str | None, log_file: Path) -> str:
    """One message for a failed run: the step, then what went wrong; a bug's traceback goes to `log_file`."""
    where = f"step {step}: " if step else ""
    if isinstance(error, TracesftError):
        lines = str(error).splitlines()
        # A refusal with several reasons (the quality gate's failed checks) lists one per line.
        return f"{where}{lines[0]}" if len(lines) == 1 else f"{where.rstrip(': ')} refused:\n" + "\n".join(f"  {line}" for line in lines)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"{where}{type(error).__name__}{': ' + detail if detail else ''}; the full traceback is in {log_file} "
        "(or run again with --debug)."
    )
