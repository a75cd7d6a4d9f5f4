"""Native int8 Conv2d / Linear: one oneDNN primitive per input shape, built once and kept.

The epilogue is chosen so oneDNN computes what :mod:`quanta.kernels.reference` specifies:
- uint8 output with none / relu / relu6: weight scales = the reference's single multiplier
  ``M = f32(f32(s_x * s_w) / s_y)``, no dst scale, ``bias * M`` added, the activation as a clamp
  in output units. Without bias and with an even output zero point this is the reference bit for
  bit. oneDNN adds the output zero point before rounding and the bias product after its own
  rounding, so otherwise a .5 tie (~5e-6 of outputs) can land 1 LSB away, as on torch.ops.
- zero points of 0 are left out of the primitive: no weight compensation, ~2x faster convs.
- float32 output, or GELU before uint8: weight scales = ``f32(s_x * s_w)``, float bias, the
  activation in float, then (uint8) oneDNN's dst scale ``s_y``.
- dynamic (float input quantized per call): ``s_x`` and ``zp_x`` are runtime arguments.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from quanta.kernels import native

_ACTIVATION = {"none": 0, "relu": 1, "relu6": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "hardswish": 6,
               "sigmoid": 7, "hardsigmoid": 8}
# oneDNN eltwise (alpha, beta) of the activations that take them (swish: x * sigmoid(alpha * x))
_ALPHA_BETA = {"silu": (1.0, 0.0), "hardswish": (1.0 / 6.0, 0.5), "hardsigmoid": (1.0 / 6.0, 0.5)}
_MAX_SHAPES = 8  # primitives kept per layer; each holds its own reordered weights


def available() -> bool:
    return native.load() is not None


class _Primitive:
    """One built oneDNN op, destroyed when the last reference goes: a call in flight holds one,
    so evicting the op from its layer's cache never frees it under a running kernel."""

    __slots__ = ("lib", "handle")

    def __init__(self, lib: ctypes.CDLL, handle: int) -> None:
        self.lib, self.handle = lib, handle

    def __del__(self) -> None:
        self.lib.qk_destroy(self.handle)


class _Handles:
    """Built primitives of one layer by call key, oldest evicted first. Lookups are plain dict
    reads (safe under the GIL); inserting and evicting take a lock."""

    def __init__(self) -> None:
        self.lib = native.load()
        self.items: dict[tuple, tuple[_Primitive, object]] = {}
        self.lock = threading.Lock()

    def put(self, key: tuple, handle: int, extra: object) -> tuple[_Primitive, object]:
        """Keep ``(handle, extra)`` under ``key`` and return the kept entry."""
        entry = (_Primitive(self.lib, handle), extra)
        with self.lock:
            entry = self.items.setdefault(key, entry)  # another thread may have built it first
            while len(self.items) > _MAX_SHAPES:
                del self.items[next(iter(self.items))]
        return entry

    def __getstate__(self) -> dict:
        return {}  # a copy starts empty and builds its own primitives (never shares a handle)

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _epilogue(
    activation: str, out_scale: float | None, runtime_src_scale: bool, src_zp: bool, dst_zp: bool,
) -> tuple[native.Epilogue, bool]:
    """The C epilogue and whether weights carry the single requantization multiplier."""
    if activation not in _ACTIVATION:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(_ACTIVATION)}")
    multiplier = out_scale is not None and activation in ("none", "relu", "relu6")
    e = native.Epilogue(dst_f32=int(out_scale is None), activation=_ACTIVATION[activation],
                        src_scale=int(runtime_src_scale),
                        dst_scale=int(out_scale is not None and not multiplier),
                        src_zp=int(src_zp), dst_zp=int(dst_zp))
    if activation in _ALPHA_BETA:
        e.alpha, e.beta = _ALPHA_BETA[activation]
    if activation == "relu6":
        e.alpha, e.beta = 0.0, 6.0
        if multiplier:  # clamp in output units: the reference's quantized 6 is round(f32(6) / s_y)
            e.beta = float(torch.tensor(6.0) / torch.tensor(out_scale, dtype=torch.float32))
    return e, multiplier


