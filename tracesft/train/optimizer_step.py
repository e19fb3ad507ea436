"""The recipe's bitsandbytes optimizer, stepping without a device synchronisation per parameter.

bitsandbytes (0.50) ends every parameter's update in `Optimizer8bit.step` with
`torch.cuda.synchronize()`, and once more after the last. QLoRA trains 896 small tensors on the
32B (LoRA's A and B of 7 projections in 64 layers), so each optimizer step waits on the device 897
times, and between two updates the GPU idles while the host launches the next: 219 ms of idle GPU
time before the optimizer's kernels in three log-normal steps on an H200, ~1.9% of the step
(`benchmarks/train_throughput.py --gpu-idle`). The updates need none of these waits: gradients,
states, page prefetches and update kernels are all ordered on one stream, and the host reads
nothing in between. An open bitsandbytes change (pull request 2050) drops them for non-paged state;
no release has it.

So the class the Trainer would build (`Trainer.get_optimizer_cls_and_kwargs`, from `optim`) is
used with one change: the per-parameter synchronisations are skipped and one is made after the
last update, as bitsandbytes makes for paged state. The update arithmetic is bitsandbytes' own, so
the parameters and states are the same to the bit. Optimizers not from bitsandbytes are left as
the Trainer makes them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def use_one_synchronisation_per_step(trainer: Any) -> None:
    """Have `trainer` (SFT or GRPO) build the optimizer its `optim` names with one synchronisation a step, if
    that optimizer is from bitsandbytes. The Trainer builds it when training starts, from its own
    `optimizer_cls_and_kwargs`, set here since TRL's GRPOTrainer takes no such argument."""
    cls_and_kwargs = optimizer_cls_and_kwargs(trainer.args)
    if cls_and_kwargs is not None:
        trainer.optimizer_cls_and_kwargs = cls_and_kwargs


def optimizer_cls_and_kwargs(args: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """The optimizer class training arguments `args` name and its arguments, synchronising once a step,
    if it is from bitsandbytes; None otherwise."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if not optimizer_cls.__module__.startswith("bitsandbytes."):
        return None
    return one_synchronisation_per_step(optimizer_cls), kwargs


@functools.cache
def one_synchronisation_per_step(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of bitsandbytes' `optimizer_cls` whose step synchronises the device once, after the last update."""

    def step(self: Any, closure: Any = None) -> Any:
        import bitsandbytes.optim.optimizer as bnb_optimizer

        per_parameter = bnb_optimizer.sync_gpu
        bnb_optimizer.sync_gpu = _no_synchronisation
        try:
            loss = _unhooked(optimizer_cls.step)(self, closure)
        finally:
            bnb_optimizer.sync_gpu = per_parameter
        devices = {p.device for group in self.param_groups for p in group["params"] if p.device.type == "cuda"}
        for device in devices:
            torch.cuda.synchronize(device)
        return loss

    return type(optimizer_cls.__name__, (optimizer_cls,), {"step": step, "__module__": __name__,
                                                            "__doc__": one_synchronisation_per_step.__doc__})


def _no_synchronisation(tensor: torch.Tensor) -> None:
    """In place of bitsandbytes' `sync_gpu` during a step: the device is synchronised once, after it."""


def _unhooked(step: Any) -> Any:
    """`step` without the hooks torch wraps around a class's step when its first instance is made: they
    already ran around this class's own step."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step
