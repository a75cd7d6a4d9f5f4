"""Fast int8 elementwise add for the oneDNN backend.

``add_uint8`` computes :func:`quanta.kernels.reference.add` in one of two ways:

- A lookup table, bit-identical to the reference by construction: for fixed qparams the
  int8 add is a function of the input pair only, so ``reference.add`` of all 256 x 256 pairs
  is computed once per (qparams, activation) and cached (64 KB, ~1.5 ms to build), and every
  call is ``table[a * 256 + b]`` in numpy. Used for tensors up to 64k elements (layout kept;
  10-15 us at MNIST sizes where a oneDNN call costs ~60 us, and no slower than the float
  expression it replaced up to 64k) and for the cases oneDNN does not take (broadcasting,
  mixed layouts, relu6).
- One oneDNN call for larger same-layout tensors: a depthwise 1x1 convolution with unit weights
  on ``a`` whose "sum" post-op adds ``b`` at its own scale and zero point, then applies ReLU and
  requantizes. One pass over memory, ~40-80 us at ResNet-18 batch-1 sizes (2 threads). oneDNN
  scales in its own float order: its outputs equal the reference except at float ties
  (~1e-6 of elements), by one output quantum (tested). Inputs of any rank work when both have
  the same shape and memory layout: the data is viewed as channels_last [1, C, 1, L] with C the
  innermost dimension, so no copy is made.
"""

from __future__ import annotations

import numpy as np
import torch

from quanta.kernels import native, reference

_UNIT: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_ONEDNN_ACT = {"none": "none", "relu": "relu"}


