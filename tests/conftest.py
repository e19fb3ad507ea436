"""Test isolation: no test touches the user's own ZenML store, MLflow registry or workspace.

ZenML reads its config path when first imported, so it is pointed at a throwaway directory here,
before any test module imports it. The workspace (where relative paths of a configuration and the
embedded default's `.tracesft/` resolve) is a throwaway directory too, not the checkout.
"""

import os
import tempfile
from pathlib import Path

_ZENML_HOME = Path(tempfile.mkdtemp(prefix="tracesft-tests-zenml-"))
os.environ["ZENML_CONFIG_PATH"] = str(_ZENML_HOME)
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["TRACESFT_WORKSPACE"] = tempfile.mkdtemp(prefix="tracesft-tests-workspace-")
os.environ.pop("MLFLOW_TRACKING_URI", None)
