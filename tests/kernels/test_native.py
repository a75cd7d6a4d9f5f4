"""quanta's native kernels (kernels/native): kept oneDNN primitives, the C add, the loader.

The shared per-op tolerance tests run on this path too (test_onednn.py, ``kernel_path``).
Here: what only the native path has. Zero-point-free primitives (no weight compensation)
and per-shape primitive caching must give the reference's integers. Without a bias and with an
even output zero point the single-multiplier epilogue is the reference bit for bit; oneDNN adds
the output zero point before rounding, so with an odd one a .5 tie (~5e-6 of outputs) rounds
the other way, as on torch.ops. The C add is used only where it equals the reference on all
65536 input pairs.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quanta.kernels import eltwise, native
from quanta.kernels import reference as R
from quanta.kernels.cpu import weight_bits_for_cpu

if native.load() is None:
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}", allow_module_level=True)

from quanta.kernels.native.ops import NativeConv2d, NativeLinear  # noqa: E402

pytestmark = pytest.mark.isa  # run natively and under scripts/as-avx2 (.ci/run)


def _w(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    hi = 2 ** (weight_bits_for_cpu() - 1)
    return (torch.randint(-hi, hi, shape, dtype=torch.int8, generator=gen),
            torch.rand(shape[0], generator=gen) * 0.02 + 0.001)


def _out_qparams(y: torch.Tensor, zero: bool) -> tuple[float, int]:
    lo, hi = (0.0 if zero else min(float(y.min()), 0.0)), max(float(y.max()), 1e-3)
    scale = (hi - lo) * 0.9 / 255
    return scale, 0 if zero else int(round(-lo / scale))


@pytest.mark.parametrize("x_zp", [0, 113])
@pytest.mark.parametrize("out_zp_zero", [True, False], ids=["out_zp0", "out_zp"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("groups", [1, 4, 32])
def test_conv_zero_points_exact_without_bias(x_zp, out_zp_zero, activation, groups):
    gen = torch.Generator().manual_seed(x_zp + 7 * groups + len(activation))
    x = torch.randint(0, 256, (2, 32, 11, 13), dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    w, ws = _w((32, 32 // groups, 3, 3), gen)
    ref_f = R.conv(x, 0.02, x_zp, w, ws, None, (2, 1), (1, 1), (1, 2), groups, activation)
    so, zo = _out_qparams(ref_f, out_zp_zero)
    conv = NativeConv2d(w, ws, None, 0.02, x_zp, [2, 1], [1, 1], [1, 2], groups)
    y = conv(x, activation, so, zo)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = R.conv(x, 0.02, x_zp, w, ws, None, (2, 1), (1, 1), (1, 2), groups, activation, so, zo)
    diff = (y.int() - ref.int()).abs()
    assert diff.max() <= (0 if zo % 2 == 0 else 1) and (diff != 0).sum() <= 1 + 2e-5 * diff.numel()
    assert torch.allclose(conv(x, activation), ref_f, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x_zp", [0, 131])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu", "hardswish", "sigmoid",
                                        "hardsigmoid"])
def test_linear_rows_and_zero_points(x_zp, activation):
    gen = torch.Generator().manual_seed(x_zp + len(activation))
    w, ws = _w((48, 40), gen)
    lin = NativeLinear(w, ws, None, 0.03, x_zp)
    sample = torch.randint(0, 256, (64, 40), dtype=torch.uint8, generator=gen)
    so, zo = _out_qparams(R.linear(sample, 0.03, x_zp, w, ws, None, activation), activation == "relu")
    for rows in (1, 5, 64, 5):  # a new primitive per row count, the kept one again for 5
        x = torch.randint(0, 256, (rows, 40), dtype=torch.uint8, generator=gen)
        ref_f = R.linear(x, 0.03, x_zp, w, ws, None, activation)
        ref = R.linear(x, 0.03, x_zp, w, ws, None, activation, so, zo)
        diff = lin(x, activation, so, zo).int() - ref.int()
        assert diff.abs().max() <= (0 if zo % 2 == 0 and activation in ("none", "relu") else 1)
        assert (diff != 0).sum() <= 1 + 2e-5 * diff.numel()
        assert torch.allclose(lin(x, activation), ref_f, rtol=1e-5, atol=1e-5)
    assert len(lin.handles.items) == 6  # 3 row counts x (float, uint8 output)


def test_dynamic_runtime_scale_matches_reference():
    """Dynamic mode: one primitive, input scale and zero point passed per call."""
    gen = torch.Generator().manual_seed(3)
    w, ws = _w((24, 64), gen)
    bias = torch.randn(24, generator=gen)
    lin = NativeLinear(w, ws, bias_float=bias)
    for scale, zp in [(0.01, 0), (0.05, 200), (0.3, 17)]:
        x = torch.randint(0, 256, (7, 64), dtype=torch.uint8, generator=gen)
        ref = R.linear_dynamic(x, scale, zp, w, ws, bias)
        assert torch.allclose(lin(x, x_scale=scale, x_zero_point=zp), ref, rtol=1e-5, atol=1e-5)
    assert len(lin.handles.items) == 1


def test_primitives_are_kept_per_shape_and_evicted(monkeypatch):
    from quanta.kernels.native import ops

    monkeypatch.setattr(ops, "_MAX_SHAPES", 2)
    gen = torch.Generator().manual_seed(0)
    w, ws = _w((8, 4, 3, 3), gen)
    conv = NativeConv2d(w, ws, None, 0.1, 5, [1, 1], [1, 1], [1, 1], 1)
    for size in (6, 7, 8, 6):
        x = torch.randint(0, 256, (1, 4, size, size), dtype=torch.uint8, generator=gen)
        ref = R.conv(x, 0.1, 5, w, ws, None, (1, 1), (1, 1), (1, 1), 1, "none", 0.2, 3)
        assert torch.equal(conv(x, "none", 0.2, 3), ref)
    assert [k[0][2] for k in conv.handles.items] == [8, 6]


def test_bad_activation_names_the_problem():
    gen = torch.Generator().manual_seed(0)
    w, ws = _w((8, 4), gen)
    with pytest.raises(ValueError, match="unsupported activation 'swish'"):
        NativeLinear(w, ws, None, 0.1, 0)(torch.zeros(1, 4, dtype=torch.uint8), "swish")


def test_input_sizes_that_do_not_fit_the_weights_are_refused():
    """Wrong channels or features would read the weights out of bounds or mix up rows."""
    gen = torch.Generator().manual_seed(0)
    w, ws = _w((8, 4, 3, 3), gen)
    conv = NativeConv2d(w, ws, None, 0.1, 5, [1, 1], [1, 1], [1, 1], 2)  # 2 groups: 8 channels in
    with pytest.raises(ValueError, match="expected NCHW with 8 channels"):
        conv(torch.zeros(1, 4, 6, 6, dtype=torch.uint8))
    assert conv(torch.zeros(1, 8, 6, 6, dtype=torch.uint8)).shape == (1, 8, 6, 6)
    lw, lws = _w((8, 4), gen)
    with pytest.raises(ValueError, match="expected 4 features last"):
        NativeLinear(lw, lws, None, 0.1, 0)(torch.zeros(4, 1, dtype=torch.uint8))


@pytest.mark.parametrize("numerics", R.NUMERICS)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_add_equals_reference(activation, layout, numerics):
    gen = torch.Generator().manual_seed(len(activation) + len(layout))
    shape = (2, 24, 17, 9)
    a, b = (torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen) for _ in range(2))
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    qp = (0.05, 120, 0.07, 131, 0.09, 50)
    assert eltwise._native_add(*qp, activation, numerics) is not None
    y = eltwise.add_uint8(a, *qp[:2], b, *qp[2:4], *qp[4:], activation, numerics)
    assert torch.equal(y, R.add(a, *qp[:2], b, *qp[2:4], *qp[4:], activation, numerics))
    assert y.stride() == a.stride()


@pytest.mark.parametrize("numerics", R.NUMERICS)
def test_native_add_not_used_where_it_differs(monkeypatch, numerics):
    """The exhaustive check rejects a kernel that differs on even one pair."""
    lib = native.load()

    def off(kernel):  # the real kernel, then its first output changed by one
        def run(a, b, y, n, *args):
            getattr(lib, kernel)(a, b, y, n, *args)
            ctypes.memset(y, ctypes.string_at(y, 1)[0] ^ 1, 1)
        return run

    class Off:
        qk_add_u8, qk_add_fixed_u8 = staticmethod(off("qk_add_u8")), staticmethod(off("qk_add_fixed_u8"))

    monkeypatch.setattr(native, "load", lambda: Off())
    qp = (0.031, 3, 0.029, 250, 0.05, 9, "none")
    assert eltwise._native_add(*qp, numerics) is None
    a = torch.randint(0, 256, (70000,), dtype=torch.uint8)
    got = eltwise.add_uint8(a, *qp[:2], a, *qp[2:], numerics)
    assert torch.equal(got, R.add(a, *qp[:2], a, *qp[2:], numerics))


def test_elf_reader_rejects_non_elf_and_missing_names(tmp_path):
    bogus = tmp_path / "libnot.so"
    bogus.write_bytes(b"not an elf file" * 10)
    with pytest.raises(OSError, match="not a 64-bit ELF"):
        native._elf_symbols(bogus, ["dnnl_version"])
    torch_lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    missing, found = native._elf_symbols(torch_lib, ["quanta_no_such_function", "dnnl_version"])
    assert missing == 0 and found > 0


def _linear_in_fresh_process(**env: str) -> str:
    """A tiny PackedLinear run in a new process with ``env``: prints the reason the native kernels
    are unavailable, the layer's native kernel and its output."""
    code = ("import torch; from quanta.kernels import native, onednn;"
            "w = torch.ones(4, 3, dtype=torch.int8); p = onednn.PackedLinear(w, torch.ones(4), None, 1.0, 0);"
            "y = p(torch.ones(2, 3, dtype=torch.uint8), 'none', 1.0, 0);"
            "print(native.unavailable_reason(), '|', p.native, '|', y.tolist())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_disabled_by_environment_falls_back_to_torch_ops():
    out = _linear_in_fresh_process(QUANTA_NATIVE="0")
    assert out == "disabled by QUANTA_NATIVE=0 | None | [[3, 3, 3, 3], [3, 3, 3, 3]]"


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((1, 64, 112, 112), 3, 2, 1),  # ResNet stem pool, large enough to run threaded
    ((2, 16, 28, 28), 2, 2, 0), ((1, 8, 9, 11), 3, 1, 1), ((3, 5, 7, 7), (2, 3), (1, 2), (1, 1)),
])
def test_native_max_pool_equals_torch(shape, kernel, stride, padding):
    from quanta.kernels.pooling import _max_pool2d_int

    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    y = _max_pool2d_int(x, kernel, stride, padding)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.nn.functional.max_pool2d(x.float(), kernel, stride, padding).to(torch.uint8))


