"""Pooling on quantized integer data: exact max and average pooling of uint8 (or int8) tensors
with their zero point, natively on NHWC uint8 where the C kernels apply, else in torch on the
integers. Used by ``QTensor``'s pooling ops and by the graph runtime's lowered pooling nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from quanta.kernels import native


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


def _global_window(hw: torch.Size, rest: tuple, kwargs: dict) -> bool:
    """Whether ``F.avg_pool2d(x, *rest, **kwargs)`` on an ``hw`` map averages it whole (the
    kernel covers it, no padding, no divisor override): ResNet's final ``AvgPool2d(7)``."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    args = {**dict(zip(names, rest, strict=False)), **kwargs}
    if set(args) - set(names) or "kernel_size" not in args or args.get("divisor_override") is not None:
        return False
    return _pair(args["kernel_size"]) == tuple(hw) and _pair(args.get("padding", 0)) == (0, 0)


def _adaptive_avg_pool2d_native(data: torch.Tensor, output_size: Any, zero_point: int) -> torch.Tensor | None:
    """The same rounding as :func:`avg_pool_data` in one C pass over NHWC uint8 data (tested equal to
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
