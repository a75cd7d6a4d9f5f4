"""QTensor: an activation travelling in int8 between quantized ops.

A ``torch.Tensor`` subclass that holds uint8 (or int8) data with one scale and zero point and
reports its logical float dtype and shape. Shape ops, pooling, ReLU-like clamps run on the
integer data; every other op sees the dequantized float tensor, so the result is always
correct, only slower. Quantized modules read ``int_data`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from quanta.kernels.pooling import avg_pool_data, max_pool_data


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
    for op in _DROPOUT_TRAINING_DEFAULT:
        table[op] = _dropout
    return table


# every dropout function, with its ``training`` argument's default (the alpha ones default to off)
_DROPOUT_TRAINING_DEFAULT = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
                             F.alpha_dropout: False, F.feature_alpha_dropout: False}


def _dropout(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Dropout outside training is the identity: the int8 value passes unchanged (a classifier
    head's ``nn.Dropout`` otherwise dequantized it and the next layer quantized it again)."""
    training = args[2] if len(args) > 2 else kwargs.get("training", _DROPOUT_TRAINING_DEFAULT[func])
    return args[0] if isinstance(args[0], QTensor) and training is False else NotImplemented


_NATIVE = _native_table()
