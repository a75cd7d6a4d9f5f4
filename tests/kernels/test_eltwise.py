"""int8 add fast paths against reference.add: the table lookup is bit-identical (any shape,
broadcasting, every activation); the one-pass oneDNN add is within one output quantum and
differs only at float ties (limit in tests/kernels/test_onednn.py's table); inputs untouched
(oneDNN's sum post-op writes into its accumulator)."""

import pytest
import torch

from quanta.kernels import cpu, reference
from quanta.kernels.eltwise import _SMALL_NUMEL, add_lookup, add_uint8

pytestmark = pytest.mark.isa  # run natively and under scripts/as-avx2 (.ci/run)

SHAPES = [((2, 64, 9, 9), True), ((2, 64, 9, 9), False), ((3, 17, 384), False), ((7,), False),
          ((1, 3, 5, 5), True), ((2, 64, 28, 28), True), ((4, 64, 384), False)]
QPARAMS = [(0.0213, 117, 0.0377, 9, 0.0419, 131), (0.1, 0, 0.1, 0, 0.05, 0), (0.004, 255, 0.5, 0, 0.3, 40)]
ONEDNN_ADD_LIMIT = 2e-5  # fraction allowed to differ by 1 LSB (measured 2e-6 to 5e-6; see test_onednn.py)


def _inputs(shape, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    return a, b


@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_fixed_point_add_matches_reference(shape, channels_last):
    """numerics="xnnpack" (XNNPACK's fixed-point add) is bit-identical to its reference at
    every size: the native integer loop for same-layout inputs, never the float32 adds. Extra
    qparams at the ends of XNNPACK's range (shift 31 and 13)."""
    a, b = _inputs(shape, channels_last, len(shape))
    for qp in QPARAMS + [(0.0006, 3, 0.0005, 250, 1.0, 128), (2.0, 0, 0.01, 255, 0.01, 0)]:
        for activation in ("none", "relu", "relu6"):
            ref = reference.add(a, *qp[:2], b, *qp[2:4], *qp[4:], activation, "xnnpack")
            out = add_uint8(a, *qp[:2], b, *qp[2:4], *qp[4:], activation, "xnnpack")
            assert torch.equal(out, ref) and out.stride() == a.stride()


@pytest.mark.skipif(not cpu.onednn_available(), reason="oneDNN int8 kernels unavailable")
@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("qp", QPARAMS)
def test_add_matches_reference(shape, channels_last, activation, qp):
    a, b = _inputs(shape, channels_last, len(shape))
    b_before = b.clone()
    ref = reference.add(a, qp[0], qp[1], b, qp[2], qp[3], qp[4], qp[5], activation)
    assert torch.equal(add_lookup(a, qp[0], qp[1], b, qp[2], qp[3], qp[4], qp[5], activation), ref)
    out = add_uint8(a, qp[0], qp[1], b, qp[2], qp[3], qp[4], qp[5], activation)
    assert out.shape == ref.shape and out.dtype == torch.uint8
    diff = (out.int() - ref.int()).abs()
    onednn = a.numel() > _SMALL_NUMEL and activation != "relu6"
    if not onednn:  # the table lookup
        assert torch.equal(out, ref) and out.stride() == a.stride()
    assert int(diff.max()) <= 1
    assert int((diff > 0).sum()) <= 1 + ONEDNN_ADD_LIMIT * diff.numel()  # a tie or two at most
    assert torch.equal(b, b_before)


def test_lookup_broadcasts_and_covers_every_pair():
    pairs = torch.arange(256, dtype=torch.uint8)
    a, b = pairs[:, None], pairs[None, :]  # 256 x 256 by broadcasting
    for qp in QPARAMS:
        for activation in ("none", "relu", "relu6"):
            ref = reference.add(a, *qp[:2], b, *qp[2:4], *qp[4:], activation)
            assert torch.equal(add_lookup(a, *qp[:2], b, *qp[2:4], *qp[4:], activation), ref)
            assert torch.equal(add_uint8(a.expand(256, 256), *qp[:2], b.expand(256, 256), *qp[2:4], *qp[4:],
                                         activation), ref)


@pytest.mark.skipif(not cpu.onednn_available(), reason="oneDNN int8 kernels unavailable")
def test_onednn_add_differs_only_at_rare_ties():
    """~3M outputs (random qparams) through oneDNN: at most ONEDNN_ADD_LIMIT off by one LSB."""
    total = differ = 0
    g = torch.Generator().manual_seed(11)
    for seed in range(8):
        s = (torch.rand(3, generator=g) * 0.2 + 0.003).tolist()
        z = torch.randint(0, 256, (3,), generator=g).tolist()
        qp = (s[0], z[0], s[1], z[1], s[2], z[2])
        a, b = _inputs((4, 128, 28, 28), True, seed)
        args = (a, *qp[:2], b, *qp[2:], "relu" if seed % 2 else "none")
        ref, out = reference.add(*args), add_uint8(*args)
        diff = (out.int() - ref.int()).abs()
        assert int(diff.max()) <= 1
        total, differ = total + diff.numel(), differ + int((diff > 0).sum())
    assert differ <= ONEDNN_ADD_LIMIT * total, (differ, total)
