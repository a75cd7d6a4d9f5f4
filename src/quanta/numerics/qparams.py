"""Quantization parameters: choose scale/zero point, quantize, dequantize, fake-quantize.

Quantized data is an ordinary int8/uint8 tensor; scale is float32 and zero point int32, per
tensor (0-d) or per channel (1-d along ``axis``). Rounding is round-half-to-even everywhere.
"""

from __future__ import annotations

import torch

from quanta.config import QuantSpec

_EPS = torch.finfo(torch.float32).eps


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """Integer range of ``spec``: signed symmetric specs use [-2^(b-1), 2^(b-1)-1]."""
    if spec.dtype == "int8":
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return 0, 2**spec.bits - 1


def torch_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.dtype == "int8" else torch.uint8


def choose_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [min_val, max_val] (widened to include 0).

    Symmetric: zero point is the middle of the range (0 for int8) and scale = amax / qmax, so
    +-amax both map inside the range. Asymmetric: the full range [qmin, qmax] is used and the
    zero point is rounded so that real 0.0 is exactly representable.
    """
    qmin, qmax = qrange(spec)
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val)
        half = (qmax - qmin) // 2  # 127 (8-bit), 63 (7-bit), 7 (4-bit)
        scale = torch.clamp(amax / half, min=_EPS)
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = torch.clamp((max_val - min_val) / float(qmax - qmin), min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    spec: QuantSpec,
    axis: int | None = None,
) -> torch.Tensor:
    """Float -> int: clamp(round(x / scale) + zero_point) in the spec's dtype."""
    qmin, qmax = qrange(spec)
    if isinstance(scale, torch.Tensor):
        scale = _broadcast(scale, x, axis)
        zero_point = _broadcast(zero_point, x, axis)
    q = torch.round(x.float() / scale) + zero_point
    return torch.clamp(q, qmin, qmax).to(torch_dtype(spec))


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    axis: int | None = None,
) -> torch.Tensor:
    """Int -> float: (q - zero_point) * scale, in float32."""
    if isinstance(scale, torch.Tensor):
        scale = _broadcast(scale, q, axis)
        zero_point = _broadcast(zero_point, q, axis)
    return (q.to(torch.float32) - zero_point) * scale


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    axis: int | None = None,
) -> torch.Tensor:
    """quantize -> dequantize with a straight-through gradient (zero outside the range).

    Uses torch's fused aten fake-quant kernels, which round half to even like ``quantize``.
    """
    qmin, qmax = qrange(spec)
    if axis is None or scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()).float(), zero_point.reshape(()).int(), qmin, qmax
        )
    return torch.fake_quantize_per_channel_affine(
        x, scale.float(), zero_point.int(), axis, qmin, qmax
    )
