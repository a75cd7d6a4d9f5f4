"""Dynamic int8 matmul: float input quantized on the fly, int8 weights, float output.

Activations are quantized per call to uint8 (asymmetric, range = min/max of the actual input,
widened to include 0), per tensor or per row, by ``reference.quantize_dynamic_input`` (round
half up through a reciprocal multiply; computed here with numpy, bit-equal). Weights are int8
symmetric per output channel. The int32 accumulator is scaled to float32, the float bias added.

Three backends compute the same integers:
- ``reference``: :func:`quanta.kernels.reference.linear_dynamic` (float64 accumulation, exact);
  for small K the same integers are summed in float32, which is exact while
  ``K * 255 * 128 < 2**24`` (every partial sum is an integer below 2^24).
- ``onednn``: quanta's native kept oneDNN matmul (:mod:`quanta.kernels.native`, the input scale
  and zero point are runtime arguments, so one primitive per row count serves every call), with
  input quantization in C. Without the native kernels: ``torch.ops.onednn.qlinear_pointwise``
  with the weights prepacked once, which has a fixed ~30 us cost per call; measured here (2
  threads, VNNI) the exact float32 reference is faster for M <= 2 rows when K <= 514, so calls
  of that size take the reference path there.
- ``float``: the exact fallback for weights wider than this CPU's int8 kernels add exactly
  (:mod:`quanta.kernels.cpu`): the same quantized input, the integer values multiplied in float32
  (exact sums while ``K <= 514``; beyond, float32 rounding of the accumulator only).
Per-row input qparams on oneDNN: the kernel runs with x_scale=1, x_zp=0 (raw u8 x s8 sums times
w_scale) and the row zero points are removed afterwards with the per-channel weight sums.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch

from quanta.errors import NonFiniteInputError
from quanta.kernels import cpu, native, reference
from quanta.kernels.native import ops as native_ops
from quanta.kernels.onednn import CLIP

_EPS = float(torch.finfo(torch.float32).eps)
SMALL_M = 2  # rows at or below which the exact float32 reference beats oneDNN's per-call cost
_F32_EXACT_K = (2**24) // (255 * 128)  # largest K whose u8 x s8 sums stay exact in float32


def dynamic_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric (scale, zero point) covering [lo, hi] widened to include 0."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteInputError(f"input range [{lo}, {hi}] is not finite")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, _EPS)
    zero_point = min(max(-round(lo / scale), 0), 255)
    return scale, int(zero_point)


def _quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (uint8 data, float32 scales, int32 zero points) of a [M, K] float32 array."""
    lo, hi = x.min(axis=1), x.max(axis=1)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise NonFiniteInputError("input holds NaN or Inf")
    lo, hi = np.minimum(lo, 0.0).astype(np.float64), np.maximum(hi, 0.0).astype(np.float64)
    scale = np.maximum((hi - lo) / 255.0, _EPS).astype(np.float32)
    zero_point = np.clip(np.rint(-lo / scale), 0, 255).astype(np.float32)
    y = np.multiply(x, (np.float32(1.0) / scale)[:, None])
    y += (zero_point + np.float32(0.5))[:, None]
    np.clip(y, 0.0, 255.0, out=y)
    return y.astype(np.uint8), scale, zero_point.astype(np.int32)


class _Workspace(threading.local):
    """A per-thread float32 scratch block for the quantization passes (at most ``_BLOCK``
    elements): no fresh float allocation per call."""

    def __init__(self) -> None:
        self.buf = np.empty(0, np.float32)

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        if self.buf.size < n:
            self.buf = np.empty(n, np.float32)
        return self.buf[:n].reshape(shape)


_WORKSPACE = _Workspace()


_BLOCK = 1 << 16  # elements per block of the elementwise passes (256 KiB float32 stays in L2)


