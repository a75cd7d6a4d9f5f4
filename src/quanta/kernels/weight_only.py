"""Weight-only linear: float activations times int8 or int4 weights.

Formats (what :class:`quanta.modules.weight_only.WeightOnlyLinear` stores):
- **int8**: ``q`` int8 [N, K], symmetric per output channel: ``w = q * scale[n]``.
- **int4**: ``q`` in 0..15 packed two per byte, uint8 [N, K / 2] (in each block of 32 columns byte
  ``b`` holds column ``b`` in its low nibble and column ``b + 16`` in its high one, so the kernel
  unpacks a block with one mask and one shift); per group of ``group`` columns (a multiple of 32;
  the last group of a row may be shorter) ``w = q * scale[n, g] + offset[n, g]``. Asymmetric
  groups store ``offset = min(w)``; symmetric ones ``offset = -8 * scale`` (q - 8 in -8..7).

:func:`reference_linear` is the specification: the integer weights times their scales in
float64. :func:`linear` is the fast path: the native GEMV (``native/weight_only.c``, weights
dequantized in registers inside the dot product) for few rows (decode), and for many rows
(prefill) the weights dequantized by a native pass followed by a float32 matmul (tile by tile
when the matrix is larger than the cache).

int4 decode with ``int8_activations`` (``QuantConfig.int4_activations="int8"``, the default):
the GEMV quantizes each row of x per block of 32 columns to int8 and sums each block's products
exactly in integers (``native/weight_only_q8.c``, as llama.cpp's Q4 x Q8 and ONNX Runtime's
MatMulNBits at accuracy level 4). Its specification is :func:`reference_linear_int8_activations`.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from quanta.kernels import native

PREFILL_ROWS = 8  # rows from which dequantize + one sgemm beats the GEMV (measured, 2 threads)
TILED_FROM_WEIGHTS = 1 << 22  # a matrix this large (16 MiB as float32) is dequantized tile by tile
TILE_WEIGHTS = 1 << 18  # weights per tile (1 MiB as float32: stays in L2 for its sgemm)
_TINY = float(torch.finfo(torch.float32).tiny)


def quantize_int8(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a float [N, K] weight: (q int8, scale float32 [N])."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(_TINY)
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def padded_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, G, group] view of [N, K] with the last group padded by repeating its last column
    (which changes no group's min, max or absolute max)."""
    n, k = w.shape
    groups = -(-k // group)
    pad = groups * group - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, groups, group)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit groups of a float [N, K] weight (K a multiple of 32): (packed uint8 [N, K/2],
    scale float32 [N, G], offset float32 [N, G])."""
    w = w.detach().float()
    n, k = w.shape
    if k % 32 or group % 32 or group <= 0:
        raise ValueError(f"int4 weights need in_features and group_size multiples of 32, got {k} and {group}")
    g = padded_groups(w, group)
    if symmetric:
        scale = (g.abs().amax(dim=2) / 7.0).clamp_min(_TINY)
        offset = -8.0 * scale
    else:
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale, offset = ((hi - lo) / 15.0).clamp_min(_TINY), lo
    q = torch.round((g - offset[..., None]) / scale[..., None]).clamp_(0, 15)
    q = q.reshape(n, -1)[:, :k].to(torch.uint8)
    return pack_int4(q), scale, offset


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in 0..15 -> uint8 [N, K/2] in the kernel's nibble layout."""
    n, k = q.shape
    blocks = q.reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K/2] -> uint8 [N, K] values in 0..15."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // 16, 1, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(n, half * 2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that the integers stand for (int8 when ``offset`` is None)."""
    if offset is None:
        return q.to(dtype) * scale.to(dtype)[:, None]
    values = unpack_int4(q).to(dtype)
    k = values.shape[1]
    cols = torch.arange(k) // group
    return values * scale.to(dtype)[:, cols] + offset.to(dtype)[:, cols]


