"""The one-pass oneDNN int8 add against reference.add: within one output quantum everywhere,
and inputs left untouched (oneDNN's sum post-op writes into its accumulator)."""

import pytest
import torch

from quanta.kernels import cpu, reference
from quanta.kernels.eltwise import add_float_expr, add_uint8

SHAPES = [((2, 64, 9, 9), True), ((2, 64, 9, 9), False), ((3, 17, 384), False), ((7,), False),
          ((1, 3, 5, 5), True)]
QPARAMS = [(0.0213, 117, 0.0377, 9, 0.0419, 131), (0.1, 0, 0.1, 0, 0.05, 0), (0.004, 255, 0.5, 0, 0.3, 40)]


@pytest.mark.skipif(not cpu.onednn_available(), reason="oneDNN int8 kernels unavailable")
@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("qp", QPARAMS)
def test_add_within_one_quantum(shape, channels_last, activation, qp):
    g = torch.Generator().manual_seed(len(shape))
    a = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    b_before = b.clone()
    ref = reference.add(a, qp[0], qp[1], b, qp[2], qp[3], qp[4], qp[5], activation)
    for fn in (add_uint8, add_float_expr):
        out = fn(a, qp[0], qp[1], b, qp[2], qp[3], qp[4], qp[5], activation)
        assert out.shape == ref.shape and out.dtype == torch.uint8
        diff = (out.int() - ref.int()).abs()
        assert int(diff.max()) <= 1
        assert float((diff > 0).float().mean()) <= 0.05  # only float-rounding ties flip
    assert torch.equal(b, b_before)
