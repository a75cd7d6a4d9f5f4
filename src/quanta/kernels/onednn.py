"""Fast x86 int8 Linear / Conv1d / Conv2d on plain tensors, through oneDNN.

Same conventions and results as :mod:`quanta.kernels.reference` (uint8 per-tensor
activations, symmetric int8 per-output-channel weights, int32 bias at x_scale * w_scale).
Two ways to reach oneDNN, same kernels: quanta's native kept primitives
(:mod:`quanta.kernels.native`, used whenever they load) and ``torch.ops.onednn`` (the fallback,
and the path under ``torch.compile`` tracing), whose weights are prepacked on first use.

Findings that shape the torch.ops path (torch 2.13, oneDNN 3.12):
- Bias must be floating point (an int32 bias is rejected); it is passed as
  ``float32(bias_i32 * x_scale * w_scale)`` and added after scaling the accumulator. Float32
  outputs therefore differ from the reference by about one float32 ulp. Requantized uint8
  outputs use oneDNN's own f32 order, not the reference's single multiplier: they differ by
  1 LSB on ~5e-6 of elements (rounding ties), never more (limits in tests/kernels).
- Prepacked weights do not depend on x_scale / x_zero_point or on the input shape for
  correctness: both are passed again on every call. For conv, packing with *some* concrete
  input shape selects a blocked weight layout that runs ~20% faster than packing with none;
  we pack with the caller's ``x_shape`` or a small synthetic one (any shape gives the speed).
- On x86 without VNNI, u8 x s8 products saturate unless |w| <= 64; see :mod:`quanta.kernels.cpu`.
  Both classes pass their weights through ``cpu.require_exact_weights``, which refuses wider
  ones: backend selection sends those layers to the exact float fallback first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from quanta.errors import NonFiniteInputError
from quanta.kernels import cpu, native, reference
from quanta.kernels.native import ops as native_ops

_ACT = {"none": ("none", [], ""), "relu": ("relu", [], ""), "relu6": ("hardtanh", [0.0, 6.0], ""),
        "gelu": ("gelu", [], "none"), "gelu_tanh": ("gelu", [], "tanh"), "silu": ("swish", [], ""),
        "hardswish": ("hardswish", [], "")}
# activations torch.ops.onednn does not fuse into this op: it runs to float, the activation follows
_UNFUSED = {"linear": frozenset({"silu", "hardswish", "sigmoid", "hardsigmoid"}),
            "conv": frozenset({"gelu", "gelu_tanh", "sigmoid", "hardsigmoid"})}
_NUMPY_MAX_NUMEL = 262144  # numpy (one pass per op, no dispatch) measured faster up to ~200k elements


CLIP = (np._core if hasattr(np, "_core") else np.core).umath.clip  # the ufunc, without np.clip's wrapper


def _finite(y: np.ndarray) -> np.ndarray:
    if not np.isfinite(y).all():
        raise NonFiniteInputError("input holds NaN or Inf")
    return y


def _round_clip_cast(y: np.ndarray, zero_point: int) -> np.ndarray:
    """uint8 ``clamp(rint(y) + zero_point, 0, 255)`` in place on the float32 array ``y``
    (adding the integer zero point after rounding is exact, so the order is free)."""
    np.rint(y, out=y)
    y += np.float32(zero_point)
    CLIP(y, np.float32(0.0), np.float32(255.0), out=y)
    return y.astype(np.uint8)


def quantize_uint8(
    x: torch.Tensor, scale: float, zero_point: int, channels_last: bool = False,
    numerics: str = "onnxruntime",
) -> torch.Tensor:
    """Float tensor -> uint8 ``clamp(round_half_even(x / scale) + zero_point, 0, 255)`` (with
    ``numerics="xnnpack"``: ``x * f32(1 / scale)``).

    Bit-identical to ``reference.quantize_per_tensor``. With the native kernels: one C pass (a
    float32 division and round-half-even, like numpy's), threaded for large tensors. Otherwise
    tensors up to 256k elements go through
    numpy (measured 30 vs 54 us at 49k elements, 140 vs 197 us at 197k, 2 threads); larger
    ones through in-place torch ops with the clamp done before rounding (equal, since the
    bounds are integers) and an int16 staging cast, which measured fastest. Memory format is
    preserved, or with ``channels_last`` a 4-d result comes out channels_last from the same pass
    (a conv stem's NCHW image: 117 + 100 us for quantize then copy, one pass instead).
    Raises ``NonFiniteInputError`` if ``x`` holds NaN or Inf (found in the same pass natively).
    """
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    inv = reference.reciprocal(scale) if numerics == "xnnpack" else 0.0  # 0: divide by scale
    lib = native.load()
    if lib is not None and not torch.compiler.is_compiling():  # one C pass, same arithmetic
        if channels_last and x.dim() == 4 and x.is_contiguous() \
                and not x.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = x.shape
            y = torch.empty((n, h, w, c), dtype=torch.uint8)
            if lib.qk_quantize_u8(x.data_ptr(), y.data_ptr(), n, c, h * w, scale, zero_point, 1, inv):
                raise NonFiniteInputError("input holds NaN or Inf")
            return y.permute(0, 3, 1, 2)
        if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
            y = torch.empty_like(x, dtype=torch.uint8)
            if lib.qk_quantize_u8(x.data_ptr(), y.data_ptr(), 1, 1, x.numel(), scale, zero_point, 0, inv):
                raise NonFiniteInputError("input holds NaN or Inf")
            return y
    if x.numel() <= _NUMPY_MAX_NUMEL:
        a = _finite(x.numpy())
        if channels_last and a.ndim == 4 and not x.is_contiguous(memory_format=torch.channels_last):
            y = np.empty((a.shape[0], a.shape[2], a.shape[3], a.shape[1]), dtype=np.float32)
            _scale_into(a.transpose(0, 2, 3, 1), scale, inv, y)
            return torch.from_numpy(_round_clip_cast(y, zero_point)).permute(0, 3, 1, 2)
        return torch.from_numpy(_round_clip_cast(_scale_into(a, scale, inv), zero_point))
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteInputError("input holds NaN or Inf")
    y = torch.mul(x, inv) if inv else torch.div(x, scale)
    y.round_().clamp_(float(-zero_point), float(255 - zero_point))
    if zero_point == 0:
        return y.to(torch.uint8)
    return y.to(torch.int16).add_(zero_point).to(torch.uint8)


def _scale_into(a: np.ndarray, scale: float, inv: float, out: np.ndarray | None = None) -> np.ndarray:
    """``a / scale`` in float32, or ``a * inv`` when ``inv`` is set (XNNPACK's quantization)."""
    if inv:
        return np.multiply(a, np.float32(inv), out=out)
    return np.divide(a, np.float32(scale), out=out)


def _float_bias(bias_i32: torch.Tensor | None, x_scale: float, w_scale: torch.Tensor) -> torch.Tensor | None:
    if bias_i32 is None:
        return None
    return (bias_i32.double() * x_scale * w_scale.double()).float()


def _activated(y: torch.Tensor, activation: str, out_scale: float | None,
               out_zero_point: int) -> torch.Tensor:
    """The float kernel output ``y`` activated, then quantized when an output scale is given."""
    y = reference.apply_activation(y, activation)
    return y if out_scale is None else quantize_uint8(y, out_scale, out_zero_point)


def _post_op(activation: str) -> tuple[str, list[float], str]:
    try:
        return _ACT[activation]
    except KeyError:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(_ACT)}") from None


class PackedLinear:
    """Prepacked int8 Linear: ``y = (x - x_zp) @ w.T + bias`` scaled, activated, optionally requantized.

    Args: w_q int8 [N, K]; w_scale float32 [N]; bias_i32 int32 [N] or None; the input's
    per-tensor x_scale / x_zero_point (fixed at convert time; the float bias uses them).
    """

    def __init__(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias_i32: torch.Tensor | None,
        x_scale: float, x_zero_point: int,
    ) -> None:
        if w_q.dtype != torch.int8 or w_q.dim() != 2:
            raise ValueError("w_q must be a 2-d int8 tensor [out_features, in_features]")
        cpu.require_exact_weights(w_q, "int8 Linear")
        self.out_features, self.in_features = w_q.shape
        self.x_scale, self.x_zero_point = float(x_scale), int(x_zero_point)
        self.w_scale = w_scale.detach().float().contiguous()
        self.w_zero_point = torch.zeros(self.out_features, dtype=torch.int64)
        self.bias = _float_bias(bias_i32, self.x_scale, self.w_scale)
        self._w = w_q.detach().contiguous()
        self.native = (native_ops.NativeLinear(w_q, self.w_scale, bias_i32, self.x_scale, self.x_zero_point)
                       if native_ops.available() else None)

    @functools.cached_property
    def packed(self) -> torch.Tensor:
        """torch.ops.onednn's prepacked weights, built on first use (only the fallback and the
        torch.compile path need them). M is unknown until run time; packing with None measured
        as fast as a fixed [M, K]."""
        return torch.ops.onednn.qlinear_prepack(self._w, None)

    def __call__(
        self, x_u8: torch.Tensor, activation: str = "none",
        out_scale: float | None = None, out_zero_point: int = 0,
    ) -> torch.Tensor:
        """x_u8 uint8 [..., K] -> float32 [..., N], or uint8 if ``out_scale`` is given."""
        if self.native is not None and not torch.compiler.is_compiling():
            return self.native(x_u8, activation, out_scale, out_zero_point)
        if activation in _UNFUSED["linear"]:
            return _activated(self(x_u8), activation, out_scale, out_zero_point)
        name, args, algorithm = _post_op(activation)
        if not x_u8.is_contiguous():
            x_u8 = x_u8.contiguous()
        if out_scale is None:
            out_scale, out_zero_point, dtype = 1.0, 0, torch.float32
        else:
            dtype = None
        return torch.ops.onednn.qlinear_pointwise(
            x_u8, self.x_scale, self.x_zero_point, self.packed, self.w_scale, self.w_zero_point,
            self.bias, float(out_scale), int(out_zero_point), dtype, name, args, algorithm,
        )


def _tuple(v: int | Sequence[int], n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(i) for i in v]


class PackedConv:
    """Prepacked int8 Conv1d (3-d weight) or Conv2d (4-d weight), groups/depthwise included.

    Args: w_q int8 [O, C/groups, *k]; w_scale float32 [O]; bias_i32 int32 [O] or None;
    x_scale / x_zero_point of the input; stride/padding/dilation as ints or tuples (padding
    may be "valid", or "same" when the total padding is even); x_shape: a typical input
    shape for packing (optional). Conv2d input should be channels_last (others are copied
    to it); the output is channels_last. Conv1d runs as a Conv2d over [N, C, 1, L] and returns
    [N, O, L] with length-major (channels-last) strides; feeding it to the next Conv1d is copy-free.
    """

    def __init__(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias_i32: torch.Tensor | None,
        x_scale: float, x_zero_point: int,
        stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1, groups: int = 1, x_shape: Sequence[int] | None = None,
    ) -> None:
        if w_q.dtype != torch.int8 or w_q.dim() not in (3, 4):
            raise ValueError("w_q must be a 3-d (Conv1d) or 4-d (Conv2d) int8 tensor")
        cpu.require_exact_weights(w_q, "int8 convolution")
        n = w_q.dim() - 2
        kernel = list(w_q.shape[2:])
        self.stride, self.dilation = _tuple(stride, n), _tuple(dilation, n)
        self.padding = self._resolve_padding(padding, kernel, self.dilation)
        self.groups = int(groups)
        self.x_scale, self.x_zero_point = float(x_scale), int(x_zero_point)
        self.w_scale = w_scale.detach().float().contiguous()
        self.w_zero_point = torch.zeros(w_q.shape[0], dtype=torch.int64)
        self.bias = _float_bias(bias_i32, self.x_scale, self.w_scale)
        if x_shape is None:  # any concrete shape selects the fast blocked layout
            extent = [d * (k - 1) + 1 + s for k, d, s in zip(kernel, self.dilation, self.stride, strict=True)]
            x_shape = [1, w_q.shape[1] * self.groups, *[max(e, 8) for e in extent]]
        self.is_1d = n == 1
        w4 = w_q.detach()
        if self.is_1d:  # Conv1d runs as Conv2d over [N, C, 1, L]: the 1-d op rejects relu6
            w4, x_shape = w4.unsqueeze(2), [*x_shape[:2], 1, x_shape[-1]]
            self.stride, self.padding, self.dilation = (
                [1, *self.stride], [0, *self.padding], [1, *self.dilation])
        self._w, self._x_shape = w4.contiguous(), list(x_shape)
        self.native = native_ops.NativeConv2d(
            w4, self.w_scale, bias_i32, self.x_scale, self.x_zero_point, self.stride, self.padding,
            self.dilation, self.groups) if native_ops.available() else None

    @functools.cached_property
    def packed(self) -> torch.Tensor:
        """torch.ops.onednn's prepacked weights, built on first use (fallback / torch.compile)."""
        return torch.ops.onednn.qconv_prepack(
            self._w, self.w_scale, self.x_scale, self.x_zero_point,
            self.stride, self.padding, self.dilation, self.groups, self._x_shape,
        )

    def implementation(self) -> str:
        """oneDNN's name for the kernel it picks at the packing shape; "" without the native path."""
        return self.native.implementation(tuple(self._x_shape)) if self.native is not None else ""

    @staticmethod
    def _resolve_padding(
        padding: int | Sequence[int] | str, kernel: list[int], dilation: list[int]
    ) -> list[int]:
        if padding == "valid":
            return [0] * len(kernel)
        if padding == "same":
            totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            if any(t % 2 for t in totals):
                raise NotImplementedError("padding='same' with asymmetric padding is not supported")
            return [t // 2 for t in totals]
        if isinstance(padding, str):
            raise ValueError(f"unknown padding {padding!r}")
        return _tuple(padding, len(kernel))

    def bound(self, activation: str, out_scale: float | None, out_zero_point: int) -> Callable:
        """``lambda x: self(x, activation, out_scale, out_zero_point)``, through the native
        fast path (:class:`native_ops.BoundConv2d`) where it applies."""
        if self.native is None or self.is_1d:
            return functools.partial(self, activation=activation, out_scale=out_scale,
                                     out_zero_point=out_zero_point)
        return native_ops.BoundConv2d(self.native, activation, out_scale, out_zero_point)

    def __call__(
        self, x_u8: torch.Tensor, activation: str = "none",
        out_scale: float | None = None, out_zero_point: int = 0,
    ) -> torch.Tensor:
        """x_u8 uint8 [N, C, (H,) W] -> float32 output, or uint8 if ``out_scale`` is given."""
        if self.is_1d:
            x_u8 = x_u8.unsqueeze(2)
        if self.native is not None and not torch.compiler.is_compiling():
            y = self.native(x_u8, activation, out_scale, out_zero_point)
            return y.squeeze(2) if self.is_1d else y
        if activation in _UNFUSED["conv"]:
            y = self(x_u8.squeeze(2) if self.is_1d else x_u8)
            return _activated(y, activation, out_scale, out_zero_point)
        name, args, algorithm = _post_op(activation)
        x_u8 = x_u8.contiguous(memory_format=torch.channels_last)
        if out_scale is None:
            out_scale, out_zero_point, dtype = 1.0, 0, torch.float32
        else:
            dtype = None
        y = torch.ops.onednn.qconv2d_pointwise(
            x_u8, self.x_scale, self.x_zero_point, self.packed, self.w_scale, self.w_zero_point,
            self.bias, self.stride, self.padding, self.dilation, self.groups,
            float(out_scale), int(out_zero_point), dtype, name, args, algorithm,
        )
        return y.squeeze(2) if self.is_1d else y