def _scales_and_bias(
    x_scale: float | None, w_scale: torch.Tensor, bias_i32: torch.Tensor | None,
    bias_float: torch.Tensor | None, out_scale: float | None, multiplier: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 per-channel weight scales and the float32 bias added after them."""
    w_scale = w_scale.float()
    if x_scale is None:  # dynamic: s_x at run time, float bias as given
        return w_scale.contiguous(), None if bias_float is None else bias_float.float().contiguous()
    sx = torch.tensor(x_scale, dtype=torch.float32)
    scales = sx * w_scale
    if multiplier:
        scales = scales / torch.tensor(out_scale, dtype=torch.float32)
    bias = None if bias_i32 is None else (bias_i32.double() * scales.double()).float()
    return scales.contiguous(), bias


class NativeConv2d:
    """uint8 NHWC conv through a kept primitive. Args as :class:`quanta.kernels.onednn.PackedConv`
    after its Conv1d-as-Conv2d rewrite: w_q int8 [O, C/g, kh, kw], 2-d stride/padding/dilation."""

    def __init__(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias_i32: torch.Tensor | None,
        x_scale: float, x_zero_point: int, stride: list[int], padding: list[int],
        dilation: list[int], groups: int,
    ) -> None:
        self.w_q = w_q.detach().contiguous()
        self.w_scale, self.bias_i32 = w_scale.detach(), bias_i32
        self.x_scale, self.x_zero_point = float(x_scale), int(x_zero_point)
        self.geometry = torch.tensor([*stride, *padding, *padding, *(d - 1 for d in dilation)],
                                     dtype=torch.int64)
        self.groups = int(groups)
        self.handles = _Handles()

    def _build(self, shape: tuple[int, ...], activation: str, out_scale: float | None,
               dst_zp: bool) -> tuple:
        e, multiplier = _epilogue(activation, out_scale, False, self.x_zero_point != 0, dst_zp)
        scales, bias = _scales_and_bias(self.x_scale, self.w_scale, self.bias_i32, None, out_scale,
                                        multiplier)
        o, per_group, kh, kw = self.w_q.shape
        if len(shape) != 4 or shape[1] != per_group * self.groups:
            want = per_group * self.groups
            raise ValueError(f"conv input {list(shape)}: expected NCHW with {want} channels")
        shape_t = torch.tensor(shape, dtype=torch.int64)
        lib = self.handles.lib
        handle = lib.qk_conv_create(
            shape_t.data_ptr(), o, self.groups, kh, kw, self.geometry.data_ptr(), self.w_q.data_ptr(),
            scales.data_ptr(), None if bias is None else bias.data_ptr(), ctypes.byref(e),
            self.x_zero_point)
        if not handle:
            raise RuntimeError(f"oneDNN conv for input {list(shape)}: {native.last_error()}")
        g = self.geometry.tolist()
        out_hw = [(shape[2 + i] + 2 * g[2 + i] - (g[6 + i] + 1) * (k - 1) - 1) // g[i] + 1
                  for i, k in enumerate((kh, kw))]
        dst_scale = 1.0 if multiplier or out_scale is None else out_scale
        return handle, (shape[0], out_hw[0], out_hw[1], o), dst_scale

    def primitive(
        self, shape: torch.Size, activation: str, out_scale: float | None, out_zero_point: int,
    ) -> tuple[_Primitive, tuple[int, ...], float]:
        """The kept primitive for this input shape and epilogue (built on first use), its NHWC
        output shape and the dst scale to pass at run time."""
        key = (shape, activation, out_scale, out_zero_point != 0)
        hit = self.handles.items.get(key)  # hot path: a plain dict lookup (eviction is by age)
        if hit is None:
            handle, out_shape, dst_scale = self._build(tuple(shape), activation, out_scale, key[3])
            hit = self.handles.put(key, handle, (out_shape, dst_scale))
        op, (out_shape, dst_scale) = hit
        return op, out_shape, dst_scale

    def implementation(self, shape: tuple[int, ...]) -> str:
        """oneDNN's name for the kernel it picks for this input shape ("ref:any" is its scalar
        reference, which it falls back to for shapes no fast kernel takes). The primitive built to
        ask is dropped, not cached: it would keep its own copy of the weights for no call."""
        handle, _, _ = self._build(tuple(shape), "none", None, False)
        op = _Primitive(self.handles.lib, handle)
        return (op.lib.qk_impl_name(op.handle) or b"").decode()

    def __call__(
        self, x_u8: torch.Tensor, activation: str = "none",
        out_scale: float | None = None, out_zero_point: int = 0,
    ) -> torch.Tensor:
        """x_u8 uint8 NCHW (channels_last) -> channels_last float32, or uint8 with ``out_scale``."""
        x_u8 = x_u8.contiguous(memory_format=torch.channels_last)
        op, out_shape, dst_scale = self.primitive(x_u8.shape, activation, out_scale, out_zero_point)
        y = torch.empty(out_shape, dtype=torch.float32 if out_scale is None else torch.uint8)
        if op.lib.qk_run(op.handle, x_u8.data_ptr(), y.data_ptr(), 1.0, self.x_zero_point,
                                   dst_scale, out_zero_point):
            raise RuntimeError(f"oneDNN conv failed: {native.last_error()}")
        return y.permute(0, 3, 1, 2)


class BoundConv2d:
    """``conv(x, activation, out_scale, out_zero_point)`` with the epilogue fixed: the graph
    runtime's call of one conv node. It keeps the primitive of the last input shape, so a call is
    a shape check, an output allocation and the C call (the general path looks the primitive up
    by a key tuple per call: ~8 us of Python per conv at batch 1)."""

    __slots__ = ("conv", "args", "dtype", "run", "last")

    def __init__(
        self, conv: NativeConv2d, activation: str, out_scale: float | None, out_zero_point: int,
    ) -> None:
        self.conv, self.args = conv, (activation, out_scale, int(out_zero_point))
        self.dtype = torch.float32 if out_scale is None else torch.uint8
        self.run = conv.handles.lib.qk_run
        self.last: tuple | None = None  # (input shape, primitive, output shape, dst scale)

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        last = self.last
        if last is None or x_u8.shape != last[0] or not x_u8.is_contiguous(memory_format=torch.channels_last):
            x_u8 = x_u8.contiguous(memory_format=torch.channels_last)
            last = self.last = (x_u8.shape, *self.conv.primitive(x_u8.shape, *self.args))  # one tuple:
            # atomic for other threads, and it holds the primitive even if the layer's cache evicts it
        _, op, out_shape, dst_scale = last
        y = torch.empty(out_shape, dtype=self.dtype)
        if self.run(op.handle, x_u8.data_ptr(), y.data_ptr(), 1.0, self.conv.x_zero_point, dst_scale,
                    self.args[2]):
            raise RuntimeError(f"oneDNN conv failed: {native.last_error()}")
        return y.permute(0, 3, 1, 2)


class NativeLinear:
    """uint8 [..., K] x int8 [N, K] through a kept matmul primitive per row count.

    Static: ``x_scale`` / ``x_zero_point`` fixed and ``bias_i32`` given. Dynamic: ``x_scale=None``,
    ``bias_float`` given, and the input's scale / zero point passed on every call.
    """

    def __init__(
        self, w_q: torch.Tensor, w_scale: torch.Tensor, bias_i32: torch.Tensor | None = None,
        x_scale: float | None = None, x_zero_point: int = 0, bias_float: torch.Tensor | None = None,
    ) -> None:
        self.w_q = w_q.detach().contiguous()
        self.out_features, self.in_features = self.w_q.shape
        self.w_scale, self.bias_i32, self.bias_float = w_scale.detach(), bias_i32, bias_float
        self.x_scale = None if x_scale is None else float(x_scale)
        self.x_zero_point = int(x_zero_point)
        self.handles = _Handles()

    def _build(self, rows: int, activation: str, out_scale: float | None, dst_zp: bool) -> tuple:
        dynamic = self.x_scale is None
        e, multiplier = _epilogue(activation, out_scale, dynamic, dynamic or self.x_zero_point != 0, dst_zp)
        scales, bias = _scales_and_bias(self.x_scale, self.w_scale, self.bias_i32, self.bias_float,
                                        out_scale, multiplier)
        handle = self.handles.lib.qk_linear_create(
            rows, self.in_features, self.out_features, self.w_q.data_ptr(), scales.data_ptr(),
            None if bias is None else bias.data_ptr(), ctypes.byref(e), self.x_zero_point)
        if not handle:
            raise RuntimeError(f"oneDNN matmul for {rows} rows: {native.last_error()}")
        return handle, 1.0 if multiplier or out_scale is None else out_scale

    def primitive(
        self, rows: int, activation: str, out_scale: float | None, out_zero_point: int,
    ) -> tuple[_Primitive, float]:
        """The kept primitive for ``rows`` input rows and this epilogue (built on first use) and
        the dst scale to pass at run time."""
        key = (rows, activation, out_scale, out_zero_point != 0)
        hit = self.handles.items.get(key)
        if hit is None:
            hit = self.handles.put(key, *self._build(*key))
        return hit

    def __call__(
        self, x_u8: torch.Tensor, activation: str = "none", out_scale: float | None = None,
        out_zero_point: int = 0, x_scale: float = 1.0, x_zero_point: int | None = None,
    ) -> torch.Tensor:
        """x_u8 uint8 [..., K] -> float32 [..., N], or uint8 with ``out_scale``. ``x_scale`` /
        ``x_zero_point``: the per-call input qparams (dynamic mode only)."""
        if not x_u8.is_contiguous():
            x_u8 = x_u8.contiguous()
        if x_u8.dim() == 0 or x_u8.shape[-1] != self.in_features:
            raise ValueError(f"matmul input {list(x_u8.shape)}: expected {self.in_features} features last")
        op, dst_scale = self.primitive(x_u8.numel() // self.in_features, activation, out_scale,
                                       out_zero_point)
        y = torch.empty((*x_u8.shape[:-1], self.out_features),
                        dtype=torch.float32 if out_scale is None else torch.uint8)
        zp = self.x_zero_point if x_zero_point is None else x_zero_point
        if op.lib.qk_run(op.handle, x_u8.data_ptr(), y.data_ptr(), x_scale, zp, dst_scale,
                                   out_zero_point):
            raise RuntimeError(f"oneDNN matmul failed: {native.last_error()}")
        return y