def _unit_conv(channels: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepacked unit depthwise 1x1 weights for ``channels`` (cached; x qparams are per call)."""
    key = (channels, shape)
    packed = _UNIT.get(key)
    if packed is None:
        if len(_UNIT) >= 256:  # many distinct shapes (dynamic sequence lengths): start over
            _UNIT.clear()
        w_scale = torch.ones(channels)
        w = torch.ones(channels, 1, 1, 1, dtype=torch.int8)
        pw = torch.ops.onednn.qconv_prepack(w, w_scale, 1.0, 0, [1, 1], [0, 0], [1, 1], channels, list(shape))
        packed = _UNIT[key] = (pw, w_scale, torch.zeros(channels, dtype=torch.int64))
    return packed


def _as_channels_last_4d(x: torch.Tensor) -> torch.Tensor | None:
    """A copy-free channels_last [N, C, H, W] view of ``x`` (C innermost in memory), or None."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() >= 1 and x.is_contiguous() and x.shape[-1] > 0:
        c = x.shape[-1]
        return x.view(1, 1, -1, c).permute(0, 3, 1, 2)
    return None


def _dense(t: torch.Tensor) -> bool:
    """Contiguous, or channels_last 4-d: the elements fill memory in some order, no gaps."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


_TABLES: dict[tuple, np.ndarray] = {}


def add_table(
    a_scale: float, a_zp: int, b_scale: float, b_zp: int, out_scale: float, out_zp: int,
    activation: str = "none", numerics: str = "onnxruntime",
) -> np.ndarray:
    """``reference.add`` of every uint8 pair as a flat uint8 array indexed by ``a * 256 + b``,
    cached per qparams, activation and numerics."""
    key = (float(a_scale), int(a_zp), float(b_scale), int(b_zp), float(out_scale), int(out_zp), activation,
           numerics)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 256:  # many distinct qparams (unusual for static sites): start over
            _TABLES.clear()
        v = torch.arange(256, dtype=torch.uint8)
        table = _TABLES[key] = reference.add(v[:, None], *key[:2], v[None, :], *key[2:]).reshape(-1).numpy()
    return table


_NATIVE_EXACT: dict[tuple, tuple | None] = {}


def _native_add(
    a_scale: float, a_zp: int, b_scale: float, b_zp: int, out_scale: float, out_zp: int, activation: str,
    numerics: str,
) -> tuple | None:
    """(C function, its constants) of the native add for these qparams and numerics (ORT's float32
    loop, or XNNPACK's int32 fixed-point loop) if it reproduces ``add_table`` on all 65536 input
    pairs (checked once per qparams), else None."""
    key = (float(a_scale), int(a_zp), float(b_scale), int(b_zp), float(out_scale), int(out_zp), activation,
           numerics)
    if key in _NATIVE_EXACT:
        return _NATIVE_EXACT[key]
    lib, found = native.load(), None
    if lib is not None:
        lo, hi = reference.activation_bounds(activation, out_scale, out_zp)
        if numerics == "xnnpack":
            m_a, m_b, shift = reference.fixed_point_multipliers(a_scale, b_scale, out_scale)
            bias = (1 << (shift - 1)) - (int(a_zp) - 128) * m_a - (int(b_zp) - 128) * m_b
            fits = abs(bias) + 128 * (m_a + m_b) < 2**31  # the C loop sums in int32, as XNNPACK does
            fn, args = lib.qk_add_fixed_u8, (m_a, m_b, bias, shift, int(out_zp), int(lo), int(hi))
        else:
            fits = True
            fn, args = lib.qk_add_u8, (*reference.add_constants(*key[:6]), float(lo), float(hi))
        v = torch.arange(256, dtype=torch.uint8)
        a, b = v.repeat_interleave(256), v.repeat(256)
        y = torch.empty_like(a)
        if fits:
            fn(a.data_ptr(), b.data_ptr(), y.data_ptr(), y.numel(), *args)
            if np.array_equal(y.numpy(), add_table(*key)):
                found = (fn, args)
    if len(_NATIVE_EXACT) >= 256:
        _NATIVE_EXACT.clear()
    _NATIVE_EXACT[key] = found
    return found


_SMALL_NUMEL = 65536  # below this the lookup beats a oneDNN call (~12 vs 62 us at 3k elements)


def add_lookup(
    a: torch.Tensor, a_scale: float, a_zp: int, b: torch.Tensor, b_scale: float, b_zp: int,
    out_scale: float, out_zp: int, activation: str = "none", numerics: str = "onnxruntime",
) -> torch.Tensor:
    """uint8 add by table lookup in numpy, broadcasting like ``a + b``; equals reference.add.
    Same-layout dense inputs are read in memory order and keep their layout (uint16 index and
    ``take``: 49 vs 74 us for intp fancy indexing at 50k elements); others come out contiguous."""
    table = add_table(a_scale, a_zp, b_scale, b_zp, out_scale, out_zp, activation, numerics)
    a_np, b_np = a.numpy(), b.numpy()
    if a.shape == b.shape and a.stride() == b.stride() and _dense(a):
        index = a_np.ravel(order="K").astype(np.uint16)
        index <<= 8
        index |= b_np.ravel(order="K")
        return torch.from_numpy(table.take(index, mode="clip")).as_strided(a.shape, a.stride())
    index = np.bitwise_or(np.left_shift(a_np.astype(np.uint16), 8), b_np)
    return torch.from_numpy(table.take(index, mode="clip"))


def add_uint8(
    a: torch.Tensor, a_scale: float, a_zp: int, b: torch.Tensor, b_scale: float, b_zp: int,
    out_scale: float, out_zp: int, activation: str = "none", numerics: str = "onnxruntime",
) -> torch.Tensor:
    """uint8 + uint8 -> uint8 at (out_scale, out_zp) with optional fused relu/relu6, equal to
    ``reference.add``. Same-layout dense inputs run the native loop of the numerics (float32 or
    XNNPACK's int32 fixed point) where it is exact; XNNPACK's add otherwise by table lookup, never
    the oneDNN add (float32 arithmetic)."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        return reference.add(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, activation, numerics)
    if a.shape == b.shape and a.stride() == b.stride() and _dense(a):
        found = _native_add(a_scale, a_zp, b_scale, b_zp, out_scale, out_zp, activation, numerics)
        if found is not None:
            fn, args = found
            y = torch.empty_like(a)
            fn(a.data_ptr(), b.data_ptr(), y.data_ptr(), a.numel(), *args)
            return y
    if numerics != "onnxruntime":  # the oneDNN add below computes ORT's float32 arithmetic
        return add_lookup(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, activation, numerics)
    if a.shape == b.shape and a.numel() > _SMALL_NUMEL and a.stride() == b.stride() \
            and activation in _ONEDNN_ACT:
        a4 = _as_channels_last_4d(a)
        if a4 is not None:
            b4 = _as_channels_last_4d(b.clone())
            pw, w_scale, w_zp = _unit_conv(a4.shape[1], tuple(a4.shape))
            y = torch.ops.onednn.qconv2d_pointwise.binary(
                a4, float(a_scale), int(a_zp), pw, w_scale, w_zp, b4, None, [1, 1], [0, 0], [1, 1],
                a4.shape[1], float(out_scale), int(out_zp), None, float(b_scale), int(b_zp), "sum", 1.0,
                _ONEDNN_ACT[activation], [], "",
            )
            return y if a.dim() == 4 and y.shape == a.shape else y.permute(0, 2, 3, 1).reshape(a.shape)
    return add_lookup(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, activation)


def mul_uint8(
    a: torch.Tensor, a_scale: float, a_zp: int, b: torch.Tensor, out_scale: float, out_zp: int,
    activation: str = "none",
) -> torch.Tensor:
    """uint8 ``a`` times float ``b`` -> uint8 at (out_scale, out_zp), equal to ``reference.mul``:
    one native pass for a channels_last [N, C, H, W] ``a`` and a channel gate ``b`` of shape
    [N or 1, C, 1, 1] (squeeze-excite), the reference elsewhere."""
    lib = native.load()
    if lib is None or a.dtype != torch.uint8 or a.dim() != 4 or b.dim() != 4 \
            or not a.is_contiguous(memory_format=torch.channels_last) \
            or b.shape[1] != a.shape[1] or b.shape[2:] != (1, 1) or b.shape[0] not in (1, a.shape[0]):
        return reference.mul(a, a_scale, a_zp, b, out_scale, out_zp, activation)
    n, c, h, w = a.shape
    g = b.detach().float().reshape(b.shape[0], c).contiguous()
    lo, hi = reference.activation_bounds(activation, out_scale, out_zp)
    y = torch.empty_like(a)
    lib.qk_mul_channel_u8(a.data_ptr(), g.data_ptr(), y.data_ptr(), n, h * w, c, c if b.shape[0] > 1 else 0,
                          float(a_scale), int(a_zp), float(out_scale), int(out_zp), float(lo), float(hi))
    return y


_REQUANT: dict[tuple, np.ndarray] = {}


def requantize_uint8(q: torch.Tensor, scale: float, zp: int, out_scale: float, out_zp: int) -> torch.Tensor:
    """``reference.requantize`` by table lookup: a function of the uint8 value alone, so the 256
    answers are computed once per qparams pair (bit-identical by construction) and every call is
    one numpy ``take`` in memory order (layout kept)."""
    if (scale, zp) == (out_scale, out_zp):
        return q
    if q.dtype != torch.uint8 or not _dense(q):
        return reference.requantize(q, scale, zp, out_scale, out_zp)
    key = (float(scale), int(zp), float(out_scale), int(out_zp))
    table = _REQUANT.get(key)
    if table is None:
        if len(_REQUANT) >= 1024:
            _REQUANT.clear()
        table = _REQUANT[key] = reference.requantize(torch.arange(256, dtype=torch.uint8), *key).numpy()
    out = table.take(q.numpy().ravel(order="K"))
    return torch.from_numpy(out).as_strided(q.shape, q.stride())


class ChannelGate:
    """``a * dequantize(g)`` requantized, for a uint8 squeeze-excite gate ``g`` at (g_scale, g_zp):
    the graph runtime's lowering of an int8 site ``x * gate``. Equal to ``mul_uint8(a, ...,
    dequantize_per_tensor(g), ...)``; the native pass dequantizes the gate itself (the same float32
    operations), so a call is one C call instead of four torch ops and a C call. Qparams are fixed
    at build."""

    def __init__(self, a_scale: float, a_zp: int, g_scale: float, g_zp: int, out_scale: float, out_zp: int,
                 activation: str = "none") -> None:
        self.a = (float(a_scale), int(a_zp))
        self.g = (float(g_scale), int(g_zp))
        self.out = (float(out_scale), int(out_zp), activation)
        lo, hi = reference.activation_bounds(activation, out_scale, out_zp)
        self.lib = native.load()
        self.args = (*self.a, *self.g, *self.out[:2], float(lo), float(hi))  # the C call's qparams

    def __call__(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.lib is not None and a.dtype == torch.uint8 and g.dtype == torch.uint8 and a.dim() == 4 \
                and g.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = a.shape
            gn = g.shape[0]
            if g.shape[1] == c and g.shape[2] == 1 and g.shape[3] == 1 and gn in (1, n) and _dense(g):
                y = torch.empty_like(a)
                if self.lib.qk_mul_channel_gate_u8(a.data_ptr(), g.data_ptr(), y.data_ptr(), n, h * w, c,
                                                   c if gn > 1 else 0, *self.args):
                    raise MemoryError("out of memory for the squeeze-excite gate")
                return y
        return mul_uint8(a, *self.a, reference.dequantize_per_tensor(g, *self.g), *self.out)
