"""Weight-only kernels against the float64 reference, with explicit error limits per format."""

from __future__ import annotations

import pytest
import torch

from quanta.kernels import native
from quanta.kernels import weight_only as wo

# relative to max |y_ref|: float32 accumulation over K <= 1536 products of bounded terms
LIMITS = {"int8": 2e-6, "int4": 3e-6}


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)


def test_int4_pack_roundtrip_and_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = wo.pack_int4(q)
    assert packed.shape == (3, 32) and torch.equal(wo.unpack_int4(packed), q)
    # byte b of each 32-column block: column b low nibble, column b + 16 high nibble
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 16]) << 4)
    assert int(packed[1, 17]) == int(q[1, 33]) | (int(q[1, 49]) << 4)


def test_int4_quantization_error_and_ragged_groups():
    w = _weights(8, 576)
    for group in (32, 128):  # 576 = 4 * 128 + 64: the last group of 128 is short
        q, scale, offset = wo.quantize_int4(w, group)
        assert scale.shape == (8, -(-576 // group))
        err = (wo.dequantize(q, scale, offset, group) - w).abs()
        # asymmetric min/max grid: every value within half a step of its group
        cols = torch.arange(576) // group
        assert bool((err <= scale[:, cols] * 0.5 + 1e-6).all())
    q, scale, offset = wo.quantize_int4(w, 32, symmetric=True)
    assert torch.allclose(offset, -8 * scale)
    with pytest.raises(ValueError, match="multiples of 32"):
        wo.quantize_int4(_weights(4, 40), 32)


def test_int8_quantization_is_symmetric_per_channel():
    w = _weights(16, 64)
    q, scale = wo.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.allclose(scale, w.abs().amax(1) / 127)
    assert float((q.float() * scale[:, None] - w).abs().max()) <= float(scale.max()) / 2 + 1e-7


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
@pytest.mark.parametrize("plain", [False, True], ids=["avx2", "plain"])
@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g128", "int4-g128-sym"])
@pytest.mark.parametrize("m", [1, 3])
def test_native_gemv_matches_reference(fmt, plain, m):
    n, k = 200, 576
    w = _weights(n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n)
    if fmt == "int8":
        (q, scale), offset, group = wo.quantize_int8(w), None, k
    else:
        group = int(fmt.split("-g")[1].split("-")[0])
        q, scale, offset = wo.quantize_int4(w, group, symmetric=fmt.endswith("sym"))
    ref = wo.reference_linear(x, q, scale, offset, group, bias)
    y = wo.native_linear(x, q, scale, offset, group, bias, plain=plain)
    err = float((y - ref).abs().max() / ref.abs().max())
    assert err < LIMITS[fmt[:4]], err
    # the prefill path (native dequantize + sgemm) computes the same weights, AVX2 or plain loops
    fast = wo.native_dequantize(q, scale, offset, group, plain=plain)
    assert torch.allclose(fast, wo.dequantize(q, scale, offset, group), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
def test_linear_dispatch_gemv_and_prefill_paths_agree():
    w, x = _weights(64, 128, 3), torch.randn(wo.PREFILL_ROWS, 128)
    q, scale, offset = wo.quantize_int4(w, 32)
    many = wo.linear(x, q, scale, offset, 32, None)  # dequantize + sgemm
    few = torch.cat([wo.linear(x[i:i + 1], q, scale, offset, 32, None) for i in range(len(x))])  # GEMV
    assert float((many - few).abs().max() / many.abs().max()) < 3e-6


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g128-sym"])
def test_tiled_prefill_matches_reference(fmt, monkeypatch):
    """A matrix above TILED_FROM_WEIGHTS goes tile by tile (ragged last tile, with and without
    bias); the result equals the specification like the untiled path."""
    n, k, m = 1000, 128, wo.PREFILL_ROWS + 3
    monkeypatch.setattr(wo, "TILED_FROM_WEIGHTS", n * k)
    monkeypatch.setattr(wo, "TILE_WEIGHTS", 96 * k)  # 96-row tiles: the last one has 40
    w, x = _weights(n, k, seed=4), torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    if fmt == "int8":
        (q, scale), offset, group = wo.quantize_int8(w), None, k
    else:
        group = int(fmt.split("-g")[1].split("-")[0])
        q, scale, offset = wo.quantize_int4(w, group, symmetric=fmt.endswith("sym"))
    for bias in (None, torch.randn(n)):
        ref = wo.reference_linear(x, q, scale, offset, group, bias)
        y = wo.linear(x, q, scale, offset, group, bias)
        assert y.shape == (m, n) and not y.is_contiguous()  # the tiled path's transposed view
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


# int4 GEMV with int8 activations (QuantConfig.int4_activations="int8") against its own
# specification, reference_linear_int8_activations: the block products are exact integers in both,
# so only float32 accumulation of one term per block (and of the group sums) separates them
INT8_ACTIVATION_LIMIT = 1e-6


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
@pytest.mark.parametrize("plain", [False, True], ids=["avx2", "plain"])
def test_activation_blocks_are_bit_exact_in_c(plain):
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(6))
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[1, 32:64] = torch.arange(32) * 0.5 - 8.0  # max 7.5 -> step 7.5/127: many values land near ties
    x[2, 64] = 127.0 * 3.0  # one large value: the rest of its block rounds to small codes
    xq, xs = wo.quantize_activation_blocks(x)
    cq, cs, nonfinite = wo.native_quantize_activation_blocks(x, plain)
    assert torch.equal(xq, cq) and torch.equal(xs, cs) and not nonfinite
    assert float(xs[0, 0]) == 0.0 and not xq[0, :32].any()
    assert int(xq.abs().max()) == 127 and float(xs[2, 2]) == pytest.approx(3.0)
    assert float((xq.float().reshape(3, 3, 32) * xs[..., None] - x.reshape(3, 3, 32)).abs().max()) <= \
        float(xs.max()) / 2 + 1e-6
    wide = torch.randn(16, 1536, generator=torch.Generator().manual_seed(10))
    wide *= torch.logspace(-6, 6, 16)[:, None]
    spec, native_pass = wo.quantize_activation_blocks(wide), wo.native_quantize_activation_blocks(wide, plain)
    assert torch.equal(spec[0], native_pass[0]) and torch.equal(spec[1], native_pass[1])
    x[1, 40] = float("inf")
    assert wo.native_quantize_activation_blocks(x, plain)[2]
    x[1, 40] = float("nan")
    assert wo.native_quantize_activation_blocks(x, plain)[2]


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
@pytest.mark.parametrize("plain", [False, True], ids=["avx2", "plain"])
@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g128", "int4-g128-sym", "int4-g64-k1536"])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_gemv_with_int8_activations_matches_its_specification(fmt, plain, m):
    n = 203  # not a multiple of the kernel's four rows at a time
    k = 1536 if fmt.endswith("k1536") else 576  # 576 = 4 * 128 + 64: the last group of 128 is short
    group = int(fmt.split("-g")[1].split("-")[0])
    w = _weights(n, k, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8))
    bias = torch.randn(n)
    q, scale, offset = wo.quantize_int4(w, group, symmetric=fmt.endswith("sym"))
    spec = wo.reference_linear_int8_activations(x, q, scale, offset, group, bias)
    y = wo.native_linear(x, q, scale, offset, group, bias, plain=plain, int8_activations=True)
    err = float((y - spec).abs().max() / spec.abs().max())
    assert err < INT8_ACTIVATION_LIMIT, err
    # and what the int8 activations cost against float ones: per-block 8-bit inputs, ~0.5 %
    exact = wo.reference_linear(x, q, scale, offset, group, bias)
    cost = float((spec - exact).abs().max() / exact.abs().max())
    assert 1e-4 < cost < 2e-2, cost
    if not plain:  # the dispatcher sends few rows to this GEMV
        assert torch.equal(wo.linear(x, q, scale, offset, group, bias, int8_activations=True), y)


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
def test_int4_gemv_with_int8_activations_runs_nonfinite_inputs_in_float():
    q, scale, offset = wo.quantize_int4(_weights(40, 64, seed=9), 32)
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    y = wo.native_linear(x, q, scale, offset, 32, None, int8_activations=True)
    float_gemv = wo.native_linear(x, q, scale, offset, 32, None)
    assert torch.equal(y[0], float_gemv[0])  # the whole call ran the float GEMV
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[0]).all())


def test_reference_backend_follows_the_int8_activation_path():
    from quanta.config import QuantSpec
    from quanta.modules.weight_only import WeightOnlyLinear

    layer = WeightOnlyLinear(torch.nn.Linear(64, 24), QuantSpec(bits=4, group_size=32), "fc")
    layer.backend = "reference"
    x = torch.randn(2, 64)
    spec = wo.reference_linear_int8_activations(x, layer.weight, layer.weight_scale, layer.weight_offset, 32,
                                                layer.bias)
    assert torch.equal(layer(x), spec)
    many = torch.randn(wo.PREFILL_ROWS, 64)  # prefill rows: float activations
    assert torch.equal(layer(many), wo.reference_linear(many, layer.weight, layer.weight_scale,
                                                        layer.weight_offset, 32, layer.bias))
