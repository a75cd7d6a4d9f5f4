"""QTensor: an activation travelling in int8 between quantized ops.

A ``torch.Tensor`` subclass that holds uint8 (or int8) data with one scale and zero point and
reports its logical float dtype and shape. Shape ops, pooling, ReLU-like clamps run on the
integer data; every other op sees the dequantized float tensor, so the result is always
correct, only slower. Quantized modules read ``int_data`` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from quanta.kernels import native


class QTensor(torch.Tensor):
    int_data: torch.Tensor
    scale: float
    zero_point: int

    @staticmethod
    def __new__(cls, int_data: torch.Tensor, scale: float, zero_point: int) -> QTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, int_data.shape, strides=int_data.stride(), dtype=torch.float32,
            device=int_data.device, requires_grad=False,
        )

    def __init__(self, int_data: torch.Tensor, scale: float, zero_point: int) -> None:
        self.int_data = int_data
        self.scale = float(scale)
        self.zero_point = int(zero_point)

    def __repr__(self) -> str:  # noqa: D105
        return (
            f"QTensor(shape={tuple(self.shape)}, {self.int_data.dtype}, scale={self.scale:.6g}, "
            f"zero_point={self.zero_point})"
        )

    def dequantize(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` in float32, in place after one cast (bit-identical to
        ``reference.dequantize_per_tensor``, one temporary instead of three)."""
        with torch._C.DisableTorchFunction():
            return self.int_data.to(torch.float32).sub_(self.zero_point).mul_(self.scale)

    def with_data(self, int_data: torch.Tensor) -> QTensor:
        return QTensor(int_data, self.scale, self.zero_point)

    def __tensor_flatten__(self) -> tuple[list[str], tuple[float, int]]:
        return ["int_data"], (self.scale, self.zero_point)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple[float, int], size: Any, stride: Any) -> QTensor:
        return QTensor(inner["int_data"], *meta)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        handler = _NATIVE.get(func)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not NotImplemented:
                return out
        args, kwargs = tree_map(_to_float, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        # Safety net for paths that bypass __torch_function__ (printing, autograd internals).
        args, kwargs = tree_map(_to_float, (args, kwargs or {}))
        return func(*args, **kwargs)


def _to_float(x: Any) -> Any:
    return x.dequantize() if isinstance(x, QTensor) else x


def dequantize_any(x: Any) -> Any:
    """Replace every QTensor in a nested structure by its float value."""
    return tree_map(_to_float, x)


_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndim.__get__,
    torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.numel,
    torch.Tensor.requires_grad.__get__, torch.Tensor.__len__, torch.Tensor.is_floating_point,
    torch.Tensor.layout.__get__, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.is_quantized.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.grad_fn.__get__,
}


