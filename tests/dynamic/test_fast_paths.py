"""The fast dynamic Linear paths (input quantization workspace, reused quantized inputs, the
per-tensor oneDNN hot path) against the integer reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from quanta.config import QuantSpec
from quanta.errors import QuantizedInputError
from quanta.kernels import cpu, reference
from quanta.kernels import dynamic as kd
from quanta.modules.dynamic import DynamicQuantizedLinear

pytestmark = pytest.mark.isa  # run natively and under scripts/as-avx2 (.ci/run)

WSPEC = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=cpu.weight_bits_for_cpu())
needs_onednn = pytest.mark.skipif(not cpu.onednn_available(), reason="no oneDNN int8 here")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    kd.clear_input_cache()


def _spec_output(q: DynamicQuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Reference output for ``x`` computed from scratch (no cache)."""
    kd.clear_input_cache()
    x2 = x.reshape(-1, q.in_features)
    scale, zp = kd.dynamic_qparams(float(x2.min()), float(x2.max()))
    x_q = reference.quantize_dynamic_input(x2, scale, zp)
    y = reference.linear_dynamic(x_q, scale, zp, q.weight, q.weight_scale, q.bias)
    return y.reshape(*x.shape[:-1], q.out_features)


def _close(out: torch.Tensor, spec: torch.Tensor) -> bool:
    return float((out - spec).abs().max()) <= 1e-5 * float(spec.abs().max())  # float32 epilogue only


def test_workspace_quantization_bit_equal_and_results_independent() -> None:
    shapes = [(3, 7), (64, 130), (5, 2, 33), (200, 257), (4, 9)]  # grows, then shrinks the workspace
    results = []
    for shape in shapes:
        x = torch.randn(shape) * 5
        x.view(-1)[:3] = torch.tensor([0.5, -0.5, 2.5])
        x_q, scale, zp = kd.quantize_input(x, False)
        assert x_q.shape == x.shape and x_q.dtype == torch.uint8
        expect = reference.quantize_dynamic_input(x.reshape(-1, shape[-1]), scale, zp).reshape(shape)
        assert torch.equal(x_q, expect)
        results.append((x_q, expect))
    for x_q, expect in results:  # later calls reuse the float workspace, never a returned tensor
        assert torch.equal(x_q, expect)


def test_blocked_quantization_bit_equal() -> None:
    """Inputs spanning several blocks (plus a partial one) quantize exactly as the reference;
    a non-finite value in a later block is still caught."""
    x = torch.randn(3 * kd._BLOCK // 256 + 3, 256) * 4
    x[0, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5])
    x_q, scale, zp = kd.quantize_input(x, False)
    assert torch.equal(x_q, reference.quantize_dynamic_input(x, scale, zp))
    x[-1, -1] = float("inf")
    with pytest.raises(kd.NonFiniteInputError):
        kd.quantize_input(x, False)


def test_all_equal_and_single_sign_inputs_bit_equal() -> None:
    inputs = (torch.zeros(4, 16), torch.full((4, 16), 3.0), -torch.rand(4, 16) - 1, torch.rand(4, 16) * 1e-30)
    for x in inputs:
        kd.clear_input_cache()
        x_q, scale, zp = kd.quantize_input(x, False)
        assert torch.equal(x_q, reference.quantize_dynamic_input(x, scale, zp))


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 9, 96), (1, 3, 96), (40, 96)])
def test_hot_path_leading_dims_match_reference(shape: tuple[int, ...]) -> None:
    q = DynamicQuantizedLinear(nn.Linear(96, 40), WSPEC)
    x = torch.randn(shape) * 2
    with torch.no_grad():
        out = q(x)
    assert out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
    assert _close(out, _spec_output(q, x))


@needs_onednn
def test_hot_path_non_contiguous_input_and_no_bias() -> None:
    q = DynamicQuantizedLinear(nn.Linear(64, 24, bias=False), WSPEC)
    x = torch.randn(64, 16).t()  # [16, 64] transposed view
    with torch.no_grad():
        out = q(x)
    assert _close(out, _spec_output(q, x.contiguous()))


