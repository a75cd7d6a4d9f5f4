"""int8 activation x activation matmul (attention's Q.K^T and P.V): the reference is integer-exact,
and the fast kernel (codes summed in float32 sgemm) equals it bit for bit."""

import pytest
import torch

from quanta.kernels import matmul, reference


def _codes(*shape, g, lo=0, hi=256):
    return torch.randint(lo, hi, shape, dtype=torch.uint8, generator=g)


def _int64_matmul(a, za, b, zb):
    """Sum of products one k at a time in int64: the definition, with no float anywhere."""
    a, b = a.long() - za, b.long() - zb
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


@pytest.mark.parametrize("k", [1, 32, 258, 259, 700])
def test_reference_accumulator_is_exact(k):
    g = torch.Generator().manual_seed(k)
    a, b = _codes(3, 5, k, g=g), _codes(3, k, 4, g=g)
    acc = reference.matmul_accumulate(a, 255, b, 0)  # the widest products: |255 - 0| * 255
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), _int64_matmul(a, 255, b, 0))


@pytest.mark.parametrize("k", [1, 32, 258, 259, 700])
def test_fast_accumulator_equals_reference(k):
    """Up to EXACT_K the float32 sums are exact; beyond it the chunks are added in int32."""
    g = torch.Generator().manual_seed(100 + k)
    for za, zb in ((0, 255), (255, 0), (128, 3)):
        a, b = _codes(2, 3, 6, k, g=g), _codes(2, 3, k, 5, g=g)
        fast = matmul.matmul_accumulate(a, za, b, zb)
        assert torch.equal(fast.long(), _int64_matmul(a, za, b, zb))
    assert matmul.EXACT_K * 255 * 255 < 2 ** 24 <= (matmul.EXACT_K + 1) * 255 * 255


@pytest.mark.parametrize("out", [None, (0.37, 100), (2.5, 0)])
def test_fast_matmul_is_bit_identical_to_the_reference(out):
    g = torch.Generator().manual_seed(7)
    q, k = _codes(2, 12, 40, 32, g=g), _codes(2, 12, 40, 32, g=g)
    k_t = k.transpose(-1, -2)  # a transposed view, as attention passes K^T
    out_scale, out_zp = out or (None, 0)
    args = (q, 0.05, 131, k_t, 0.04, 120, out_scale, out_zp)
    fast, ref = matmul.matmul(*args), reference.matmul(*args)
    assert fast.dtype == ref.dtype == (torch.float32 if out is None else torch.uint8)
    assert torch.equal(fast, ref)
    if out is None:  # the float output is acc * f32(s_a * s_b) with an exact accumulator
        acc = _int64_matmul(q, 131, k_t, 120).to(torch.float32)
        # acc times the float32 product of the scales
        assert torch.equal(ref, acc * (torch.tensor(0.05) * torch.tensor(0.04)))


def test_broadcast_batch_and_vector_operands_follow_torch_matmul():
    g = torch.Generator().manual_seed(3)
    p, v = _codes(2, 4, 9, 9, g=g), _codes(1, 4, 9, 16, g=g)  # batch dims broadcast
    args = (p, 1 / 255, 0, v, 0.1, 128)
    assert torch.equal(matmul.matmul(*args), reference.matmul(*args))
    assert matmul.matmul(p, 1 / 255, 0, v, 0.1, 128).shape == (2, 4, 9, 16)
    vec = _codes(9, g=g)
    y = matmul.matmul(p, 1 / 255, 0, vec, 0.1, 128)
    assert y.shape == (2, 4, 9) and torch.equal(y, reference.matmul(p, 1 / 255, 0, vec, 0.1, 128))


def test_dequantized_float_matmul_is_within_float_rounding():
    """The int8 result is the float matmul of the dequantized operands, up to float32 rounding."""
    g = torch.Generator().manual_seed(11)
    a, b = _codes(4, 64, 48, g=g), _codes(4, 48, 64, g=g)
    y = matmul.matmul(a, 0.02, 128, b, 0.03, 127)
    expected = ((a.double() - 128) * 0.02) @ ((b.double() - 127) * 0.03)
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-5)
