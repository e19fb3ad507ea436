"""Optional reporting beside MLflow: WandB, for people used to watching their runs there.

MLflow stays the record (the registry's lineage points at its runs); WandB is an extra view. It is
off by default (`training.report_to: []`) and never required: asked for but unusable (package not
installed, no credentials, no network), it warns once, saying why, and training goes on with
MLflow alone. `WANDB_MODE=offline` writes the run to disk for a later `wandb sync`, as on compute
nodes without internet access.
"""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any
from urllib.parse import urlparse

from tracesft.config import TrainingRecipe

logger = logging.getLogger(__name__)

_INIT_TIMEOUT_S = 60


def reporting_callbacks(recipe: TrainingRecipe) -> list[Any]:
    """The `TrainerCallback`s for the reporters `recipe.report_to` asks for (none by default)."""
    if "wandb" not in recipe.report_to:
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        _warn("the wandb package is not installed (pip install 'tracesft[wandb]')")
        return []
    if not _wandb_credentials_present():
        _warn("no WandB credentials (set WANDB_API_KEY, run `wandb login`, or set WANDB_MODE=offline)")
        return []
    return [_wandb_reporter(recipe)]


def _warn(reason: str) -> None:
    logger.warning("WandB reporting is off for this run: %s. Training goes on; MLflow has the metrics.", reason)


def _wandb_credentials_present() -> bool:
    """What `wandb login` or the environment would give wandb.init, checked without it: an online
    init with no credentials would otherwise stop at an interactive login prompt."""
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}:
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_reporter(recipe: TrainingRecipe) -> Any:
    """Transformers' `WandbCallback`, but starting its own run (project and name from the recipe)
    and giving up with one warning, instead of failing training, when WandB cannot be reached."""
    from transformers.integrations import WandbCallback

    class WandbReporter(WandbCallback):
        def setup(self, args, state, model, **kwargs):
            if state.is_world_process_zero and self._wandb.run is None:
                try:
                    self._wandb.init(
                        project=recipe.wandb_project,
                        name=recipe.wandb_run_name,
                        config=recipe.model_dump(),
                        settings=self._wandb.Settings(init_timeout=_INIT_TIMEOUT_S),
                    )
                except Exception as err:  # network, auth, service: none may stop training
                    _warn(f"could not start a WandB run ({err})")
                    self._wandb = None
                    return
            super().setup(args, state, model, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            super().on_train_end(args, state, control, **kwargs)
            if self._wandb is not None and state.is_world_process_zero:
                self._wandb.finish()
                self._wandb = None  # the run is closed: later evaluation logs stay in MLflow only

    return WandbReporter()
