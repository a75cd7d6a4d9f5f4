"""Integer-exact reference kernels: the specification every fast kernel is tested against.

Accumulation is exact int32: products of integer-valued float64 tensors are exact while the
sum stays below 2^53, far above the int32 range an int8 accumulator may reach.

Requantization is the classic integer-inference form (gemmlowp, fbgemm, ONNX Runtime), so
an exported QDQ model runs bit for bit like this reference in ONNX Runtime:
- conv / linear: ``clamp(round_half_even(f32(acc) * M[c]) + zp_y)`` with ONE float32
  multiplier per output channel ``M[c] = f32(f32(s_x * s_w[c]) / s_y)``; the int32 bias is in
  ``acc``; a fused ReLU / ReLU6 is a clamp on the integers.
- add: float32 scale ratios ``r_a = s_a / s_y``, ``r_b = s_b / s_y`` with the zero points
  folded into one constant, each multiply-add rounded once (fused multiply-add, as ONNX
  Runtime's x86 QLinearAdd): ``round_half_even(a * r_a + (b * r_b + k))``.
- ``numerics="xnnpack"`` (``NUMERICS``) swaps in XNNPACK's two differences, so an ExecuTorch .pte
  runs bit for bit like the reference: float inputs quantized by a reciprocal multiply, adds in
  fixed point (:func:`add_fixed_point`).
oneDNN scales the accumulator and adds a float bias in its own order: its uint8 outputs differ
from these at about 1e-6 of elements (ties), by one LSB (tests/kernels/test_onednn.py).

Conventions: activations are per-tensor (python float scale, int zero point); weights are
symmetric per output channel (float32 scale vector, zero points all 0); bias is int32 at
scale ``x_scale * w_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "relu6", "gelu", "gelu_tanh", "silu", "hardswish", "sigmoid", "hardsigmoid")
CLAMP_ACTIVATIONS = ("none", "relu", "relu6")  # exact as integer clamps; GELU is not


#: whose int8 rounding a model reproduces bit for bit (``QuantConfig.numerics``). "onnxruntime":
#: float inputs quantized as ``round(x / s)``, adds in float32 multiply-adds, ties to even (ONNX
#: Runtime's QuantizeLinear and QLinearAdd). "xnnpack": float inputs quantized as
#: ``round(x * f32(1 / s))`` and adds in fixed point, ties up (:func:`add_fixed_point`), as an
#: ExecuTorch .pte runs them. The two differ by one LSB on ~1e-6 of float inputs and ~2e-5 of
#: add input pairs; everything else (conv/linear requantization, pooling) is the same in both.
NUMERICS = ("onnxruntime", "xnnpack")


def quantize_per_tensor(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int = 0, qmax: int = 255,
    dtype: torch.dtype = torch.uint8, numerics: str = "onnxruntime",
) -> torch.Tensor:
    """clamp(round_half_even(x / scale) + zero_point, qmin, qmax), in float32; with
    ``numerics="xnnpack"`` ``x * f32(1 / scale)`` instead of the division."""
    x = x.float()
    y = x * reciprocal(scale) if numerics == "xnnpack" else x / scale
    return torch.clamp(torch.round(y) + zero_point, qmin, qmax).to(dtype)


def reciprocal(scale: float) -> float:
    """``f32(1 / f32(scale))`` as a python float: XNNPACK's quantization multiplier."""
    return float(torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32))


def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point) * scale


