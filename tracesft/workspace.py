"""Where a run's state lives, found the same way by every command from any working directory.

A workspace is one folder: relative paths of a run configuration (traces, eval set, a local base
model, the sqlite registry, caches) are read against it, and the embedded default keeps its state
under its `.tracesft/` (tiny model, sample traces, eval CSV, MLflow database, ZenML store).
It is `TRACESFT_WORKSPACE` if set; else the checkout tracesft runs from (`pip install -e .`, as
`make setup` installs it), so `tracesft adapters list` from another folder reads the registry
`make demo` wrote instead of creating an empty one there; else (an installed package, the GPU
image) the working directory. Paths given on the command line (`--config`, `--traces`, export
folders) stay relative to the working directory, as in any shell command.

The demo's files are made locally and reproducibly (no hub, nothing outside the workspace): the
tiny model is built from the bundled problems, the sample traces and eval set are copied from the
package. Existing files are left alone, so a user can edit or add trace files and watch the
pipeline rerun.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

WORKSPACE_VARIABLE = "TRACESFT_WORKSPACE"
_CHECKOUT = Path(__file__).resolve().parent.parent


def workspace_root() -> Path:
    """The folder relative paths of a run configuration are read against (see the module docstring)."""
    configured = os.environ.get(WORKSPACE_VARIABLE)
    if configured:
        return Path(configured).expanduser().resolve()
    if (_CHECKOUT / "pyproject.toml").is_file():
        return _CHECKOUT
    return Path.cwd()


def state_dir() -> Path:
    """The workspace's `.tracesft/`: the embedded default's files, registry and ZenML store."""
    return workspace_root() / ".tracesft"


def workspace_path(path: str) -> str:
    """`path` made absolute against the workspace; an absolute path or a URI is returned as is."""
    if "://" in path:
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else workspace_root() / expanded)


def model_source(name_or_path: str) -> str:
    """A base model as every later reader can load it: a local folder absolute, a hub id unchanged.

    A relative name starting with "." (`.tracesft/tiny-model`, `./models/base`; no hub id may)
    is a folder, and so is one the workspace holds; anything else is a hub id
    (`deepseek-ai/DeepSeek-R1-Distill-Qwen-32B`), which reads the same anywhere. The registry's
    lineage tags and the adapter's own record keep this form, so a registered adapter loads from
    any working directory.
    """
    if "://" in name_or_path or Path(name_or_path).expanduser().is_absolute():
        return name_or_path
    local = workspace_root() / name_or_path
    return str(local) if name_or_path.startswith(".") or local.is_dir() else name_or_path


# Field types of the run configuration and the pipeline's parameters: the value is resolved as it
# is validated, so a step receives the same absolute path whichever command started the run.
WorkspacePath = Annotated[str, AfterValidator(workspace_path)]
ModelSource = Annotated[str, AfterValidator(model_source)]


def use_workspace_zenml_store() -> None:
    """Keep the embedded default's ZenML store in the workspace, beside its MLflow database.

    The demo's runs and step cache then live and die with the registry they registered into
    (`make clean` removes both), and never reach the user's own ZenML store or server. A
    configuration given with `--config` uses the active ZenML store instead, exactly the one
    `zenml pipeline run -c FILE` uses. `ZENML_CONFIG_PATH`, when set, wins in both cases. ZenML
    reads the variable as it is imported, so this runs before anything imports ZenML.
    """
    os.environ.setdefault("ZENML_CONFIG_PATH", str(state_dir() / "zenml"))


def prepare_demo_workspace(state: Path | None = None) -> None:
    """Lay out the embedded default's files under `state` (the workspace's `.tracesft/`)."""
    from tracesft.data.sample_data import DATA, EVAL_CSV, TRACE_FILES, tokenizer_corpus
    from tracesft.train.tiny_model import build_tiny_model

    state = state or state_dir()
    model_dir = state / "tiny-model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, tokenizer_corpus())
    traces_dir = state / "traces"
    if not traces_dir.exists():
        traces_dir.mkdir(parents=True)
        for name in TRACE_FILES:
            (traces_dir / name).write_bytes((DATA / "sample_traces" / name).read_bytes())
    eval_csv = state / "eval" / EVAL_CSV
    if not eval_csv.exists():
        eval_csv.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(DATA / EVAL_CSV), eval_csv)
