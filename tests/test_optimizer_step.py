"""The recipe's bitsandbytes optimizer without a device synchronisation per parameter (`tracesft.train.optimizer_step`).

bitsandbytes runs its optimizers on the CPU too (where a paged one falls back to plain state), so the
arithmetic is compared here: the same parameters and states as bitsandbytes' own class, to the bit.
"""

import warnings

import pytest
import torch

bitsandbytes = pytest.importorskip("bitsandbytes")

from transformers import TrainingArguments  # noqa: E402

from tracesft.train.optimizer_step import (  # noqa: E402
    one_synchronisation_per_step,
    optimizer_cls_and_kwargs,
    use_one_synchronisation_per_step,
)


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(16, 5120), (1024, 16), (16, 64)]  # 8-bit state for the first two, 32-bit (too small) for the last
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def _trained(optimizer_cls: type, steps: int = 3) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    parameters = _parameters(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        optimizer = optimizer_cls(parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, optim_bits=8, is_paged=True)
        for step in range(steps):
            gradients = _parameters(step + 1)
            for parameter, gradient in zip(parameters, gradients, strict=True):
                parameter.grad = gradient.detach()
            optimizer.step()
    return [p.detach().clone() for p in parameters], optimizer


def test_steps_are_bitsandbytes_own_to_the_bit_without_a_synchronisation_per_parameter(monkeypatch):
    import bitsandbytes.optim.optimizer as bnb_optimizer

    calls = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda tensor: calls.append(tensor))
    theirs, their_optimizer = _trained(bitsandbytes.optim.AdamW)
    assert len(calls) == 3 * (3 + 1)  # after each parameter, then after the last: every step
    calls.clear()
    ours, our_optimizer = _trained(one_synchronisation_per_step(bitsandbytes.optim.AdamW))
    assert calls == []
    assert bnb_optimizer.sync_gpu is not None and bnb_optimizer.sync_gpu.__name__ == "<lambda>"  # put back after each step
    for got, want in zip(ours, theirs, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(our_optimizer.state.values(), their_optimizer.state.values(), strict=True):
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_step_hooks_run_once_though_bitsandbytes_class_was_hooked_first():
    optimizer_cls = one_synchronisation_per_step(bitsandbytes.optim.AdamW)
    _trained(bitsandbytes.optim.AdamW, steps=1)  # torch hooks bitsandbytes' AdamW.step at its first instance
    parameters = _parameters(0)
    optimizer = optimizer_cls(parameters, lr=1e-3, optim_bits=8)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert calls == ["pre", "post"]


def test_the_trainer_gets_the_class_its_optim_names_and_torch_optimizers_are_left_alone(tmp_path):
    paged = optimizer_cls_and_kwargs(TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_8bit", use_cpu=True))
    optimizer_cls, kwargs = paged
    assert issubclass(optimizer_cls, bitsandbytes.optim.AdamW) and optimizer_cls is not bitsandbytes.optim.AdamW
    assert kwargs["optim_bits"] == 8 and kwargs["is_paged"]
    assert optimizer_cls_and_kwargs(TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", use_cpu=True)) is None


def test_a_trainer_builds_the_one_synchronisation_class_when_training_starts(tmp_path):
    from transformers import Trainer

    model = torch.nn.Linear(4, 4)
    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_8bit", use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    use_one_synchronisation_per_step(trainer)
    assert type(trainer.create_optimizer()) is one_synchronisation_per_step(bitsandbytes.optim.AdamW)
