"""Where an adapter came from, as short strings fit for registry tags.

The pipeline's own inputs (base model, traces hash, eval-set hash) travel as step inputs; these
helpers add what only the surroundings know: the code version, a fingerprint of the whole run
configuration and a link to the ZenML run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
UNKNOWN = "unknown"
LOCAL_STORE = "local store"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The commit the code runs from, with `-dirty` if tracked files differ from it.

    "unknown" where there is no git checkout (an installed package, a Docker image without .git):
    the tag then says plainly that the code version cannot be traced, instead of guessing.
    """
    try:
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN
    return f"{commit}-dirty" if dirty else commit


def config_hash(parameters: Mapping[str, Any]) -> str:
    """SHA-256 of a run configuration's parameters, independent of key order."""
    canonical = json.dumps(parameters, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def zenml_run_url(run: Any) -> str:
    """The ZenML dashboard page of a pipeline run, or "local store" when there is no server.

    Only a ZenML server (or ZenML Pro) serves a dashboard with stable URLs; a local store has
    none, and `zenml login --local` starts a server whose address changes with each start.
    """
    from zenml.utils.dashboard_utils import get_run_url

    return get_run_url(run) or LOCAL_STORE


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
