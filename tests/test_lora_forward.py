"""LoRA's training forward (`tracesft.train.lora_forward`) computes PEFT's function, bit for bit where
the scaling is a power of two, and leaves every case it does not take over to PEFT."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tracesft.train.lora_forward import use_training_forward


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = torch.nn.Linear(24, 40)
        self.down_proj = torch.nn.Linear(40, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.up_proj(x)))


def lora_block(alpha: int, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=alpha, lora_dropout=0.05,
                                               target_modules=["up_proj", "down_proj"], **config))
    with torch.no_grad():  # B starts at zero, which would hide the adapter's branch
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    return model.train()


def output_and_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """The output of a fixed input and every trainable gradient, dropout drawn from a fixed seed."""
    model.zero_grad()
    torch.manual_seed(1)
    x = torch.randn(3, 7, 24, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]


def test_same_bits_as_peft_for_a_power_of_two_scaling():
    model = lora_block(alpha=8)  # scaling 8 / 4 = 2, as the recipe's 32 / 16
    expected = output_and_gradients(model)
    assert use_training_forward(model) == 2
    assert same(output_and_gradients(model), expected)


def test_same_function_for_any_scaling():
    model = lora_block(alpha=6)  # scaling 1.5: folding it into B rounds differently, nothing more
    expected = output_and_gradients(model)
    use_training_forward(model)
    for got, want in zip(output_and_gradients(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def same(got: list, want: list) -> bool:
    return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want, strict=True))


class ShardedLinear(torch.nn.Linear):
    """A linear whose weight is whole only while it runs, as FSDP's units (class swapped in place, as fully_shard does)."""


@pytest.mark.parametrize("case", ["disabled", "merged", "dora", "wrapped B"])
def test_other_cases_are_peft_own_forward(case):
    model = lora_block(alpha=6, use_dora=case == "dora")  # scaling 1.5: the training forward would change bits
    if case == "merged":
        model.merge_adapter()
    if case == "wrapped B":
        for name, module in model.named_modules():
            if name.endswith("lora_B.default"):
                module.__class__ = ShardedLinear

    def run() -> list[torch.Tensor]:
        if case == "disabled":
            with model.disable_adapter():
                return output_and_gradients(model)
        return output_and_gradients(model)

    peft = run()
    use_training_forward(model)
    assert same(run(), peft)


class FrozenProduct(torch.autograd.Function):
    """A frozen weight's product that saves nothing through autograd, as bitsandbytes' 4-bit one."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight, None


class CountedLinear(torch.nn.Linear):
    def forward(self, x):
        self.calls += 1
        return FrozenProduct.apply(x, self.weight)


@pytest.mark.parametrize("training_forward", [False, True])
def test_checkpoint_recompute_stops_before_the_last_base_product(training_forward):
    block = Block()
    block.up_proj, block.down_proj = CountedLinear(24, 40, bias=False), CountedLinear(40, 24, bias=False)
    model = get_peft_model(block, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                             target_modules=["up_proj", "down_proj"]))
    if training_forward:
        use_training_forward(model)
    bases = {name: model.base_model.model.get_submodule(name).base_layer for name in ("up_proj", "down_proj")}
    for base in bases.values():
        base.calls = 0
    x = torch.randn(2, 5, 24, requires_grad=True)
    torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).sum().backward()
    # up_proj's output is saved (SiLU's input) and must be recomputed; down_proj's is not needed.
    assert bases["up_proj"].calls == 2
    assert bases["down_proj"].calls == (1 if training_forward else 2)