def reference_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                     group: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The specification, in float64: x [M, K] @ dequantized(w).T + bias, returned as float32."""
    y = x.double() @ dequantize(q, scale, offset, group, torch.float64).T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def quantize_activation_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [M, K] (K a multiple of 32) -> (xq int8 [M, K], xs float32 [M, K / 32]): per block
    of 32 columns xs = max|x| / 127 and xq = round-half-even(x / xs) (0 for an all-zero block)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    xs = blocks.abs().amax(dim=2) / 127.0
    safe = torch.where(xs > 0, xs, torch.ones_like(xs))
    xq = torch.where(xs[..., None] > 0, torch.round(blocks / safe[..., None]), torch.zeros_like(blocks))
    return xq.clamp_(-127, 127).to(torch.int8).reshape(m, k), xs


def reference_linear_int8_activations(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                                      offset: torch.Tensor, group: int, bias: torch.Tensor | None
                                      ) -> torch.Tensor:
    """The specification of the int4 GEMV with int8 activations, in integers and float64:
    y = sum_b xs_b scale_g(b) sum_{i in b} (q_i - 8) xq_i + sum_g (offset_g + 8 scale_g) sum_{i in g} x_i
    (+ bias); for finite x (the kernel runs the float GEMV, :func:`reference_linear`, otherwise)."""
    m, k = x.shape
    n, blocks, per = q.shape[0], k // 32, group // 32
    xq, xs = quantize_activation_blocks(x)
    centred = (unpack_int4(q).to(torch.int32) - 8).reshape(n, blocks, 32)
    # [M, N, B] block sums, exact: |sum| <= 32 * 8 * 127; an integer einsum keeps no [M, N, B, 32] product
    dots = torch.einsum("nbk,mbk->mnb", centred, xq.to(torch.int32).reshape(m, blocks, 32))
    block_group = torch.arange(blocks) // per
    y = (dots.double() * xs.double()[:, None, :] * scale.double()[None, :, block_group]).sum(dim=2)
    xsum = torch.zeros(m, scale.shape[1], dtype=torch.float64)
    xsum.index_add_(1, block_group, x.double().reshape(m, blocks, 32).sum(dim=2))
    y = y + xsum @ (offset.double() + 8.0 * scale.double()).T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def native_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                  group: int, bias: torch.Tensor | None, plain: bool = False,
                  int8_activations: bool = False) -> torch.Tensor:
    """The native GEMV: x float32 [M, K] contiguous -> float32 [M, N]. ``plain``: the non-AVX2 build;
    ``int8_activations``: int4 weights times x quantized per block of 32 (ignored for int8 weights)."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {native.unavailable_reason()}")
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if offset is None:
        lib.qk_wo_linear_s8(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), n, _ptr(bias),
                            y.data_ptr(), ctypes.c_int(plain))
    else:
        gemv = lib.qk_wo_linear_u4_q8 if int8_activations else lib.qk_wo_linear_u4
        gemv(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), offset.data_ptr(), group, n, _ptr(bias),
             y.data_ptr(), ctypes.c_int(plain))
    return y


def native_quantize_activation_blocks(x: torch.Tensor, plain: bool = False
                                      ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The C pass of :func:`quantize_activation_blocks` (xq, xs, whether x held NaN/Inf), for tests;
    ``plain``: the loop without AVX2."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {native.unavailable_reason()}")
    x = x.float().contiguous()
    m, k = x.shape
    xq, xs = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // 32, dtype=torch.float32)
    nonfinite = lib.qk_wo_quantize_blocks(x.data_ptr(), m, k, xq.data_ptr(), xs.data_ptr(),
                                          ctypes.c_int(plain))
    return xq, xs, bool(nonfinite)