def _quantize_tensor(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Per-tensor (uint8 data, scale, zero point) of a float32 array (any shape), single-threaded.

    Same passes and roundings as ``reference.quantize_dynamic_input``: multiply by the float32
    reciprocal, add zp + 0.5, clamp to [0, 255], truncate; block by block so the float
    intermediate stays in cache."""
    scale, zero_point = dynamic_qparams(float(x.min()), float(x.max()))
    inv, offset = np.float32(1.0 / scale), np.float32(zero_point + 0.5)
    lo, hi = np.float32(0.0), np.float32(255.0)
    flat = x.reshape(-1)
    q = np.empty(flat.shape, np.uint8)
    work = _WORKSPACE.get((min(flat.size, _BLOCK),))
    for start in range(0, flat.size, _BLOCK):
        stop = min(start + _BLOCK, flat.size)
        y = work[: stop - start]
        np.multiply(flat[start:stop], inv, out=y)
        np.add(y, offset, out=y)
        CLIP(y, lo, hi, out=y)
        np.copyto(q[start:stop], y, casting="unsafe")
    return q.reshape(x.shape), scale, zero_point


_RANGE = threading.local()


def _quantize_tensor_native(lib: object, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """:func:`_quantize_tensor` in two threaded C passes (same float32 arithmetic, tested equal)."""
    out = getattr(_RANGE, "buf", None)
    if out is None:
        out = _RANGE.buf = torch.empty(2)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.uint8), *dynamic_qparams(0.0, 0.0)
    if lib.qk_min_max_f32(x.data_ptr(), x.numel(), out.data_ptr()):
        raise NonFiniteInputError("input holds NaN or Inf")
    lo, hi = out.tolist()
    scale, zero_point = dynamic_qparams(lo, hi)
    q = torch.empty(x.shape, dtype=torch.uint8)
    lib.qk_quantize_dynamic_u8(x.data_ptr(), q.data_ptr(), x.numel(), float(np.float32(1.0 / scale)),
                               float(np.float32(zero_point + 0.5)))
    return q, scale, zero_point


def _quantize_rows_native(lib: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_quantize_rows` in one threaded C pass over the rows of a [M, K] float32 tensor."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.uint8)
    scale, zero_point = torch.empty(m), torch.empty(m, dtype=torch.int32)
    if m and lib.qk_quantize_rows_u8(x.data_ptr(), q.data_ptr(), scale.data_ptr(), zero_point.data_ptr(),
                                     m, k, _EPS):
        raise NonFiniteInputError("input holds NaN or Inf")
    return q, scale, zero_point


class _InputCache(threading.local):
    """The last quantized input, so q/k/v projections of one tensor quantize it once.

    Keyed by storage address, shape, strides and version counter (views of one tensor share
    it); the cached tensor is referenced, so its storage cannot be freed and reused meanwhile.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None
        self.value: tuple | None = None


_CACHE = _InputCache()


def quantize_input(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, object, object]:
    """float32 -> (uint8 data, scale(s), zero point(s)): per tensor (any shape, same shape out)
    or per row ([M, K] only)."""
    # inference tensors (torch.inference_mode) have no version counter: never cached
    key = None if x.is_inference() else (x.data_ptr(), x.shape, x.stride(), x.dtype, x._version, per_row)
    if key is not None and _CACHE.key == key:
        return _CACHE.value
    lib = native.load()
    if lib is not None:  # threaded C passes, bit-equal to numpy's (tested)
        quantize = _quantize_rows_native if per_row else _quantize_tensor_native
        x_q, scale, zero_point = quantize(lib, x.detach().float().contiguous())
        _CACHE.source, _CACHE.key, _CACHE.value = x, key, (x_q, scale, zero_point)
        return x_q, scale, zero_point
    # numpy: single-threaded but with far less per-op overhead than eager torch here; bit-equal
    # to reference.quantize_dynamic_input (tested)
    xn = x.detach().float().contiguous().numpy()
    if per_row:
        q, s_, z_ = _quantize_rows(xn)
        x_q, scale, zero_point = torch.from_numpy(q), torch.from_numpy(s_), torch.from_numpy(z_)
    else:
        q, scale, zero_point = _quantize_tensor(xn)
        x_q = torch.from_numpy(q)
    _CACHE.source, _CACHE.key, _CACHE.value = x, key, (x_q, scale, zero_point)
    return x_q, scale, zero_point


def clear_input_cache() -> None:
    _CACHE.source = _CACHE.key = _CACHE.value = None


def kernel_backend(backend: str, w_q: torch.Tensor) -> str:
    """The backend one weight matrix runs on: ``backend``, except that weights wider than this
    CPU's int8 kernels add exactly take the exact float fallback instead of oneDNN."""
    return "float" if backend == "onednn" and not cpu.weights_fit(w_q) else backend


def resolve_backend(requested: str) -> str:
    """'auto' -> 'onednn' where its int8 kernel works here, else 'reference'."""
    if requested == "reference":
        return "reference"
    if cpu.onednn_available():
        return "onednn"
    if requested == "onednn":
        raise RuntimeError("backend='onednn' requested but torch.ops.onednn int8 kernels are unavailable")
    return "reference"


def _exact_small(x_q: torch.Tensor, x_zp: torch.Tensor | int, w_q: torch.Tensor) -> torch.Tensor:
    """Exact integer accumulator for a few rows: float32 when K allows it, else float64."""
    dtype = torch.float32 if w_q.shape[1] <= _F32_EXACT_K else torch.float64
    zp = x_zp.to(dtype)[:, None] if isinstance(x_zp, torch.Tensor) else float(x_zp)
    return ((x_q.to(dtype) - zp) @ w_q.to(dtype).t()).to(torch.int32)


class DynamicLinearKernel:
    """One int8 weight matrix [N, K] ready to multiply float inputs: ``kernel(x2d, bias)``.

    ``backend`` is "onednn", "reference" or "float" (resolved; see :func:`kernel_backend`). With
    "onednn", calls of at most ``small_m`` rows (``SMALL_M``, or 0 with the native kernels) take
    the exact reference path.
    """

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, backend: str) -> None:
        if w_q.dtype != torch.int8 or w_q.dim() != 2:
            raise ValueError("w_q must be a 2-d int8 tensor [out_features, in_features]")
        self.w_q = w_q.contiguous()
        self.w_scale = w_scale.detach().float().contiguous()
        self.backend = backend
        if backend == "float":
            self.w_float = self.w_q.float()  # integer values: the products are exact in float32
        if backend == "onednn":
            cpu.require_exact_weights(self.w_q, "dynamic int8 Linear")
            self._qlinear = torch.ops.onednn.qlinear_pointwise.default
            self.w_zero_point = torch.zeros(w_q.shape[0], dtype=torch.int64)
            wsum = self.w_q.sum(dim=1, dtype=torch.int64).double()
            self.wsum_scaled = (wsum * self.w_scale.double()).float()
        # native kernels (kept oneDNN primitives, no fixed per-call cost) beat the exact float
        # reference at every row count, so then no call takes the small-M path
        self.natives: dict[tuple | None, native_ops.NativeLinear] | None = (
            {} if backend == "onednn" and native_ops.available() else None)
        self.small_m = 0 if self.natives is not None else SMALL_M

    def _native(self, bias: torch.Tensor | None) -> native_ops.NativeLinear | None:
        """The native kernel with ``bias`` built in (keyed by its storage and version)."""
        if self.natives is None or torch.compiler.is_compiling():
            return None
        key = None if bias is None else (bias.data_ptr(), bias._version)
        op = self.natives.get(key)
        if op is None:
            if len(self.natives) >= 4:
                self.natives.clear()
            b = None if bias is None else bias.detach().float().clone()
            op = self.natives[key] = native_ops.NativeLinear(self.w_q, self.w_scale, bias_float=b)
        return op

    @functools.cached_property
    def packed(self) -> torch.Tensor | None:
        """torch.ops.onednn's prepacked weights (oneDNN backend), built on first use: with the
        native kernels only the torch.compile path needs them."""
        return torch.ops.onednn.qlinear_prepack(self.w_q, None) if self.backend == "onednn" else None

    def uses_onednn(self, rows: int) -> bool:
        return self.backend == "onednn" and rows > self.small_m

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, per_row: bool = False) -> torch.Tensor:
        """x float32 [M, K] -> float32 [M, N]."""
        x_q, scale, zero_point = quantize_input(x, per_row)
        rows = x.shape[0]
        if self.backend == "float":
            zp = zero_point.float()[:, None] if per_row else float(zero_point)
            acc = (x_q.float() - zp) @ self.w_float.t()
            y = acc * (scale[:, None] * self.w_scale[None, :] if per_row else scale * self.w_scale)
            return y if bias is None else y + bias
        if self.uses_onednn(rows):
            return self._onednn(x_q, scale, zero_point, bias, per_row)
        if rows <= SMALL_M:
            acc = _exact_small(x_q, zero_point, self.w_q)
            mult = scale[:, None] * self.w_scale[None, :] if per_row else scale * self.w_scale
            y = acc.to(torch.float32) * mult
            return y if bias is None else y + bias
        if per_row:
            return reference.linear_dynamic_per_row(x_q, scale, zero_point, self.w_q, self.w_scale, bias)
        return reference.linear_dynamic(x_q, scale, zero_point, self.w_q, self.w_scale, bias)

    def onednn_per_tensor(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The hot path: float32 [..., K] (more than ``SMALL_M`` rows, oneDNN kernel built) ->
        float32 [..., N]; leading dims pass through oneDNN, so no reshapes here."""
        x_q, scale, zero_point = quantize_input(x, False)
        native = self._native(bias)
        if native is not None:
            return native(x_q, x_scale=scale, x_zero_point=zero_point)
        return self._qlinear(x_q, scale, zero_point, self.packed, self.w_scale, self.w_zero_point,
                             bias, 1.0, 0, torch.float32, "none", [], "")

    def onednn_per_row(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The per-row hot path: float32 [M, K] -> float32 [M, N] (oneDNN kernel built)."""
        x_q, scale, zero_point = quantize_input(x, True)
        return self._onednn(x_q, scale, zero_point, bias, True)

    def _onednn(self, x_q: torch.Tensor, scale: object, zero_point: object,
                bias: torch.Tensor | None, per_row: bool) -> torch.Tensor:
        op = torch.ops.onednn.qlinear_pointwise
        kept = self._native(bias if not per_row else None)
        if not per_row:
            if kept is not None:
                return kept(x_q, x_scale=float(scale), x_zero_point=int(zero_point))
            return op(x_q, float(scale), int(zero_point), self.packed, self.w_scale, self.w_zero_point,
                      bias, 1.0, 0, torch.float32, "none", [], "")
        if kept is not None:  # sum_k x_q * w * w_scale, then the per-row epilogue in C, in place
            raw = kept(x_q, x_scale=1.0, x_zero_point=0)
            s, z = scale.float().contiguous(), zero_point.to(torch.int32).contiguous()
            b = None if bias is None else bias.detach().float().contiguous()
            native.load().qk_rows_epilogue(raw.data_ptr(), raw.shape[0], raw.shape[1], s.data_ptr(),
                                           z.data_ptr(), self.wsum_scaled.data_ptr(),
                                           None if b is None else b.data_ptr())
            return raw
        raw = op(x_q, 1.0, 0, self.packed, self.w_scale, self.w_zero_point,
                 None, 1.0, 0, torch.float32, "none", [], "")
        # y = s_row * (raw - zp_row * wsum * w_scale) + bias: one rank-1 update, one scaled add
        base = bias if bias is not None else torch.zeros(raw.shape[1])
        y = torch.addr(base.expand_as(raw), zero_point.float() * scale, self.wsum_scaled, alpha=-1.0)
        return y.addcmul_(raw, scale[:, None])

    def reference(self, x: torch.Tensor, bias: torch.Tensor | None, per_row: bool = False) -> torch.Tensor:
        """The specification: same quantized input, float64-exact accumulation."""
        x_q, scale, zero_point = quantize_input(x, per_row)
        if per_row:
            return reference.linear_dynamic_per_row(x_q, scale, zero_point, self.w_q, self.w_scale, bias)
        return reference.linear_dynamic(x_q, scale, zero_point, self.w_q, self.w_scale, bias)