def quantize_bias(bias: torch.Tensor, x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """Float bias -> int32 at scale x_scale * w_scale (per output channel), saturated (never
    wrapped) at the int32 limits."""
    q = torch.round(bias.double() / (x_scale * w_scale.double()))
    return q.clamp(-(2**31), 2**31 - 1).to(torch.int32)


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """A fused activation (one of ``ACTIVATIONS``) on float values; differentiable."""
    if activation == "relu":
        return torch.relu(y)
    if activation == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    if activation == "hardswish":
        return F.hardswish(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "hardsigmoid":
        return F.hardsigmoid(y)
    return y


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def requantize_multiplier(x_scale: float, w_scale: torch.Tensor, out_scale: float) -> torch.Tensor:
    """Per-channel float32 ``f32(f32(x_scale * w_scale) / out_scale)``: one multiplier takes the
    int32 accumulator straight to output quanta (one rounding instead of two)."""
    return (_f32(x_scale) * w_scale.float()) / _f32(out_scale)


def activation_bounds(
    activation: str, out_scale: float, out_zero_point: int, qmin: int = 0, qmax: int = 255
) -> tuple[int, int]:
    """Integer clamp [lo, hi] of a fused activation at the output qparams: ReLU is
    ``q >= zp``, ReLU6 also ``q <= quantize(6.0)``; equal to activating then quantizing."""
    lo, hi = qmin, qmax
    if activation in ("relu", "relu6"):
        lo = max(qmin, out_zero_point)
    if activation == "relu6":
        six = int(quantize_per_tensor(_f32(6.0), out_scale, out_zero_point, qmin, qmax, torch.int32))
        hi = min(qmax, six)
    elif activation not in CLAMP_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not an integer clamp; expected one of "
                         f"{CLAMP_ACTIVATIONS}")
    return lo, hi


def epilogue(
    acc: torch.Tensor,
    x_scale: float,
    w_scale: torch.Tensor,
    channel_dim: int,
    activation: str = "none",
    out_scale: float | None = None,
    out_zero_point: int = 0,
    out_qmin: int = 0,
    out_qmax: int = 255,
) -> torch.Tensor:
    """int32 accumulator -> float32 ``acc * f32(x_scale * w_scale)`` (activated), or with
    ``out_scale`` uint8 ``clamp(round_half_even(acc * M) + zp)``, M = requantize_multiplier."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    if out_scale is None or activation not in CLAMP_ACTIVATIONS:
        # float output; or GELU, which is not an integer clamp: activate the float, then quantize
        y = apply_activation(acc.to(torch.float32) * (x_scale * w_scale.float()).reshape(shape), activation)
        if out_scale is None:
            return y
        return quantize_per_tensor(y, out_scale, out_zero_point, out_qmin, out_qmax)
    multiplier = requantize_multiplier(x_scale, w_scale, out_scale).reshape(shape)
    lo, hi = activation_bounds(activation, out_scale, out_zero_point, out_qmin, out_qmax)
    q = torch.round(acc.to(torch.float32) * multiplier) + out_zero_point
    return torch.clamp(q, lo, hi).to(torch.uint8)


def linear_accumulate(
    x_q: torch.Tensor, x_zero_point: int, w_q: torch.Tensor, bias_i32: torch.Tensor | None
) -> torch.Tensor:
    """int32 sum_k (x[m,k] - x_zp) * w[n,k] + bias[n]."""
    acc = (x_q.double() - x_zero_point) @ w_q.double().t()
    if bias_i32 is not None:
        acc = acc + bias_i32.double()
    return acc.to(torch.int32)


def conv_accumulate(
    x_q: torch.Tensor,
    x_zero_point: int,
    w_q: torch.Tensor,
    bias_i32: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """int32 convolution accumulator (Conv1d for 3-d input, Conv2d for 4-d); zero padding in
    the real domain is zero_point padding in the integer domain, i.e. 0 after subtracting it."""
    conv = F.conv1d if x_q.dim() == 3 else F.conv2d
    acc = conv(x_q.double() - x_zero_point, w_q.double(), None, stride, padding, dilation, groups)
    if bias_i32 is not None:
        acc = acc + bias_i32.double().reshape([1, -1] + [1] * (acc.dim() - 2))
    return acc.to(torch.int32)


def linear(
    x_q: torch.Tensor, x_scale: float, x_zero_point: int,
    w_q: torch.Tensor, w_scale: torch.Tensor, bias_i32: torch.Tensor | None,
    activation: str = "none", out_scale: float | None = None, out_zero_point: int = 0,
) -> torch.Tensor:
    """Quantized linear on [..., K] input: float32 output, or uint8 if ``out_scale`` is set."""
    lead = x_q.shape[:-1]
    acc = linear_accumulate(x_q.reshape(-1, x_q.shape[-1]), x_zero_point, w_q, bias_i32)
    y = epilogue(acc, x_scale, w_scale, 1, activation, out_scale, out_zero_point)
    return y.reshape(*lead, w_q.shape[0])


def conv(
    x_q: torch.Tensor, x_scale: float, x_zero_point: int,
    w_q: torch.Tensor, w_scale: torch.Tensor, bias_i32: torch.Tensor | None,
    stride: tuple[int, ...], padding: tuple[int, ...] | str, dilation: tuple[int, ...], groups: int,
    activation: str = "none", out_scale: float | None = None, out_zero_point: int = 0,
) -> torch.Tensor:
    """Quantized Conv1d/Conv2d: float32 output, or uint8 if ``out_scale`` is set."""
    acc = conv_accumulate(x_q, x_zero_point, w_q, bias_i32, stride, padding, dilation, groups)
    return epilogue(acc, x_scale, w_scale, 1, activation, out_scale, out_zero_point)


def add_constants(
    a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int,
    out_scale: float, out_zero_point: int,
) -> tuple[float, float, float]:
    """float32 (r_a, r_b, k) of the int8 add: ``r = f32(s / s_y)`` and the folded zero points
    ``k = f32(zp_y - fma(r_a, zp_a, f32(r_b * zp_b)))`` (ONNX Runtime's x86 constant, as its
    compiler contracts it), returned as python floats holding float32 values."""
    r_a, r_b = _f32(a_scale) / _f32(out_scale), _f32(b_scale) / _f32(out_scale)
    b_part = (r_b * b_zero_point).double()
    k = _f32(out_zero_point) - (r_a.double() * a_zero_point + b_part).float()
    return float(r_a), float(r_b), float(k)


def add(
    a_q: torch.Tensor, a_scale: float, a_zero_point: int,
    b_q: torch.Tensor, b_scale: float, b_zero_point: int,
    out_scale: float, out_zero_point: int, activation: str = "none", numerics: str = "onnxruntime",
) -> torch.Tensor:
    """Quantized elementwise add: ``clamp(round_half_even(f32(a * r_a + f32(b * r_b + k))))``,
    or with ``numerics="xnnpack"`` :func:`add_fixed_point`. Broadcasting as torch.add.

    Each multiply-add is rounded to float32 once (a fused multiply-add); float64 holds it
    exactly first (an 8-bit integer times a float32 has at most 32 significant bits, and the
    sum stays within 53 bits for scale ratios anywhere near 1)."""
    lo, hi = activation_bounds(activation, out_scale, out_zero_point)
    if numerics == "xnnpack":
        y = add_fixed_point(a_q, a_scale, a_zero_point, b_q, b_scale, b_zero_point, out_scale, out_zero_point)
        return torch.clamp(y, lo, hi).to(torch.uint8)
    if numerics != "onnxruntime":
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    r_a, r_b, k = add_constants(a_scale, a_zero_point, b_scale, b_zero_point, out_scale, out_zero_point)
    t = (b_q.double() * r_b + k).float()
    y = (a_q.double() * r_a + t.double()).float()
    return torch.clamp(torch.round(y), lo, hi).to(torch.uint8)


def add_fixed_point(
    a_q: torch.Tensor, a_scale: float, a_zero_point: int,
    b_q: torch.Tensor, b_scale: float, b_zero_point: int,
    out_scale: float, out_zero_point: int,
) -> torch.Tensor:
    """XNNPACK's int8 add (its qs8/qu8 vadd kernels and their parameter setup), int64 before the
    clamp: the float32 ratios ``s_a / s_y`` and ``s_b / s_y`` become integer multipliers with 21
    significant bits for the larger one, ``m = round_half_even(r * 2^shift)``, and
    ``y = ((a - zp_a) * m_a + (b - zp_b) * m_b + 2^(shift-1)) >> shift`` (ties up) ``+ zp_y``."""
    m_a, m_b, shift = fixed_point_multipliers(a_scale, b_scale, out_scale)
    acc = (a_q.long() - a_zero_point) * m_a + (b_q.long() - b_zero_point) * m_b + (1 << (shift - 1))
    return torch.div(acc, 1 << shift, rounding_mode="floor") + out_zero_point


def fixed_point_multipliers(a_scale: float, b_scale: float, out_scale: float) -> tuple[int, int, int]:
    """(m_a, m_b, shift) of :func:`add_fixed_point`: ``m = round_half_even(f32(s / s_y) * 2^shift)``
    with the larger multiplier in [2^20, 2^21)."""
    f32 = torch.float32
    ratios = torch.tensor([a_scale, b_scale], dtype=f32) / torch.tensor(out_scale, dtype=f32)
    shift = 21 - int(torch.frexp(ratios.max()).exponent)  # 20 - floor(log2(larger ratio))
    if not 1 <= shift <= 31:
        raise ValueError(f"fixed-point add: scale ratios {ratios.tolist()} are outside XNNPACK's range")
    m_a, m_b = (int(torch.round(r * 2.0**shift)) for r in ratios)  # exact power-of-two scaling
    return m_a, m_b, shift


def mul(
    a_q: torch.Tensor, a_scale: float, a_zero_point: int, b: torch.Tensor,
    out_scale: float, out_zero_point: int, activation: str = "none",
) -> torch.Tensor:
    """Quantized activation times a float tensor (broadcast like ``a * b``: a squeeze-excite
    block's channel gate), requantized: ``clamp(round_half_even(f32(f32(f32((a - zp_a) * s_a) * b)
    / s_y)) + zp_y)``, each float32 operation rounded once (the native kernel's order)."""
    y = dequantize_per_tensor(a_q, a_scale, a_zero_point) * b.float()
    lo, hi = activation_bounds(activation, out_scale, out_zero_point)
    return torch.clamp(torch.round(y / out_scale) + out_zero_point, lo, hi).to(torch.uint8)


def requantize(
    q: torch.Tensor, scale: float, zero_point: int, out_scale: float, out_zero_point: int
) -> torch.Tensor:
    """uint8 at one scale/zero point -> uint8 at another: dequantize, then quantize (what an ONNX
    DequantizeLinear -> QuantizeLinear pair computes)."""
    if scale == out_scale and zero_point == out_zero_point:
        return q
    return quantize_per_tensor(dequantize_per_tensor(q, scale, zero_point), out_scale, out_zero_point)


def matmul_accumulate(
    a_q: torch.Tensor, a_zero_point: int, b_q: torch.Tensor, b_zero_point: int
) -> torch.Tensor:
    """int32 ``sum_k (a[..., m, k] - zp_a) * (b[..., k, n] - zp_b)``: an int8 activation times an
    int8 activation (attention's Q.K^T and P.V), batch dimensions broadcast as ``torch.matmul``."""
    return torch.matmul(a_q.double() - a_zero_point, b_q.double() - b_zero_point).to(torch.int32)


def matmul(
    a_q: torch.Tensor, a_scale: float, a_zero_point: int,
    b_q: torch.Tensor, b_scale: float, b_zero_point: int,
    out_scale: float | None = None, out_zero_point: int = 0,
) -> torch.Tensor:
    """Quantized activation x activation matmul: float32 ``acc * f32(s_a * s_b)``, or uint8
    ``clamp(round_half_even(acc * M) + zp_y)`` with ``M = f32(f32(s_a * s_b) / s_y)`` if
    ``out_scale`` is set (the conv/linear requantization with one per-tensor multiplier)."""
    acc = matmul_accumulate(a_q, a_zero_point, b_q, b_zero_point)
    return epilogue(acc, a_scale, torch.tensor([b_scale]), -1, "none", out_scale, out_zero_point)


# --- dynamic quantization: float in, activations quantized on the fly, float out ---------


def quantize_dynamic_input(
    x: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor
) -> torch.Tensor:
    """[M, K] float -> uint8 ``clamp(floor(x * (1 / s) + zp + 0.5), 0, 255)``, per tensor (python
    numbers) or per row ([M] tensors). Round half up with a reciprocal multiply: three passes over
    the input instead of six, which matters because dynamic quantization runs on every call."""
    x = x.float()
    if isinstance(scale, torch.Tensor):
        v = x.mul((1.0 / scale.float())[:, None])
        v.add_(zero_point.float()[:, None] + 0.5)
    else:
        v = x.mul(float(torch.tensor(1.0 / scale, dtype=torch.float32)))
        v.add_(zero_point + 0.5)
    v.clamp_(0.0, 255.0)
    return v.to(torch.uint8)


def linear_dynamic(
    x_q: torch.Tensor, x_scale: float, x_zero_point: int,
    w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """Dynamic linear on [M, K] uint8 input: int32 accumulator * (x_scale * w_scale) + float bias."""
    acc = linear_accumulate(x_q, x_zero_point, w_q, None)
    y = epilogue(acc, x_scale, w_scale, 1)
    return y if bias is None else y + bias.float()


def linear_dynamic_per_row(
    x_q: torch.Tensor, x_scales: torch.Tensor, x_zero_points: torch.Tensor,
    w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """Dynamic linear with per-row input qparams: the row's scale multiplies its accumulator."""
    acc = ((x_q.double() - x_zero_points.double()[:, None]) @ w_q.double().t()).to(torch.int32)
    y = acc.to(torch.float32) * (x_scales.float()[:, None] * w_scale.float()[None, :])
    return y if bias is None else y + bias.float()


def embedding(w_q: torch.Tensor, w_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 embedding lookup: rows of int8 [V, D] times their float scale."""
    flat = indices.reshape(-1)
    rows = w_q.index_select(0, flat).to(torch.float32) * w_scale.index_select(0, flat)[:, None]
    return rows.reshape(*indices.shape, w_q.shape[1])