def native_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
                      *, plain: bool = False) -> torch.Tensor:
    """:func:`dequantize` by one threaded native pass (float32; ``plain``: the loops without AVX2,
    as on CPUs without it)."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {native.unavailable_reason()}")
    n = q.shape[0]
    k = q.shape[1] if offset is None else q.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.float32)
    if offset is None:
        lib.qk_wo_dequant_s8(q.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), int(plain))
    else:
        lib.qk_wo_dequant_u4(q.data_ptr(), scale.data_ptr(), offset.data_ptr(), group, n, k, out.data_ptr(),
                             int(plain))
    return out


def _tiled_prefill(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   group: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Many rows times a matrix larger than the cache: dequantize TILE_WEIGHTS at a time and
    multiply while the tile is in cache, instead of writing and re-reading the whole float32
    matrix (an LM head, 49152 x 576 at 128 rows: 99 -> 41 ms, fp32 59 ms; AMD EPYC, 2 threads).
    Returns [M, N] as a transposed view of a [N, M] tensor."""
    n, k = q.shape[0], x.shape[1]
    rows = max(16, TILE_WEIGHTS // k)
    out = torch.empty(n, x.shape[0], dtype=torch.float32)  # y transposed: each tile's rows are contiguous
    xt = x.t()
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        tile = native_dequantize(q[start:stop], scale[start:stop],
                                 None if offset is None else offset[start:stop], group)
        torch.mm(tile, xt, out=out[start:stop])
    if bias is not None:
        out += bias[:, None]
    return out.t()  # a transposed view: a copy to [M, N] order costs a fifth of the whole call


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
           bias: torch.Tensor | None, int8_activations: bool = False) -> torch.Tensor:
    """float32 x [M, K] (contiguous) -> [M, N]: GEMV for few rows (int4 with ``int8_activations``:
    x quantized per block of 32); for many, dequantize + sgemm (tile by tile for matrices larger
    than the cache, whose result is a transposed view); torch ops on float activations when the
    native kernels are unavailable."""
    if native.load() is None:
        return F.linear(x, dequantize(q, scale, offset, group), bias)
    if x.shape[0] < PREFILL_ROWS:
        return native_linear(x, q, scale, offset, group, bias, int8_activations=int8_activations)
    if q.shape[0] * x.shape[1] >= TILED_FROM_WEIGHTS:
        return _tiled_prefill(x, q, scale, offset, group, bias)
    return F.linear(x, native_dequantize(q, scale, offset, group), bias)


# The op ``torch.compile`` keeps whole: dynamo cannot trace the native kernels' ctypes calls (each
# would break the graph), but it keeps a registered op opaque. Defined through a plain
# ``torch.library.Library`` with a CPU kernel rather than ``torch.library.custom_op``, whose Python
# autograd and dispatch wrapper cost ~20 us per call (measured: 51 vs 33 us per op in a compiled
# chain of 576 x 576 GEMVs, where the kernel alone takes ~20-29 us; SmolLM2 decodes 211 per token).
_LIBRARY = torch.library.Library("quanta", "DEF")
_LIBRARY.define("weight_only_linear(Tensor x, Tensor q, Tensor scale, Tensor? offset, int group, "
                "Tensor? bias, bool int8_activations=False) -> Tensor")


def _linear_op_kernel(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                      group: int, bias: torch.Tensor | None, int8_activations: bool = False) -> torch.Tensor:
    """:func:`linear` with a contiguous output, as the fake below says (``linear`` may return a
    transposed view)."""
    return linear(x, q, scale, offset, group, bias, int8_activations).contiguous()


def _linear_op_shape(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                     group: int, bias: torch.Tensor | None, int8_activations: bool = False) -> torch.Tensor:
    return x.new_empty((x.shape[0], scale.shape[0]))


_LIBRARY.impl("weight_only_linear", _linear_op_kernel, "CPU")
torch.library.register_fake("quanta::weight_only_linear", _linear_op_shape, lib=_LIBRARY)
#: :func:`linear` as one opaque torch op (inference only: it has no autograd formula)
linear_op = torch.ops.quanta.weight_only_linear.default