def _on_data(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Apply a layout/selection op to the integer data; qparams are unchanged."""
    x = args[0]
    if not isinstance(x, QTensor) or kwargs.get("return_indices"):
        return NotImplemented
    if any(isinstance(a, QTensor) for a in args[1:]):
        return NotImplemented
    out = func(x.int_data, *args[1:], **kwargs)
    if isinstance(out, (tuple, list)):
        return type(out)(x.with_data(o) for o in out)
    return x.with_data(out)


def view_data(data: torch.Tensor, *shape: Any) -> torch.Tensor:
    """``data.view(*shape)``, or the same values through ``reshape`` where the int8 data's layout
    (channels_last, which the float model never had) makes a view impossible: ``x.view(n, -1)``
    after a conv works on the float model's NCHW tensor and must work here too."""
    try:
        return data.view(*shape)
    except RuntimeError:
        return data.reshape(*shape)


def _view(func: Callable, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if not isinstance(x, QTensor) or kwargs or any(isinstance(a, torch.Tensor) for a in args[1:]):
        return NotImplemented
    if len(args) == 2 and isinstance(args[1], torch.dtype):
        return NotImplemented
    return x.with_data(view_data(x.int_data, *args[1:]))


def _pad(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Constant zero padding: the zero point is the integer that means 0.0 (exact)."""
    x = args[0]
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value", None)
    if not isinstance(x, QTensor) or mode != "constant" or value not in (None, 0, 0.0):
        return NotImplemented
    pad = args[1] if len(args) > 1 else kwargs["pad"]
    return x.with_data(F.pad(x.int_data, pad, value=x.zero_point))


def _max_pool(func: Callable, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if not isinstance(x, QTensor) or any(isinstance(a, QTensor) for a in args[1:]):
        return NotImplemented
    out = max_pool_data(func, x.int_data, args[1:], kwargs)
    return NotImplemented if out is None else x.with_data(out)


def max_pool_data(func: Callable, data: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor | None:
    """Max pooling on the integer data, or None where the float path must answer (indices).
    torch's uint8 max pool is unvectorized (measured ~15x slower than float) and rejects large
    channels_last inputs, so uncovered cases run in bfloat16, which holds every integer 0..256
    exactly: the result is bit-identical."""
    if kwargs.get("return_indices"):
        return None
    if func in (F.max_pool2d, torch.max_pool2d) and data.dim() == 4:
        out = _max_pool2d_int(data, *rest, **kwargs)
        if out is not None:
            return out
    out = func(data.to(torch.bfloat16), *rest, **kwargs)
    if isinstance(out, tuple):  # positional return_indices=True: let the float path answer
        return None
    return out.to(data.dtype)


def _as_list(v: Any) -> list:
    return [v] if isinstance(v, int) else list(v)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _max_pool2d_int(
    data: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
    ceil_mode: bool = False, return_indices: bool = False,
) -> torch.Tensor | None:
    """2-d max pooling on integer data, exact, without leaving the integers: with the native
    kernels one threaded C pass over NHWC uint8 data; otherwise non-overlapping
    windows reduce channels_last tiles (:func:`_max_pool_tiles`), padded windows run as two
    separable 1-d passes (:func:`_max_along`), the rest as the running maximum of kh*kw strided
    views (of the input padded with the dtype's minimum, which never wins). All measured
    faster than the bfloat16 round trip (ResNet-18 stem pool: 123 vs 400 us at batch 1).
    None for cases it does not cover (dilation, indices; ceil_mode without the native kernels)."""
    if return_indices or _pair(dilation) != (1, 1):
        return None
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride) if stride is not None and len(_as_list(stride)) else (kh, kw)
    ph, pw = _pair(padding)
    n, c, h, w = data.shape
    oh, ow = _pool_size(h, kh, sh, ph, ceil_mode), _pool_size(w, kw, sw, pw, ceil_mode)
    if oh <= 0 or ow <= 0 or 2 * ph > kh or 2 * pw > kw:
        return None
    lib = native.load()
    nhwc = data.is_contiguous(memory_format=torch.channels_last)
    if ceil_mode and (lib is None or data.dtype != torch.uint8 or not nhwc):
        return None
    if lib is not None and data.dtype == torch.uint8 and nhwc and not torch.compiler.is_compiling():
        # one threaded C pass over NHWC
        out = torch.empty((n, oh, ow, c), dtype=torch.uint8)
        lib.qk_max_pool_u8(data.data_ptr(), out.data_ptr(), n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow)
        return out.permute(0, 3, 1, 2)
    if not (ph or pw) and (kh, kw) == (sh, sw) and h % kh == 0 and w % kw == 0 and nhwc:
        return _max_pool_tiles(data, kh, kw)
    if (ph or pw) and 2 * ph < kh and 2 * pw < kw:  # padded: skip the padded copy
        rows = _max_along(data, 3, kw, sw, pw, ow)
        return _max_along(rows, 2, kh, sh, ph, oh)
    low = 0 if data.dtype == torch.uint8 else -128
    padded = F.pad(data, (pw, pw, ph, ph), value=low) if ph or pw else data
    out = None
    for i in range(kh):
        for j in range(kw):
            view = padded[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            if out is None:
                out = view.clone(memory_format=torch.channels_last)
            else:
                torch.maximum(out, view, out=out)
    return out


def _pool_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """torch's pooling output size; with ``ceil_mode`` the last window may hang over the edge
    (its taps outside are skipped) but must start inside the input or its left padding."""
    if not ceil_mode:
        return (size + 2 * p - k) // s + 1
    out = -(-(size + 2 * p - k) // s) + 1
    return out - 1 if (out - 1) * s >= size + p else out


def _max_pool_tiles(data: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Non-overlapping pooling (kernel == stride, no padding, sizes divisible) of channels_last
    data: the NHWC memory viewed as [N, H/kh, kh, W/kw, kw, C] and reduced tap by tap, kh + kw - 2
    maxima on contiguous slices (2x2 pool: 17 vs 27 us at 16x28x28, 33 vs 52 us at batch 8)."""
    n, c, h, w = data.shape
    tiles = data.permute(0, 2, 3, 1).reshape(n, h // kh, kh, w // kw, kw, c)
    rows = tiles[:, :, 0]
    for i in range(1, kh):
        rows = torch.maximum(rows, tiles[:, :, i])
    out = rows[:, :, :, 0]
    for j in range(1, kw):
        out = torch.maximum(out, rows[:, :, :, j])
    if kh == 1 and kw == 1:
        out = out.clone()
    return out.permute(0, 3, 1, 2)


def _max_along(data: torch.Tensor, dim: int, k: int, s: int, p: int, n_out: int) -> torch.Tensor:
    """1-d running max over windows of ``k`` taps, stride ``s``, ``p`` implicit padding along
    ``dim``: tap ``p`` is in range for every output, the others update the outputs whose
    window they reach, so no padded copy is made (separable 2-d pooling: 2 + 2 passes for the
    3x3 ResNet stem pool instead of 9 on a padded copy)."""
    size = data.shape[dim]

    def taps(j: int, lo: int, hi: int) -> torch.Tensor:
        start = lo * s - p + j
        return data.narrow(dim, start, (hi - lo) * s + 1)[(slice(None),) * dim + (slice(None, None, s),)]

    out = taps(p, 0, n_out - 1).clone(memory_format=torch.channels_last)
    for j in range(k):
        if j == p:
            continue
        lo = max(0, -((j - p) // s))  # first output whose tap j is >= 0
        hi = min(n_out - 1, (size - 1 + p - j) // s)  # last output whose tap j is < size
        if lo > hi:
            continue
        part = out.narrow(dim, lo, hi - lo + 1)
        torch.maximum(part, taps(j, lo, hi), out=part)
    return out


def _quantize_scalar(v: float, scale: float, zero_point: int, qmin: int, qmax: int) -> int:
    """``reference.quantize_per_tensor`` of one number, in python (float32 like the reference)."""
    q = int(np.rint(np.float32(v) / np.float32(scale))) + zero_point
    return min(max(q, qmin), qmax)


_CLAMP_BOUNDS: dict[tuple, tuple[int | None, int | None]] = {}


def clamp_bounds(lo: float | None, hi: float | None, scale: float, zero_point: int,
                 dtype: torch.dtype) -> tuple[int | None, int | None]:
    """Integer bounds of a float clamp at these qparams; None where the dtype already bounds."""
    key = (lo, hi, scale, zero_point, dtype)
    bounds = _CLAMP_BOUNDS.get(key)
    if bounds is None:
        dmin, dmax = (0, 255) if dtype == torch.uint8 else (-128, 127)
        qmin = None if lo is None else _quantize_scalar(lo, scale, zero_point, dmin, dmax)
        qmax = None if hi is None else _quantize_scalar(hi, scale, zero_point, dmin, dmax)
        bounds = (None if qmin is None or qmin <= dmin else qmin,
                  None if qmax is None or qmax >= dmax else qmax)
        if len(_CLAMP_BOUNDS) > 4096:
            _CLAMP_BOUNDS.clear()
        _CLAMP_BOUNDS[key] = bounds
    return bounds


def _clamp_op(lo: float | None, hi: float | None) -> Callable:
    def run(x: QTensor, inplace: bool = False) -> QTensor:
        qmin, qmax = clamp_bounds(lo, hi, x.scale, x.zero_point, x.int_data.dtype)
        if qmin is None and qmax is None:
            return x  # already inside the range (a ReLU after a fused ReLU): nothing to do
        return x.with_data(torch.clamp(x.int_data, qmin, qmax))
    return run


def _relu(func: Callable, args: tuple, kwargs: dict) -> Any:
    return _clamp_op(0.0, None)(args[0])


def _relu6(func: Callable, args: tuple, kwargs: dict) -> Any:
    return _clamp_op(0.0, 6.0)(args[0])


def _hardtanh(func: Callable, args: tuple, kwargs: dict) -> Any:
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return _clamp_op(lo, hi)(args[0])


def _avg_pool(func: Callable, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if not isinstance(x, QTensor):
        return NotImplemented
    return x.with_data(avg_pool_data(func, x.int_data, x.zero_point, args[1:], kwargs))


def avg_pool_data(
    func: Callable, data: torch.Tensor, zero_point: int, rest: tuple, kwargs: dict,
) -> torch.Tensor:
    """Average of integers (zero point removed so padding counts as real 0), rounded half-even."""
    if func is F.adaptive_avg_pool2d and data.dim() == 4 and len(rest) == 1 and not kwargs:
        out = _adaptive_avg_pool2d_native(data, rest[0], zero_point)
        if out is not None:
            return out
    if func is F.avg_pool2d and data.dim() == 4 and _global_window(data.shape[2:], rest, kwargs):
        out = _adaptive_avg_pool2d_native(data, 1, zero_point)  # one window: the same sum / count
        if out is not None:
            return out
    pooled = func(data.float() - zero_point, *rest, **kwargs)
    return torch.clamp(torch.round(pooled) + zero_point, 0, 255).to(data.dtype)


def _global_window(hw: Sequence[int], rest: tuple, kwargs: dict) -> bool:
    """Whether ``F.avg_pool2d(x, *rest, **kwargs)`` on an ``hw`` map averages it whole (the
    kernel covers it, no padding, no divisor override): ResNet's final ``AvgPool2d(7)``."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    args = {**dict(zip(names, rest, strict=False)), **kwargs}
    if set(args) - set(names) or args.get("divisor_override") is not None:
        return False
    kernel, padding = args.get("kernel_size"), args.get("padding", 0)
    kernel = [kernel] * 2 if isinstance(kernel, int) else list(kernel or ())
    padding = [padding] * 2 if isinstance(padding, int) else list(padding)
    return kernel == list(hw) and not any(padding)


def _adaptive_avg_pool2d_native(data: torch.Tensor, output_size: Any, zero_point: int) -> torch.Tensor | None:
    """The same rounding as :func:`_avg_pool` in one C pass over NHWC uint8 data (tested equal to
    the float path on 360k outputs of random shapes), or None where it does not apply."""
    lib = native.load()
    if lib is None or data.dtype != torch.uint8 or torch.compiler.is_compiling() \
            or not data.is_contiguous(memory_format=torch.channels_last):
        return None
    n, c, h, w = data.shape
    size = [output_size] * 2 if isinstance(output_size, int) else list(output_size)
    if len(size) != 2:
        return None
    oh, ow = (h if size[0] is None else int(size[0])), (w if size[1] is None else int(size[1]))
    if oh <= 0 or ow <= 0:
        return None
    out = torch.empty((n, oh, ow, c), dtype=torch.uint8)
    lib.qk_adaptive_avg_pool_u8(data.data_ptr(), out.data_ptr(), n, c, h, w, oh, ow, zero_point)
    return out.permute(0, 3, 1, 2)


def _native_table() -> dict[Callable, Callable]:
    layout_ops = [
        torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
        torch.Tensor.permute, torch.permute, torch.Tensor.transpose, torch.transpose,
        torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze, torch.unsqueeze,
        torch.Tensor.contiguous, torch.Tensor.__getitem__, torch.Tensor.t, torch.Tensor.narrow,
        torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.clone,
        torch.Tensor.detach, torch.Tensor.expand, torch.Tensor.repeat, torch.Tensor.unbind,
        torch.Tensor.flip, torch.flip, F.pixel_shuffle, torch.Tensor.view_as,
    ]
    pool_ops = [F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                F.adaptive_max_pool1d, F.adaptive_max_pool2d]
    table: dict[Callable, Callable] = {op: _on_data for op in layout_ops}
    table[torch.Tensor.view] = _view
    table[F.pad] = _pad
    table.update({op: _max_pool for op in pool_ops})
    for op in (F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_):
        table[op] = _relu
    table[F.relu6] = _relu6
    table[F.hardtanh] = _hardtanh
    for op in (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        table[op] = _avg_pool
    for op in (F.dropout, F.dropout1d, F.dropout2d):
        table[op] = _dropout
    return table


def _dropout(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Dropout outside training is the identity: the int8 value passes unchanged (a classifier
    head's ``nn.Dropout`` otherwise dequantized it and the next layer quantized it again)."""
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    return args[0] if isinstance(args[0], QTensor) and training is False else NotImplemented


_NATIVE = _native_table()
