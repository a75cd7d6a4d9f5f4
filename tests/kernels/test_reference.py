"""The reference kernels are integer-exact: compare with pure int64 arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from quanta.kernels import reference


def _rand_u8(*shape, g):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def _rand_i8(*shape, g, bits=8):
    lim = 2 ** (bits - 1)
    return torch.randint(-lim, lim, shape, dtype=torch.int8, generator=g)


def test_linear_accumulator_is_exact():
    g = torch.Generator().manual_seed(0)
    x, w = _rand_u8(7, 4096, g=g), _rand_i8(33, 4096, g=g)
    bias = torch.randint(-(2**20), 2**20, (33,), dtype=torch.int32, generator=g)
    expected = ((x.long() - 77)[:, None, :] * w.long()[None]).sum(-1) + bias.long()
    acc = reference.linear_accumulate(x, 77, w, bias)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), expected)


def _conv_int64(x, zp, w, stride, padding, dilation, groups):
    """Direct convolution in int64, one kernel tap at a time."""
    x = F.pad(x.long() - zp, (padding[1], padding[1], padding[0], padding[0]))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.zeros(n, o, oh, ow, dtype=torch.long)
    og = o // groups
    for gi in range(groups):
        xs = x[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * og:(gi + 1) * og].long()
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation[0]: i * dilation[0] + stride[0] * (oh - 1) + 1: stride[0],
                           j * dilation[1]: j * dilation[1] + stride[1] * (ow - 1) + 1: stride[1]]
                out[:, gi * og:(gi + 1) * og] += (patch[:, None] * ws[None, :, :, i, j, None, None]).sum(2)
    return out


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    ((1, 1), (1, 1), (1, 1), 1), ((2, 2), (0, 0), (1, 1), 1), ((1, 2), (2, 1), (2, 1), 2),
    ((1, 1), (1, 1), (1, 1), 8),  # depthwise
])
def test_conv_accumulator_is_exact(stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(1)
    x = _rand_u8(2, 8, 9, 11, g=g)
    w = _rand_i8(16, 8 // groups, 3, 3, g=g)
    acc = reference.conv_accumulate(x, 131, w, None, stride, padding, dilation, groups)
    assert torch.equal(acc.long(), _conv_int64(x, 131, w, stride, padding, dilation, groups))


def test_epilogue_requantizes_half_to_even_and_clamps():
    acc = torch.tensor([[5, 15, 25, -1000, 10**6]], dtype=torch.int32)
    # scale 0.1 -> y = [0.5, 1.5, 2.5, -100, 1e5]; out_scale 1.0, zp 10
    q = reference.epilogue(acc, 0.5, torch.full((5,), 0.2), 1, "none", 1.0, 10)
    assert q.dtype == torch.uint8 and q.tolist() == [[10, 12, 12, 0, 255]]
    relu = reference.epilogue(acc, 0.5, torch.full((5,), 0.2), 1, "relu", 1.0, 10)
    assert relu.tolist()[0][3] == 10


def test_add_and_requantize_match_float_definition():
    g = torch.Generator().manual_seed(2)
    a, b = _rand_u8(100, g=g), _rand_u8(100, g=g)
    out = reference.add(a, 0.05, 128, b, 0.02, 3, 0.07, 60)
    y = (a.double() - 128) * 0.05 + (b.double() - 3) * 0.02
    expected = torch.clamp(torch.round(y / 0.07) + 60, 0, 255)
    assert (out.double() - expected).abs().max() <= 1  # float32 vs float64 ties only
    assert (out.double() == expected).float().mean() > 0.99
    same = reference.requantize(a, 0.05, 128, 0.05, 128)
    assert same is a


def test_fixed_point_add_rounds_ties_up_and_stays_within_one_lsb():
    """XNNPACK's add (numerics="xnnpack"): an exact tie (0.5 quantum) rounds up where float32 rounds to even;
    everywhere it is within one LSB of the exact sum and equal to float32 on all but ~1e-5."""
    one, zero = torch.tensor([1], dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8)
    args = (one, 0.5, 0, zero, 0.5, 0, 1.0, 0)
    assert reference.add(*args, numerics="xnnpack").item() == 1
    assert reference.add(*args).item() == 0
    pairs = torch.arange(256, dtype=torch.uint8)
    a, b = pairs[:, None], pairs[None, :]
    g = torch.Generator().manual_seed(4)
    differ = 0
    for _ in range(20):
        sa, sb, sy = (float(torch.tensor(0.01 + 0.1 * float(v), dtype=torch.float32))
                      for v in torch.rand(3, generator=g))
        za, zb, zy = (int(v) for v in torch.randint(0, 256, (3,), generator=g))
        fixed = reference.add(a, sa, za, b, sb, zb, sy, zy, numerics="xnnpack").int()
        exact = torch.clamp(torch.round(((a.double() - za) * sa + (b.double() - zb) * sb) / sy) + zy, 0, 255)
        assert (fixed - exact).abs().max() <= 1
        differ += int((fixed != reference.add(a, sa, za, b, sb, zb, sy, zy).int()).sum())
    assert differ <= 20 * 65536 * 1e-4, differ  # measured: 12 of 1.3 M pairs
    with pytest.raises(ValueError, match="outside XNNPACK's range"):
        reference.add(one, 1e4, 0, zero, 1.0, 0, 1e-3, 0, numerics="xnnpack")
    with pytest.raises(ValueError, match="numerics must be one of"):
        reference.add(one, 1.0, 0, zero, 1.0, 0, 1.0, 0, numerics="fixed_point")


def test_epilogue_rounds_once_with_one_multiplier():
    """uint8 epilogue = round(acc * f32(f32(s_x*s_w)/s_y)) + zp: against the exact (float64) value
    of acc * s_x * s_w / s_y it is off by at most 1 LSB, only next to ties."""
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-(2**20), 2**20, (4096, 64), dtype=torch.int32, generator=g)
    w_scale = torch.rand(64, generator=g) * 0.01 + 1e-4
    x_scale, out_scale, zp = 0.0213, 0.917, 128
    q = reference.epilogue(acc, x_scale, w_scale, 1, "none", out_scale, zp)
    m = (torch.tensor(x_scale) * w_scale) / torch.tensor(out_scale)
    assert torch.equal(q, torch.clamp(torch.round(acc.float() * m) + zp, 0, 255).to(torch.uint8))
    exact = acc.double() * (float(torch.tensor(x_scale)) * w_scale.double()) / float(torch.tensor(out_scale))
    expected = torch.clamp(torch.round(exact) + zp, 0, 255)
    diff = (q.double() - expected).abs()
    assert diff.max() <= 1 and (diff == 0).double().mean() > 0.9999


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_fused_activation_is_an_integer_clamp(activation):
    """ReLU / ReLU6 before requantization == clamping the integers at quantize(0) / quantize(6)."""
    acc = torch.arange(-3000, 3000, dtype=torch.int32).reshape(1, -1)
    out_scale, zp = 6.0 / 200, 30
    plain = reference.epilogue(acc, 0.5, torch.full((1,), 0.01), 0, "none", out_scale, zp)
    fused = reference.epilogue(acc, 0.5, torch.full((1,), 0.01), 0, activation, out_scale, zp)
    six = int(reference.quantize_per_tensor(torch.tensor(6.0), out_scale, zp))
    assert torch.equal(fused, torch.clamp(plain, zp, six if activation == "relu6" else 255))
    assert int(fused.min()) == zp and (activation == "relu" or int(fused.max()) == six == 230)
