"""Small-tensor int8 add (numpy table lookup) vs the integer reference: bit-identical, layout kept."""

import pytest
import torch

from quanta.kernels import eltwise, reference

pytestmark = pytest.mark.isa  # run natively and under scripts/as-avx2 (.ci/run)


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("shape", [(1, 16, 14, 14), (1, 512, 7, 7), (3, 128, 40)])
def test_small_add_matches_reference(shape, activation):
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[1])
    a = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if len(shape) == 4:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    args = (a, 0.05, 120, b, 0.07, 130, 0.09, 100, activation)
    fast, ref = eltwise.add_uint8(*args), reference.add(*args)
    assert fast.dtype == torch.uint8 and torch.equal(fast, ref)
    assert fast.stride() == a.stride()  # layout kept for the next channels_last conv
    mixed = eltwise.add_uint8(a, 0.05, 120, b.contiguous(), 0.07, 130, 0.09, 100, activation)
    assert torch.equal(mixed, ref)  # mixed layouts: same values
