"""A step's scratch directory, removed when the step ends, whether it succeeded or failed.

ZenML stores a step's outputs after the step function returns, so a `TemporaryDirectory` around
the body would delete an output (the trained adapter) before it is saved. ZenML removes its own
materializers' temporary folders at the right moment, after the outputs are stored and also when
the step fails, through the step context's cleanup registry (what `BaseMaterializer.
get_temporary_directory` uses; zenml 0.98 has no public call for a step's own folder). Only a
killed process leaves its scratch behind.
"""

import shutil
import tempfile
from functools import partial
from pathlib import Path

from zenml import get_step_context


def scratch_directory(prefix: str) -> Path:
    """A new folder in the system temp directory that lives exactly as long as the running step."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    get_step_context()._cleanup_registry.register_callback(partial(shutil.rmtree, directory, ignore_errors=True))
    return directory
