"""GPU check: the paged 8-bit AdamW stepping with one device synchronisation (`tracesft.train.optimizer_step`).

Skipped without CUDA. On LoRA-shaped parameters, some large enough for paged (managed) state: the
same parameters and states as bitsandbytes' own class after three steps, to the bit, and one
`torch.cuda.synchronize` a step instead of one per parameter and one more.
"""

import pytest
import torch

from tracesft.train.optimizer_step import one_synchronisation_per_step

bitsandbytes = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]

SHAPES = [(16, 5120), (27648, 16), (16, 27648), (5120, 16), (16, 64)]  # paged state from 100,000 elements


def _trained(optimizer_cls, synchronisations):
    generator = torch.Generator(device="cuda").manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator))
                  for shape in SHAPES]
    optimizer = optimizer_cls(parameters, lr=1e-3, optim_bits=8, is_paged=True)
    for _ in range(3):
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, device="cuda", dtype=torch.bfloat16, generator=generator)
        before = len(synchronisations)
        optimizer.step()
        yield len(synchronisations) - before
    torch.cuda.synchronize()
    yield [p.detach().clone() for p in parameters], optimizer


def test_paged_8bit_adamw_is_bitsandbytes_own_with_one_synchronisation_a_step(monkeypatch):
    synchronisations = []
    synchronize = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: (synchronisations.append(args), synchronize(*args)))
    *theirs_per_step, (theirs, their_optimizer) = _trained(bitsandbytes.optim.AdamW, synchronisations)
    *ours_per_step, (ours, our_optimizer) = _trained(one_synchronisation_per_step(bitsandbytes.optim.AdamW),
                                                     synchronisations)
    assert theirs_per_step == [len(SHAPES) + 1] * 3 and ours_per_step == [1] * 3
    for got, want in zip(ours, theirs, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(our_optimizer.state.values(), their_optimizer.state.values(), strict=True):
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
