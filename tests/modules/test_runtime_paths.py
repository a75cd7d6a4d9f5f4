"""Runtime shortcuts of the fast path: add call sites fed a float input run the float op, and
sibling Linear layers share one quantization of the same float input."""

import itertools

import pytest
import torch
import torch.nn as nn

from quanta.config import QuantSpec
from quanta.kernels import cpu, reference
from quanta.modules.quantized import QuantizedLinear
from quanta.modules.sites import QuantizedSite
from quanta.qtensor import QTensor

pytestmark = pytest.mark.skipif(not cpu.onednn_available(), reason="oneDNN int8 kernels unavailable")

SCALE, ZP = 0.05, 120


def _site(backend: str, output_int8: bool) -> QuantizedSite:
    site = QuantizedSite("block:add#0", "add", "none")
    site.set_qparams(SCALE, ZP)
    site.backend, site.output_int8 = backend, output_int8
    return site


def _inputs() -> tuple[torch.Tensor, QTensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 32, generator=g)
    b_q = torch.randint(0, 256, (2, 16, 32), generator=g, dtype=torch.uint8)
    return a, QTensor(b_q, 0.02, 128)


def test_float_input_with_float_consumer_returns_the_float_op():
    a, b = _inputs()
    out = _site("onednn", output_int8=False).run(torch.add, (a, b), {})
    assert not isinstance(out, QTensor)
    assert torch.equal(out, a + b.dequantize())
    ref = _site("reference", output_int8=False).run(torch.add, (a, b), {})
    in_range = (out / SCALE + ZP).abs().le(255) & (out / SCALE + ZP).ge(0)
    assert in_range.float().mean() > 0.99
    assert float((out - ref)[in_range].abs().max()) <= SCALE / 2 * 1.001


def test_float_input_with_int8_consumer_matches_the_reference():
    a, b = _inputs()
    fast = _site("onednn", output_int8=True).run(torch.add, (a, b), {})
    ref = _site("reference", output_int8=True).run(torch.add, (a, b), {})
    assert isinstance(fast, QTensor) and isinstance(ref, QTensor)
    assert torch.equal(fast.int_data, ref.int_data)


def _linear(seed: int) -> QuantizedLinear:
    torch.manual_seed(seed)
    spec = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=cpu.weight_bits_for_cpu())
    module = QuantizedLinear(nn.Linear(64, 48), weight_spec=spec, input_qparams=(0.03, 128),
                             output_qparams=(0.1, 128))
    module.set_backend("onednn", forced=True)
    return module


def test_siblings_share_the_input_quantization_and_in_place_changes_invalidate_it():
    first, second = _linear(1), _linear(2)
    x = torch.randn(128, 64)
    with torch.no_grad():
        assert torch.equal(first.quantize_input(x), second.quantize_input(x))
        assert second.quantize_input(x) is first.quantize_input(x)  # shared, not recomputed
        y1 = second(x)
        x.mul_(2.0)
        y2 = second(x)
        fresh = _linear(2)(x.clone())
    assert not torch.equal(y1, y2)
    assert torch.equal(y2, fresh)
    assert torch.equal(second.quantize_input(x), reference.quantize_per_tensor(x, 0.03, 128))


def test_inference_tensors_are_quantized_afresh():
    first = _linear(1)
    with torch.inference_mode():
        x = torch.randn(128, 64)
        a = first.quantize_input(x)
        x.mul_(2.0)
        b = first.quantize_input(x)
    assert torch.equal(b, reference.quantize_per_tensor(x, 0.03, 128))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("shape,args,kwargs", [
    ((1, 64, 112, 112), (3, 2, 1), {}),
    ((8, 16, 28, 28), (2,), {}),
    ((2, 8, 15, 13), ((3, 2),), {"stride": (2, 1), "padding": (1, 1)}),
    ((1, 4, 9, 9), (3,), {"stride": 1, "padding": 1}),
    ((1, 4, 9, 9), (3, 2), {"ceil_mode": True}),  # not covered: bfloat16 path
])
def test_integer_max_pool_matches_float(dtype, shape, args, kwargs):
    g = torch.Generator().manual_seed(3)
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    data = torch.randint(lo, hi, shape, generator=g, dtype=dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = QTensor(data.contiguous(memory_format=layout), 0.1, 0 if dtype == torch.int8 else 128)
        out = torch.nn.functional.max_pool2d(x, *args, **kwargs)
        want = torch.nn.functional.max_pool2d(data.float(), *args, **kwargs).to(dtype)
        assert isinstance(out, QTensor) and out.int_data.dtype == dtype
        assert torch.equal(out.int_data, want)
    module_out = nn.MaxPool2d(3, 2, 1)(QTensor(data, 0.1, 0))
    assert torch.equal(module_out.int_data, torch.nn.functional.max_pool2d(data.float(), 3, 2, 1).to(dtype))


@pytest.mark.parametrize("size", [(7, 9), (5, 5), (1, 1), (3, 8), (16, 16)])
def test_integer_max_pool_sweep(size):
    """Every kernel/stride/padding torch accepts, on odd sizes: the separable padded path and
    the shifted-views path equal float max pooling exactly."""
    g = torch.Generator().manual_seed(size[0] * 31 + size[1])
    data = torch.randint(0, 256, (2, 8, *size), generator=g, dtype=torch.uint8)
    x = QTensor(data.contiguous(memory_format=torch.channels_last), 0.1, 7)
    checked = 0
    for k, s, p in itertools.product([1, 2, 3, 4, 5], [1, 2, 3], [0, 1, 2]):
        if 2 * p > k or (size[0] + 2 * p - k) < 0 or (size[1] + 2 * p - k) < 0:
            continue
        want = torch.nn.functional.max_pool2d(data.float(), k, s, p)
        out = torch.nn.functional.max_pool2d(x, k, s, p)
        assert torch.equal(out.int_data.float(), want), (k, s, p)
        checked += 1
    assert checked >= 5
