"""oneDNN fast kernels vs the integer reference (quanta.kernels.reference).

Tolerance per op (fast - reference), ggml-style. Inputs: full-range random uint8
activations, random int8 weights at the bit width this CPU needs (8, or 7 without VNNI).
The reference requantizes with one float32 multiplier per channel (ONNX Runtime's order);
oneDNN adds a float bias after scaling and scales in its own order, so a requantized
element lands on the other side of a .5 tie about once in 10^5-10^6.

| op                   | output  | max |diff|          | allowed to differ | measured, ~2-10M outputs |
|----------------------|---------|---------------------|-------------------|--------------------------|
| linear, conv1d/2d    | float32 | 1 acc. quantum      | 100% (f32 ulps)   | ~1 float32 ulp           |
| linear               | uint8   | 1 output quantum    | 2e-5              | 6.8e-6; relu 1.5e-6      |
| linear + GELU        | uint8   | 1 output quantum    | 2e-5              | 0 in 35k (erf and tanh)  |
| conv2d (dense/group) | uint8   | 1 output quantum    | 2e-5              | 6.7e-6; relu6 8e-7       |
| conv2d depthwise     | uint8   | 1 output quantum    | 2e-5              | 4.6e-6; relu6 2.7e-6     |
| conv1d               | uint8   | 1 output quantum    | 2e-5              | 6.3e-6; relu 1e-6        |
| add, oneDNN sum      | uint8   | 1 output quantum    | 2e-5 (eltwise)    | 2e-6 to 5e-6             |
| add, table lookup    | uint8   | 0 (bit-identical)   | 0                 | 0                        |
| quantize_uint8       | uint8   | 0 (bit-identical)   | 0                 | 0                        |

Every PackedLinear / PackedConv test runs on both ways to oneDNN (the ``kernel_path`` fixture):
quanta's native kept primitives and the ``torch.ops.onednn`` fallback. Measured tie rates on the
slow test are the same order on both (native: linear 4.8e-6, conv2d 5.6e-6, depthwise 5.0e-6,
conv1d 5.9e-6): a bias is added after scaling in both, so its product rounds on its own.

Small parametrized cases allow one tie each on top of the rate (a single tie in 35 outputs is
3%); test_u8_tie_rate_per_op checks the rate itself on ~1-2.5M outputs per op. Before the
reference moved to the one-multiplier form (round(acc * s_x*s_w) then / s_y) oneDNN's uint8
outputs matched it bit for bit; the two-rounding form is not what ONNX Runtime computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from quanta.errors import NonFiniteInputError
from quanta.kernels import reference as R
from quanta.kernels.cpu import has_vnni, is_x86, onednn_available, weight_bits_for_cpu
from quanta.kernels.dispatch import choose_backend

pytestmark = [pytest.mark.skipif(not onednn_available(), reason="torch.ops.onednn int8 kernels unavailable"),
              pytest.mark.isa]  # run natively and under scripts/as-avx2 (.ci/run)

if onednn_available():
    from quanta.kernels.onednn import PackedConv, PackedLinear, quantize_uint8

def _seed(key: object) -> int:
    return zlib.crc32(repr(key).encode())


SMOOTH = ["silu", "hardswish", "sigmoid", "hardsigmoid"]  # fused post-ops (SiLU/Swish nets, MobileNetV3)
ACTS = ["none", "relu", "relu6", *SMOOTH]
LINEAR_ACTS = [*ACTS, "gelu", "gelu_tanh"]  # GELU folds only into Linear (transformer MLPs)
U8_LIMIT = {"linear": 2e-5, "conv2d": 2e-5, "conv2d_depthwise": 2e-5, "conv1d": 2e-5}


def _weights(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    hi = 2 ** (weight_bits_for_cpu() - 1)
    w_q = torch.randint(-hi, hi, shape, dtype=torch.int8, generator=gen)
    return w_q, torch.rand(shape[0], generator=gen) * 0.02 + 0.001


def _qparams_for(y: torch.Tensor) -> tuple[float, int]:
    """Output qparams spanning roughly 90% of y's range, so outputs both vary and clamp."""
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 1e-3)
    scale = (hi - lo) * 0.9 / 255
    return scale, int(min(255, max(0, round(-lo / scale))))