def test_hot_path_rejects_non_finite_input_clearly() -> None:
    q = DynamicQuantizedLinear(nn.Linear(32, 8), WSPEC, layer_name="enc.query")
    x = torch.randn(2, 5, 32)
    x[1, 2, 3] = float("nan")
    with pytest.raises(QuantizedInputError, match="enc.query"):
        q(x)


@pytest.mark.parametrize("per_row", [False, True])
def test_reused_quantization_is_not_stale_after_in_place_change(per_row: bool) -> None:
    """q/k/v-style siblings share one quantized input, but an input changed in place between
    calls (same storage, new version) must be quantized again."""
    first = DynamicQuantizedLinear(nn.Linear(48, 16), WSPEC, per_row=per_row)
    second = DynamicQuantizedLinear(nn.Linear(48, 16), WSPEC, per_row=per_row)
    x = torch.randn(12, 48)
    with torch.no_grad():
        first(x)
        shared = kd.quantize_input(x, per_row)[0]
        assert kd.quantize_input(x, per_row)[0] is shared  # reused for the sibling
        x.mul_(3.0).add_(1.0)
        out = second(x)
        fresh = kd.quantize_input(x, per_row)[0]
    assert fresh is not shared
    kd.clear_input_cache()
    assert torch.equal(fresh, kd.quantize_input(x.clone(), per_row)[0])
    if not per_row:
        assert _close(out, _spec_output(second, x))


def test_reused_quantization_keyed_by_view_shape() -> None:
    """A view of the same storage with another shape is a different input."""
    base = torch.randn(8, 32)
    a, b = base[:4], base.view(16, 16)
    qa, _, _ = kd.quantize_input(a, False)
    qb, _, _ = kd.quantize_input(b, False)
    assert qa.shape == (4, 32) and qb.shape == (16, 16)


def _row_inputs() -> list[torch.Tensor]:
    halves = torch.randn(5, 40) * 3
    halves[0, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5])
    return [halves, torch.zeros(3, 16), torch.full((2, 8), 3.0), -torch.rand(4, 33) - 1,
            torch.rand(4, 16) * 1e-30, torch.randn(700, 384) * torch.rand(700, 1) * 10]  # > one block


@pytest.mark.skipif(kd.native.load() is None, reason="native kernels unavailable")
def test_native_per_row_quantization_bit_equal_to_numpy() -> None:
    """One C pass over the rows gives numpy's data, scales and zero points bit for bit."""
    lib = kd.native.load()
    for x in _row_inputs():
        q, s, z = kd._quantize_rows_native(lib, x.contiguous())
        qn, sn, zn = kd._quantize_rows(x.numpy())
        assert torch.equal(q, torch.from_numpy(qn))
        assert torch.equal(s, torch.from_numpy(sn)) and torch.equal(z, torch.from_numpy(zn))
        assert torch.equal(q, reference.quantize_dynamic_input(x, s, z))
    for cols, where in ((20, 3), (384, 0), (384, 200), (384, 383)):  # vector body and tail
        x = torch.randn(9, cols)
        x[7, where] = float("nan")
        with pytest.raises(kd.NonFiniteInputError):
            kd._quantize_rows_native(lib, x)
        x[7, where] = float("-inf")
        with pytest.raises(kd.NonFiniteInputError):
            kd._quantize_rows_native(lib, x)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_per_row_fast_path_matches_reference(bias: bool) -> None:
    """Per-row input qparams through the kept matmul and the C epilogue: the reference's output up
    to float32 epilogue rounding, on rows of very different ranges."""
    q = DynamicQuantizedLinear(nn.Linear(96, 40, bias=bias), WSPEC, per_row=True)
    x = torch.randn(3, 11, 96) * torch.logspace(-2, 2, 33).reshape(3, 11, 1)
    with torch.no_grad():
        out = q(x)
    kd.clear_input_cache()
    spec = q.kernel("weight").reference(x.reshape(-1, 96), q.bias, per_row=True).reshape(3, 11, 40)
    per_row_max = spec.abs().amax(dim=-1, keepdim=True)
    assert float(((out - spec).abs() / per_row_max).max()) <= 1e-5
