"""AdaRound on grouped and depthwise convs: its rows-times-weights form of a layer must be the
layer (patch order against grouped weight order, stride, padding, dilation), and learning the
rounding must lower a depthwise-separable net's output error on real photo crops at 4-bit weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quanta
from quanta.debug.sqnr import sqnr
from quanta.ptq.adaround import (
    _by_group,
    _forward,
    _grouped,
    _outputs_of,
    _rows_of,
    adaround,
    mean_squared_error,
)
from quanta.ptq.bias_correction import correctable_layers
from quanta.zoo.photos import photo_crops

FOUR_BIT = quanta.QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=4)


def _separable(groups: int, out_per_group: int, stride: int, padding: int, dilation: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU6(),
        nn.Conv2d(12, groups * out_per_group, 3, stride=stride, padding=padding, dilation=dilation,
                  groups=groups),
        nn.ReLU6(), nn.Conv2d(groups * out_per_group, 8, 1)).eval()


@pytest.mark.parametrize("groups,out_per_group,stride,padding,dilation", [
    (12, 1, 1, 1, 1),  # depthwise
    (12, 2, 2, 0, 1),  # depthwise with a channel multiplier, strided, unpadded
    (3, 3, 1, 2, 2),  # grouped, dilated
])
def test_grouped_rows_times_weights_is_the_conv(groups: int, out_per_group: int, stride: int,
                                                padding: int, dilation: int) -> None:
    model = _separable(groups, out_per_group, stride, padding, dilation)
    x = photo_crops(4, 24, seed=0)
    q = quanta.quantize(model, [x], show_progress=False)
    _, layer = correctable_layers(q)[1]
    assert layer.groups == groups
    conv = model[2]
    w = conv.weight.detach()
    h = F.relu6(model[0](x)).detach()
    rows = torch.cat(list(_rows_of(layer, h)))
    grouped_out = _forward(_by_group(rows, groups), _grouped(layer, w),
                           conv.bias.detach().reshape(groups, 1, -1), "relu6")
    expected = torch.cat(list(_outputs_of(layer, F.relu6(conv(h)))))
    got = grouped_out.transpose(0, 1).reshape(expected.shape)
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_adaround_lowers_a_separable_nets_error_on_photo_crops() -> None:
    model = _separable(12, 1, 1, 1, 1)
    calib = list(torch.split(photo_crops(32, 24, seed=1), 8))
    config = quanta.QuantConfig(weight=FOUR_BIT)
    q = quanta.quantize(model, calib, config=config, show_progress=False)
    held_out = photo_crops(32, 24, seed=0)
    with torch.no_grad():
        ref, before = model(held_out), q(held_out)
    results = adaround(model, q, calib, iterations=200, rows=512, show_progress=False)
    with torch.no_grad():
        after = q(held_out)
    print("errors (nearest -> learned): " + ", ".join(
        f"{r.name} {r.error_nearest:.4f} -> {r.error_learned:.4f}" for r in results)
        + f"; output SQNR {sqnr(ref, before):.2f} -> {sqnr(ref, after):.2f} dB")
    assert [r.kept for r in results] == [r.error_learned < r.error_nearest for r in results]
    assert any(r.kept for r in results)
    assert sqnr(ref, after) > sqnr(ref, before) + 1.0  # measured 21.53 -> 23.02 dB
    assert quanta.report(q).coverage.to_dict()["share"] == 1.0  # every conv int8 at 4-bit


@pytest.mark.parametrize("groups,features,outputs", [(1, 96, 48), (8, 9, 1), (3, 40, 5)])
def test_quadratic_error_is_the_direct_error(groups: int, features: int, outputs: int) -> None:
    """Without an activation AdaRound's loss is computed from X^T X: same value and gradient as
    the rows-times-weights form, in float32, near the fit (where the terms nearly cancel)."""
    gen = torch.Generator().manual_seed(groups)
    x = torch.randn(groups, 4096, features, generator=gen).abs()  # post-ReLU-like inputs
    w_true = torch.randn(groups, outputs, features, generator=gen) * 0.1
    bias = torch.randn(groups, 1, outputs, generator=gen)
    noise = 0.01 * torch.randn(groups, 4096, outputs, generator=gen)
    target = torch.bmm(x, w_true.transpose(1, 2)) + bias + noise
    quadratic = mean_squared_error(x, target, bias, "none")
    direct = mean_squared_error(x, target, bias, "relu6")  # same code path as any activation
    direct_none = lambda w: (_forward(x, w, bias, "none") - target).pow(2).mean()  # noqa: E731
    assert quadratic.__name__ == "quadratic" and direct.__name__ == "direct"
    for w0 in (w_true + 0.003 * torch.randn(w_true.shape, generator=gen), torch.zeros_like(w_true)):
        grads = []
        for f in (quadratic, direct_none):
            w = w0.clone().requires_grad_(True)
            value = f(w)
            value.backward()
            grads.append((float(value.detach()), w.grad))
        (vq, gq), (vd, gd) = grads
        print(f"value {vq:.6g} vs {vd:.6g}, gradient SQNR {sqnr(gd, gq):.1f} dB")
        assert abs(vq - vd) <= 1e-3 * vd + 1e-6, (vq, vd)
        assert sqnr(gd, gq) > 60, sqnr(gd, gq)