@pytest.mark.parametrize("shape,channels_last", [
    ((1, 3, 224, 224), True), ((8, 3, 64, 64), True), ((1, 1, 28, 28), True), ((5, 384), False),
    ((128, 1536), False), ((2, 64, 56, 56), False),
])
@pytest.mark.parametrize("zero_point", [0, 117, 255])
def test_native_quantize_equals_reference(shape, channels_last, zero_point):
    from quanta.kernels.onednn import quantize_uint8

    gen = torch.Generator().manual_seed(zero_point + sum(shape))
    x = torch.randn(shape, generator=gen) * 3
    x.view(-1)[:4] = torch.tensor([0.5, 1.5, -2.5, 1e9]) * 0.0213  # exact .5 ties and a clamp
    y = quantize_uint8(x, 0.0213, zero_point, channels_last)
    assert torch.equal(y, R.quantize_per_tensor(x, 0.0213, zero_point))
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_native_adaptive_avg_pool_equals_float_path():
    """Same integers as QTensor's float rule (average of q - zp, round half even, + zp) on
    random shapes, including uneven adaptive windows."""
    import torch.nn.functional as F

    from quanta.qtensor import QTensor

    gen = torch.Generator().manual_seed(11)
    for _ in range(40):
        c, h, w = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 40), (1, 20), (1, 20)))
        oh, ow = (int(torch.randint(1, d + 1, (), generator=gen)) for d in (h, w))
        zp = int(torch.randint(0, 256, (), generator=gen))
        x = torch.randint(0, 256, (2, c, h, w), dtype=torch.uint8, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        y = F.adaptive_avg_pool2d(QTensor(x, 0.1, zp), (oh, ow))
        want = torch.clamp(torch.round(F.adaptive_avg_pool2d(x.float() - zp, (oh, ow))) + zp, 0, 255)
        assert torch.equal(y.int_data, want.to(torch.uint8))


def test_concurrent_calls_from_threads_agree():
    """ctypes releases the GIL: several Python threads running the same kept primitives must
    get the serial results (the C side runs one op at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(5)
    w, ws = _w((32, 16, 3, 3), gen)
    conv = NativeConv2d(w, ws, None, 0.05, 7, [1, 1], [1, 1], [1, 1], 1)
    lw, lws = _w((24, 64), gen)
    lin = NativeLinear(lw, lws, bias_float=torch.randn(24, generator=gen))
    xs = [torch.randint(0, 256, (2, 16, 12, 12), dtype=torch.uint8, generator=gen) for _ in range(8)]
    rows = [torch.randint(0, 256, (5, 64), dtype=torch.uint8, generator=gen) for _ in range(8)]

    def work(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = conv(xs[i % 8], "relu", 0.3, 3)
        return y, lin(rows[i % 8], x_scale=0.01 * (1 + i % 8), x_zero_point=i % 8)

    serial = [work(i) for i in range(64)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(work, range(64)))
    for a, b in zip(serial, threaded, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("shape", [(3,), (1, 384), (128, 384), (4, 128, 1536)])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 50.0])
def test_native_dynamic_quantization_equals_numpy_and_reference(shape, spread):
    from quanta.kernels import dynamic as kd

    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen) * spread + 0.3 * spread
    q, scale, zp = kd._quantize_tensor_native(native.load(), x)
    q_np, scale_np, zp_np = kd._quantize_tensor(x.numpy())
    assert (scale, zp) == (scale_np, zp_np) and torch.equal(q, torch.from_numpy(q_np))
    assert torch.equal(q, R.quantize_dynamic_input(x, scale, zp))
    n = x.numel()
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in sorted({0, n // 2, n - 1}):  # in the vector scan's body and in its tail
            y = x.clone()
            y.view(-1)[where] = bad
            with pytest.raises(kd.NonFiniteInputError):
                kd._quantize_tensor_native(native.load(), y)


def test_unwritable_cache_falls_back_with_the_reason():
    """No place to build the library: quanta says why and runs through torch.ops (same results)."""
    out = _linear_in_fresh_process(QUANTA_CACHE_DIR="/proc/quanta-cache-cannot-exist")
    reason, kernel, output = out.split(" | ")
    assert reason != "None" and kernel == "None" and output == "[[3, 3, 3, 3], [3, 3, 3, 3]]"


@pytest.mark.parametrize("batch_gate", [True, False], ids=["gate_per_sample", "gate_shared"])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_native_channel_gate_mul_equals_reference(batch_gate, activation):
    """The squeeze-excite multiply (uint8 NHWC activation times a float channel gate, requantized)
    in one native pass, bit for bit the reference, on every uint8 value and random gates."""
    gen = torch.Generator().manual_seed(int(batch_gate) * 2 + len(activation))
    a = torch.arange(256, dtype=torch.uint8).repeat(2 * 3).reshape(2, 3, 16, 16)
    a = a.contiguous(memory_format=torch.channels_last)
    gate = torch.rand(2 if batch_gate else 1, 3, 1, 1, generator=gen) * 2 - 0.5
    for qparams in [(0.05, 128, 0.04, 100), (0.013, 7, 0.02, 0), (0.5, 250, 0.11, 200)]:
        sa, za, sy, zy = qparams
        ref = R.mul(a, sa, za, gate, sy, zy, activation)
        got = eltwise.mul_uint8(a, sa, za, gate, sy, zy, activation)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, ref), qparams


@pytest.mark.parametrize("cfg", [(13, 3, 2, 0), (14, 3, 2, 1), (55, 3, 2, 0), (7, 2, 2, 0), (8, 3, 3, 1)])
def test_native_max_pool_ceil_mode_equals_torch(cfg):
    """SqueezeNet/Inception pool with ceil_mode: windows hanging over the edge skip the taps outside."""
    from quanta.kernels.pooling import max_pool_data

    h, k, s, p = cfg
    gen = torch.Generator().manual_seed(h * 10 + k)
    x = torch.randint(0, 256, (2, 5, h, h + 1), dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    got = max_pool_data(torch.nn.functional.max_pool2d, x, (k, s, p), {"ceil_mode": True})
    want = torch.nn.functional.max_pool2d(x.float(), k, s, p, ceil_mode=True).to(torch.uint8)
    assert torch.equal(got, want)


def _near_ties(scale: float, count: int, gen: torch.Generator) -> torch.Tensor:
    """Floats whose quotient by ``scale`` sits on or a few ulps from a half-integer: where a
    multiply by 1/scale and the division can round to different integers."""
    k = torch.randint(-300, 300, (count,), generator=gen).double() + 0.5
    x = (k * scale).float()
    steps = torch.randint(-4, 5, (count,), generator=gen, dtype=torch.int32)
    bits = x.view(torch.int32) + steps  # ulp steps away from the tie (same sign, finite)
    return bits.view(torch.float32)


@pytest.mark.parametrize("scale", [0.0213, 0.1, 1.0 / 3.0, 0.007843137718737125, 3.7e-5])
def test_native_quantize_is_exact_at_near_ties(scale):
    """The quantize pass divides as the reference does: equal to it on values a few ulps from
    every tie, both layouts."""
    from quanta.kernels.onednn import quantize_uint8

    gen = torch.Generator().manual_seed(int(scale * 1e6))
    x = _near_ties(scale, 3 * 64 * 64, gen)
    for zp in (0, 128):
        assert torch.equal(quantize_uint8(x, scale, zp), R.quantize_per_tensor(x, scale, zp))
        image = x.reshape(1, 3, 64, 64)
        got = quantize_uint8(image, scale, zp, channels_last=True)
        assert torch.equal(got, R.quantize_per_tensor(image, scale, zp))


@pytest.mark.parametrize("scale", [0.0213, 1.0 / 3.0, 3.7e-5])
@pytest.mark.parametrize("path", ["native", "numpy", "torch"])
def test_quantize_with_xnnpack_numerics_at_near_ties(scale, path, monkeypatch):
    """numerics="xnnpack" quantizes as ``round(x * f32(1 / s))`` in every path (the C pass, and
    the numpy and torch fallbacks without it): equal to its reference next to every tie, where it
    differs from the division (ONNX Runtime's) on a few values."""
    from quanta.kernels import onednn
    from quanta.kernels.onednn import quantize_uint8

    if path != "native":
        monkeypatch.setattr(onednn.native, "load", lambda: None)
    gen = torch.Generator().manual_seed(int(scale * 1e6))
    count = 300_000 if path == "torch" else 3 * 64 * 64  # above / below the numpy path's limit
    x = _near_ties(scale, count, gen)
    for zp in (0, 128):
        want = R.quantize_per_tensor(x, scale, zp, numerics="xnnpack")
        assert torch.equal(quantize_uint8(x, scale, zp, numerics="xnnpack"), want)
        image = x[: 3 * 64 * 64].reshape(1, 3, 64, 64)
        got = quantize_uint8(image, scale, zp, channels_last=True, numerics="xnnpack")
        assert torch.equal(got, R.quantize_per_tensor(image, scale, zp, numerics="xnnpack"))
        assert got.is_contiguous(memory_format=torch.channels_last)
        differ = (want != R.quantize_per_tensor(x, scale, zp)).float().mean()
        assert 0.005 < differ < 0.05  # measured 1.0-2.4 % of these near-tie values


def test_native_channel_gate_mul_is_exact_at_near_ties():
    """The squeeze-excite multiply's quotient by the output scale, at products a few ulps from a
    tie (gate = 1, so the product is the dequantized input itself)."""
    sy = 0.0213
    sa = sy / 2  # every odd input lands on a half-integer of the output scale
    a = torch.arange(256, dtype=torch.uint8).repeat(4).reshape(1, 1024, 1, 1)
    a = a.contiguous(memory_format=torch.channels_last)
    ones = torch.ones(1, 1024, 1, 1)
    gates = ones.view(torch.int32) + torch.randint(-3, 4, ones.shape, dtype=torch.int32,
                                                   generator=torch.Generator().manual_seed(5))
    for gate in (ones, gates.view(torch.float32)):
        for za, zy in ((0, 0), (128, 100)):
            ref = R.mul(a, sa, za, gate, sy, zy)
            assert torch.equal(eltwise.mul_uint8(a, sa, za, gate, sy, zy), ref)


@pytest.mark.parametrize("channels", [40, 96, 672])
def test_native_channel_gate_vector_loops_equal_reference_on_random_products(channels):
    """The squeeze-excite multiply's division-free vector loops (AVX2: 32 channels per step,
    AVX-512: 16, a scalar tail) and their exact division where a quotient is near a half-integer
    or large: random inputs, gates and qparams, every element the reference's."""
    gen = torch.Generator().manual_seed(channels)
    for trial in range(6):
        a = torch.randint(0, 256, (2, channels, 5, 7), dtype=torch.uint8, generator=gen)
        a = a.contiguous(memory_format=torch.channels_last)
        gate = torch.rand(2, channels, 1, 1, generator=gen) * 3 - 1
        sa = float(torch.rand(1, generator=gen)) * 0.1 + 1e-3
        sy = sa / 1000 if trial == 5 else float(torch.rand(1, generator=gen)) * 0.1 + 1e-3  # |q| > 512
        za, zy = (int(v) for v in torch.randint(0, 256, (2,), generator=gen))
        want = R.mul(a, sa, za, gate, sy, zy)
        assert torch.equal(eltwise.mul_uint8(a, sa, za, gate, sy, zy), want), (trial, sa, sy)


@pytest.mark.parametrize("batch_gate", [True, False], ids=["gate_per_sample", "gate_shared"])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_channel_gate_with_uint8_gate_equals_the_float_gate_path(batch_gate, activation):
    """The graph runtime's squeeze-excite multiply takes the uint8 gate and dequantizes it in C:
    equal to dequantizing it in torch and the float-gate multiply, on every uint8 input value;
    a layout the kernel does not take (NCHW input) falls back to that same path."""
    from quanta.modules.lowering import _dq

    gen = torch.Generator().manual_seed(17 + int(batch_gate))
    a = torch.arange(256, dtype=torch.uint8).repeat(2 * 40).reshape(2, 40, 16, 16)
    a_cl = a.contiguous(memory_format=torch.channels_last)
    gate = torch.randint(0, 256, (2 if batch_gate else 1, 40, 1, 1), dtype=torch.uint8, generator=gen)
    gate = gate.contiguous(memory_format=torch.channels_last)
    for sa, za, sg, zg, sy, zy in [(0.05, 128, 0.0039, 0, 0.04, 100), (0.013, 7, 0.0026, 3, 0.02, 0)]:
        want = eltwise.mul_uint8(a_cl, sa, za, _dq(gate, sg, zg), sy, zy, activation)
        run = eltwise.ChannelGate(sa, za, sg, zg, sy, zy, activation)
        got = run(a_cl, gate)
        assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
        assert torch.equal(run(a, gate), want)  # the fallback


def test_bound_conv_follows_input_shape_and_layout_changes():
    """The graph runtime's conv keeps the primitive of the last input shape: a call at another
    shape, or with an NCHW input, takes the general path and still equals the unbound conv."""
    from quanta.kernels.native.ops import BoundConv2d, NativeConv2d

    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-100, 100, (8, 4, 3, 3), dtype=torch.int8, generator=gen)
    bias = torch.randint(-500, 500, (8,), dtype=torch.int32, generator=gen)
    conv = NativeConv2d(w, torch.rand(8, generator=gen) / 50, bias, 0.02, 3, [1, 1], [1, 1], [1, 1], 1)
    bound = BoundConv2d(conv, "relu", 0.05, 7)
    shapes = [(1, 4, 9, 9), (2, 4, 6, 5), (1, 4, 9, 9), (1, 4, 9, 9)]
    for i, shape in enumerate(shapes):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        if i != 3:
            x = x.contiguous(memory_format=torch.channels_last)
        got, want = bound(x), conv(x, "relu", 0.05, 7)
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert bound.last is not None and bound.last[0] == shapes[-1]


@pytest.mark.parametrize("shape", [(1, 32, 112, 112), (3, 96, 40, 40), (2, 7, 150, 151)])
def test_native_global_avg_pool_splits_pixels_exactly(shape):
    """Global pooling of a large map (a squeeze-excite input) sums each thread's pixels exactly in
    int32: the same integers as the float rule, on images where every tie and clamp can occur."""
    import torch.nn.functional as F

    from quanta.qtensor import QTensor

    gen = torch.Generator().manual_seed(shape[1])
    for zp in (0, 131, 255):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        y = F.adaptive_avg_pool2d(QTensor(x, 0.1, zp), 1)
        want = torch.clamp(torch.round(F.adaptive_avg_pool2d(x.float() - zp, 1)) + zp, 0, 255)
        assert torch.equal(y.int_data, want.to(torch.uint8))


@pytest.mark.parametrize("shape", [(1, 512, 7, 7), (4, 96, 40, 40)])
def test_global_avg_pool2d_window_equals_the_float_rule(shape):
    """``F.avg_pool2d`` whose kernel covers the whole map (ResNet's final pool) runs as the native
    global pool: the same integers as torch's float average of q - zp."""
    import torch.nn.functional as F

    from quanta.qtensor import QTensor

    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    k = shape[2:]
    for zp in (0, 77):
        for stride in (1, None):
            y = F.avg_pool2d(QTensor(x, 0.1, zp), k, stride)
            want = torch.clamp(torch.round(F.avg_pool2d(x.float() - zp, k, stride)) + zp, 0, 255)
            assert y.shape == want.shape and torch.equal(y.int_data, want.to(torch.uint8))


@pytest.mark.parametrize("channels", [3, 96, 1280, 4100])
def test_native_average_pools_sum_in_blocks_exactly(channels):
    """Global and adaptive average pooling sum raw uint8 values in uint16 blocks of up to 256
    pixels, four at a time, and take the zero point off at the end: equal to the float path on
    maps whose pixel counts cross the block size (and above 4096 channels, the plain loop)."""
    import torch.nn.functional as F

    from quanta.kernels.pooling import avg_pool_data

    gen = torch.Generator().manual_seed(channels)
    cases = [(2, 23, 19, 1, 0), (1, 17, 16, 1, 255), (2, 21, 30, (3, 4), 128), (1, 2, 3, 1, 7)]
    for n, h, w, out, zp in cases:
        a = torch.randint(0, 256, (n, channels, h, w), dtype=torch.uint8, generator=gen)
        a = a.contiguous(memory_format=torch.channels_last)
        want = torch.round(F.adaptive_avg_pool2d(a.float() - zp, out)) + zp
        want = torch.clamp(want, 0, 255).to(torch.uint8)
        assert torch.equal(avg_pool_data(F.adaptive_avg_pool2d, a, zp, (out,), {}), want), (n, h, w, out, zp)