def _check(op: str, fast_fn, ref_fn, x_scale: float, w_scale: torch.Tensor, channel_dim: int,
           quantized: bool):
    ref_f = ref_fn(None, 0)
    if not quantized:
        fast = fast_fn(None, 0)
        assert fast.dtype == torch.float32 and fast.shape == ref_f.shape
        shape = [1] * ref_f.dim()
        shape[channel_dim] = -1
        quanta = (fast - ref_f).abs() / (x_scale * w_scale).reshape(shape)
        assert quanta.max().item() <= 1.0
        return
    out_scale, out_zp = _qparams_for(ref_f)
    fast, ref = fast_fn(out_scale, out_zp), ref_fn(out_scale, out_zp)
    assert fast.dtype == torch.uint8 and fast.shape == ref.shape
    diff = (fast.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).sum().item() <= 1 + U8_LIMIT[op] * diff.numel()


@pytest.mark.parametrize("shape", [(1, 7, 5), (16, 64, 33), (2, 3, 40, 300)])
@pytest.mark.parametrize("activation", LINEAR_ACTS)
@pytest.mark.parametrize("quantized", [False, True], ids=["f32out", "u8out"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_reference(shape, activation, quantized, bias, kernel_path):
    gen = torch.Generator().manual_seed(_seed((shape, activation, quantized, bias)))
    *lead, k, n = shape
    x = torch.randint(0, 256, (*lead, k), dtype=torch.uint8, generator=gen)
    w_q, ws = _weights((n, k), gen)
    b = torch.randint(-5000, 5000, (n,), dtype=torch.int32, generator=gen) if bias else None
    xs, xz = 0.03, 131
    lin = PackedLinear(w_q, ws, b, xs, xz)
    _check("linear", lambda s, z: lin(x, activation, s, z),
           lambda s, z: R.linear(x, xs, xz, w_q, ws, b, activation, s, z), xs, ws, -1, quantized)


CONV2D = [  # (N, C, O, H, W, kernel, stride, padding, dilation, groups)
    (1, 8, 16, 9, 9, 3, 1, 1, 1, 1),
    (2, 16, 8, 12, 10, 3, 2, 0, 2, 1),
    (1, 16, 24, 8, 8, 3, 1, 1, 1, 4),
    (2, 24, 24, 10, 10, 3, 2, 1, 1, 24),  # depthwise
    (1, 32, 64, 7, 7, 1, 1, 0, 1, 1),
    (1, 3, 16, 23, 23, 7, 2, 3, 1, 1),  # stem
    (1, 8, 8, 9, 11, (3, 1), (2, 1), (1, 0), 1, 1),
]


@pytest.mark.parametrize("cfg", CONV2D, ids=lambda c: "x".join(map(str, c[:5])) + f"_k{c[5]}s{c[6]}g{c[9]}")
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("quantized", [False, True], ids=["f32out", "u8out"])
def test_conv2d_matches_reference(cfg, activation, quantized, kernel_path):
    nb, c, o, h, w, k, s, p, d, g = cfg
    gen = torch.Generator().manual_seed(_seed((cfg, activation, quantized)))
    kk = (k, k) if isinstance(k, int) else k
    x = torch.randint(0, 256, (nb, c, h, w), dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    w_q, ws = _weights((o, c // g, *kk), gen)
    b = torch.randint(-5000, 5000, (o,), dtype=torch.int32, generator=gen) if sum(cfg[:5]) % 2 else None
    xs, xz = 0.02, 97
    conv = PackedConv(w_q, ws, b, xs, xz, s, p, d, g)
    st, pd, dl = (s, s) if isinstance(s, int) else s, (p, p) if isinstance(p, int) else p, (d, d)
    op = "conv2d_depthwise" if g == c and g > 1 else "conv2d"
    _check(op, lambda so, zo: conv(x, activation, so, zo),
           lambda so, zo: R.conv(x, xs, xz, w_q, ws, b, st, pd, dl, g, activation, so, zo),
           xs, ws, 1, quantized)
    assert conv(x).is_contiguous(memory_format=torch.channels_last)


CONV1D = [(2, 8, 16, 50, 5, 2, 1, 1, 1), (1, 12, 12, 33, 3, 1, 2, 2, 12), (1, 4, 6, 20, 3, 1, "same", 1, 2)]


@pytest.mark.parametrize("cfg", CONV1D, ids=lambda c: f"c{c[1]}o{c[2]}k{c[4]}g{c[8]}")
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("quantized", [False, True], ids=["f32out", "u8out"])
def test_conv1d_matches_reference(cfg, activation, quantized, kernel_path):
    nb, c, o, length, k, s, p, d, g = cfg
    gen = torch.Generator().manual_seed(_seed((cfg, activation, quantized)))
    x = torch.randint(0, 256, (nb, c, length), dtype=torch.uint8, generator=gen)
    w_q, ws = _weights((o, c // g, k), gen)
    b = torch.randint(-5000, 5000, (o,), dtype=torch.int32, generator=gen)
    xs, xz = 0.05, 3
    conv = PackedConv(w_q, ws, b, xs, xz, s, p, d, g)
    pd = p if isinstance(p, str) else (p,)
    _check("conv1d", lambda so, zo: conv(x, activation, so, zo),
           lambda so, zo: R.conv(x, xs, xz, w_q, ws, b, (s,), pd, (d,), g, activation, so, zo),
           xs, ws, 1, quantized)


def _u8_diffs(fast: torch.Tensor, ref: torch.Tensor) -> tuple[int, int]:
    diff = (fast.int() - ref.int()).abs()
    assert int(diff.max()) <= 1
    return int((diff > 0).sum()), diff.numel()


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(U8_LIMIT))
def test_u8_tie_rate_per_op(op, kernel_path):
    """The per-op limit on ~1-2.5M requantized outputs (no activation: the highest rate)."""
    gen = torch.Generator().manual_seed(_seed(op))
    if op == "linear":
        x = torch.randint(0, 256, (2048, 512), dtype=torch.uint8, generator=gen)
        w_q, ws = _weights((512, 512), gen)
        b = torch.randint(-5000, 5000, (512,), dtype=torch.int32, generator=gen)
        so, zo = _qparams_for(R.linear(x, 0.03, 131, w_q, ws, b))
        differ, total = _u8_diffs(PackedLinear(w_q, ws, b, 0.03, 131)(x, "none", so, zo),
                                  R.linear(x, 0.03, 131, w_q, ws, b, "none", so, zo))
    else:
        shape, groups, k = {"conv2d": ((8, 64, 56, 56), 1, 3), "conv2d_depthwise": ((8, 96, 56, 56), 96, 3),
                            "conv1d": ((16, 64, 2000), 1, 3)}[op]
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        w_q, ws = _weights((shape[1], shape[1] // groups, *[k] * (x.dim() - 2)), gen)
        b = torch.randint(-5000, 5000, (shape[1],), dtype=torch.int32, generator=gen)
        ones = (1,) * (x.dim() - 2)
        so, zo = _qparams_for(R.conv(x, 0.02, 97, w_q, ws, b, ones, ones, ones, groups))
        differ, total = _u8_diffs(PackedConv(w_q, ws, b, 0.02, 97, 1, 1, 1, groups)(x, "none", so, zo),
                                  R.conv(x, 0.02, 97, w_q, ws, b, ones, ones, ones, groups, "none", so, zo))
    assert differ <= U8_LIMIT[op] * total, (op, differ, total)


def test_requantize_rounds_half_to_even(kernel_path):
    """acc / 2 hits every .5 tie (exact in both orders): oneDNN rounds them like the reference."""
    x = torch.arange(256, dtype=torch.uint8).reshape(-1, 1)
    w_q, ws = torch.ones(1, 1, dtype=torch.int8), torch.ones(1)
    lin = PackedLinear(w_q, ws, None, 1.0, 128)
    assert torch.equal(lin(x, "none", 2.0, 100), R.linear(x, 1.0, 128, w_q, ws, None, "none", 2.0, 100))


@pytest.mark.parametrize("numel", [7, 300_000])  # native or numpy, and the large torch path
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_uint8_refuses_non_finite_values(numel, bad):
    x = torch.randn(numel)
    x[numel // 2] = bad
    with pytest.raises(NonFiniteInputError):
        quantize_uint8(x, 0.1, 3)
    image = torch.randn(1, 3, 8, 8)
    image[0, 1, 2, 3] = bad
    with pytest.raises(NonFiniteInputError):
        quantize_uint8(image, 0.1, 3, channels_last=True)


def test_packing_independent_of_pack_shape(kernel_path):
    gen = torch.Generator().manual_seed(0)
    w_q, ws = _weights((16, 8, 3, 3), gen)
    x = torch.randint(0, 256, (3, 8, 13, 6), dtype=torch.uint8, generator=gen)
    a = PackedConv(w_q, ws, None, 0.1, 5, 1, 1, x_shape=[1, 8, 56, 56])(x)
    b = PackedConv(w_q, ws, None, 0.1, 5, 1, 1, x_shape=list(x.shape))(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(5,), (3, 384), (64, 1024), (2, 16, 30, 30)])
@pytest.mark.parametrize("zp", [0, 77, 255])
def test_quantize_uint8_bit_identical(shape, zp):
    gen = torch.Generator().manual_seed(len(shape) * 1000 + zp)
    scale = 0.013
    x = torch.randn(shape, generator=gen) * 2
    flat = x.view(-1)
    special = torch.tensor([0.0, -0.0, 0.5 * scale, 1.5 * scale, -2.5 * scale, 1e30, -1e30, 3e38, -3e38])
    flat[: min(flat.numel(), special.numel())] = special[: flat.numel()]
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    q = quantize_uint8(x, scale, zp)
    assert q.dtype == torch.uint8 and torch.equal(q, R.quantize_per_tensor(x, scale, zp))
    half = x.clamp(-6e4, 6e4).half()  # 1e30 is inf in float16
    assert torch.equal(quantize_uint8(half, scale, zp), R.quantize_per_tensor(half, scale, zp))
    if x.dim() == 4:  # an NCHW float input quantized straight into channels_last
        q_cl = quantize_uint8(x.contiguous(), scale, zp, channels_last=True)
        assert q_cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(q_cl, R.quantize_per_tensor(x, scale, zp))


_ISA_SCRIPT = ("from quanta.kernels import cpu; "
               "print(cpu.has_vnni(), cpu.exact_weight_limit(), cpu.isa_summary())")


@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE"])
def test_isa_cap_is_what_the_kernels_use(cap):
    """The CPU facts come from oneDNN's effective ISA (which reads the cap at start-up), so a
    capped process reports no VNNI and the 7-bit-exact limit, whatever /proc/cpuinfo says."""
    if not is_x86():
        pytest.skip("x86 ISA caps")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split(maxsplit=2)
    assert out[0] == "False" and out[1] == "64", out
    assert "exact for |w| <= 64" in out[2]


def test_dispatch_honours_request_and_rule(monkeypatch):
    info = {"kernel": (3, 3), "groups": 1, "in_channels": 64, "out_channels": 64}
    assert choose_backend("conv2d", info, "reference")[0] == "reference"
    assert choose_backend("conv2d", info, "onednn")[0] == "onednn"
    assert choose_backend("conv2d", info, "auto")[0] == "onednn"
    with pytest.raises(ValueError):
        choose_backend("conv2d", info, "cuda")
    stem = {"kernel": 3, "groups": 1, "in_channels": 3, "out_channels": 32}
    if has_vnni():  # end to end the int8 stem wins: the float path adds a dequantize + quantize
        assert choose_backend("conv2d", stem, "auto")[0] == "onednn"
    small = {"in_features": 384, "out_features": 384, "rows": 1}
    if not is_x86():
        return
    from quanta.kernels import dispatch
    from quanta.kernels.native import ops as native_ops

    monkeypatch.setattr(dispatch, "_profile", lambda: "vnni")
    assert choose_backend("linear", small, "auto")[0] == "float"  # M=1 384->384 on VNNI: int8 0.76x
    monkeypatch.setattr(dispatch, "_profile", lambda: "avx2")
    dw = {"kernel": (3, 3), "groups": 96, "in_channels": 96, "out_channels": 96}
    backend, reason = choose_backend("conv2d", dw, "auto")
    # alone int8 loses on AVX2, end to end it wins (no dequantize/quantize around a float op)
    assert backend == "onednn" and "depthwise" in reason and "end to end" in reason
    assert choose_backend("conv2d", stem, "auto")[0] == "onednn"
    linear = {"in_features": 384, "out_features": 384, "rows": 8}
    # M=8 on AVX2: int8 beats the float path it would otherwise take (53 vs 123 us, AMD EPYC), and
    # without the native kernels torch.ops.onednn's per-call primitive costs more than it saves
    assert choose_backend("linear", linear, "auto")[0] == ("onednn" if native_ops.available() else "float")
    assert choose_backend("linear", small, "auto")[0] == ("onednn" if native_ops.available() else "float")


def test_linear_break_even_depends_on_the_path_and_neighbours(monkeypatch):
    """Native kept primitives move the Linear break-even down (no per-call rebuild), and a
    Linear next to int8 data runs int8 there: the float path would add a (de)quantize pass."""
    from quanta.kernels import dispatch
    from quanta.kernels.native import ops as native_ops

    monkeypatch.setattr(dispatch, "_profile", lambda: "vnni")  # the VNNI rule, on any CPU
    monkeypatch.setattr(native_ops, "available", lambda: True)
    assert not dispatch.linear_prefers_int8(1, 384, 384)  # 147k MACs: int8 0.76x alone
    assert dispatch.linear_prefers_int8(1, 384, 1536)  # 590k MACs: 1.5x
    assert dispatch.linear_prefers_int8(1, 384, 384, int8_neighbour=True)
    monkeypatch.setattr(native_ops, "available", lambda: False)
    assert not dispatch.linear_prefers_int8(1, 384, 1536)  # torch.ops: ~2M MACs break-even
    assert not dispatch.linear_prefers_int8(1, 384, 384, int8_neighbour=True)
    assert dispatch.linear_prefers_int8(8, 512, 1000)
    monkeypatch.setattr(dispatch, "_profile", lambda: "avx2")  # the AVX2 rule
    assert not dispatch.linear_prefers_int8(8, 384, 384)  # torch.ops: rebuilds cost more
    monkeypatch.setattr(native_ops, "available", lambda: True)
    assert dispatch.linear_prefers_int8(1, 384, 384)  # kept primitives: int8 at every row count


_SATURATION_SCRIPT = textwrap.dedent("""
    import json, torch
    from quanta.kernels import cpu, reference as R
    from quanta.kernels.onednn import PackedConv, PackedLinear
    try:  # the gate refuses 8-bit weights here: bypass it to show what it protects from
        PackedLinear(torch.full((4, 4), 100, dtype=torch.int8), torch.ones(4), None, 1.0, 0)
        gate = "open"
    except cpu.WeightRangeError:
        gate = "closed"
    cpu.require_exact_weights = lambda w, what="": w
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 256), dtype=torch.uint8, generator=g)
    xc = torch.randint(0, 256, (1, 32, 12, 12), dtype=torch.uint8, generator=g)
    ws, wsc = torch.full((64,), 0.01), torch.full((16,), 0.01)
    out = {}
    for bits in (8, 7):
        hi = 2 ** (bits - 1)
        w = torch.randint(-hi, hi, (64, 256), dtype=torch.int8, generator=g)
        wc = torch.randint(-hi, hi, (16, 32, 3, 3), dtype=torch.int8, generator=g)
        ref = R.linear(x, 0.02, 10, w, ws, None)
        y = PackedLinear(w, ws, None, 0.02, 10)(x)
        refc = R.conv(xc, 0.02, 10, wc, wsc, None, (1, 1), (1, 1), (1, 1), 1)
        yc = PackedConv(wc, wsc, None, 0.02, 10, 1, 1)(xc)
        out[bits] = {"linear_rel": float((y - ref).abs().max() / ref.abs().max()),
                     "linear_quanta": float((y - ref).abs().max() / (0.02 * 0.01)),
                     "conv_rel": float((yc - refc).abs().max() / refc.abs().max()),
                     "conv_quanta": float((yc - refc).abs().max() / (0.02 * 0.01))}
    out["gate"] = gate
    print(json.dumps(out))
""")


@pytest.mark.skipif(not is_x86() or not torch.cpu._is_avx2_supported(), reason="needs an x86 AVX2 CPU")
def test_avx2_without_vnni_saturates_full_range_weights():
    """Under ONEDNN_MAX_CPU_ISA=AVX2, 8-bit weights overflow vpmaddubsw (with the gate bypassed;
    it refuses them); 7-bit weights are exact."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", _SATURATION_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert any("isa:Intel AVX2" in ln and "VNNI" not in ln for ln in lines), "ISA cap not applied"
    impls = [ln for ln in lines if ",exec,cpu," in ln and ("matmul" in ln or "convolution" in ln)]
    assert impls and not any("avx512" in ln or "amx" in ln or "vnni" in ln for ln in impls)
    res = json.loads(next(ln for ln in lines if ln.startswith("{")))
    assert res["gate"] == "closed"
    assert res["8"]["linear_rel"] > 0.02 and res["8"]["conv_rel"] > 0.02  # saturated: wrong
    assert res["7"]["linear_quanta"] <= 1.0 and res["7"]["conv_quanta"] <= 1.0  # exact
