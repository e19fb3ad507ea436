"""Refusing a run whose configured device this machine does not have.

The run configuration's `device` decides how the recipe computes (see `tracesft.config.Device`),
so asking for CUDA where none is visible is a configuration or scheduling mistake: a GPU pod
that came up without its GPU would otherwise load a 32B base in fp32 and train it for days.
Every entry point calls `require_device` before it loads a model or data.
"""

from __future__ import annotations

import os

from tracesft.config import Device
from tracesft.errors import TracesftError


def require_device(device: Device, config: str = "the run configuration") -> None:
    """Raise a one-line `TracesftError` naming `config` when `device` is cuda and no GPU is visible."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise TracesftError(
            f"device is cuda but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set `device: cpu` in {config} "
            "to run on the CPU (slow, unquantised)."
        )
