"""Per-op backend choice: oneDNN int8, the integer reference, or float on dequantized weights.

Why: int8 is not always faster. The rule below comes from ``benchmarks/kernel_table.py --quick``
at 2 threads (torch 2.13, oneDNN 3.12, quanta's native kept primitives), int8 uint8->uint8 time
vs fp32 eager, batch 1:

AVX2 without VNNI (ONEDNN_MAX_CPU_ISA=AVX2, 7-bit weights):
  conv 3x3 1.6-1.9x, 1x1 1.6x, 7x7 stem (3->64) 1.3x, 3x3 stem (3->32) 1.2x, depthwise 3x3
  0.88-1.4x; Linear 0.44-0.85x at M=1, 0.92-1.09x at M=8, 1.14-1.30x at M=32, 1.5-1.6x at M=128.
VNNI/AMX (this machine natively):
  conv 3x3 7-8x, 1x1 2.1-3.2x, 7x7 stem 3.4x, depthwise 1.7-2.6x, 3x3 stem 0.95x;
  Linear 0.76x at M=1 384->384 (147k MACs), 1.5-4x at M=1 from 590k MACs, 2.4x+ from M=8.

Before the native kernels (``torch.ops.onednn`` rebuilds its primitive on every call, ~30-60 us)
small Linear calls lost up to M*K*N ~2M MACs natively and M < 32 on AVX2; the thresholds below
are for the native path, which every x86 torch build with oneDNN symbols gets.

The alternative to an int8 Linear is not fp32 eager but the float path on dequantized weights,
which also fake-quantizes its input (and checks it for NaN/Inf): ~35 us of overhead at M=1. On a
real AVX2 CPU without VNNI (AMD EPYC, session 24; the rows above were measured with oneDNN capped
at AVX2 on a Xeon, against fp32 eager), quanta's int8 Linear beat that float path at every row
count from 1 to 32 on MiniLM's shapes (384->384, 384->1152, 384->1536, 1536->384: M=1 38-79 vs
77-110 us, M=8 53-148 vs 123-312 us), and static MiniLM at batch 1 on an 11-token sentence went
from 0.95-0.97x fp32 (every Linear on the float path) to 1.20-1.42x. So on AVX2 the native path
runs int8 at every row count.

For Linear, M (rows) is known only at run time: ``choose_backend`` returns "onednn" and the
module should call :func:`linear_prefers_int8` per call, running the float op on dequantized
weights (kept beside the int8 ones) when it returns False. "float" is only returned for Linear
when ``shape_info`` carries ``rows``.

shape_info keys: linear: in_features, out_features, optional rows (M); conv1d/conv2d:
in_channels, out_channels, kernel (int or tuple), groups.
"""

from __future__ import annotations

import math

from quanta.kernels.cpu import has_vnni, is_x86, onednn_available
from quanta.kernels.native import ops as native_ops

BACKENDS = ("onednn", "reference", "float")
REQUESTS = ("auto", "reference", "onednn")
_MIN_REDUCTION = 64  # conv C/groups*kh*kw below this: int8 loses (3x3 stem K=27; 7x7 stem K=147 wins)


def _profile() -> str:
    return "vnni" if has_vnni() or not is_x86() else "avx2"


def linear_prefers_int8(rows: int, in_features: int, out_features: int, int8_neighbour: bool = False) -> bool:
    """Whether the oneDNN int8 Linear beats fp32 for an [rows, in_features] input here.

    ``int8_neighbour``: the input arrives as int8 or the output leaves as int8, so the float
    path would add a dequantize or quantize pass; with the native kernels int8 then always
    wins (MNIST CNN b1, two small Linear layers: 577 -> 495 us end to end)."""
    macs = rows * in_features * out_features
    kept = native_ops.available()  # torch.ops.onednn's per-call cost moves the break-even up
    if kept and int8_neighbour:
        return True
    if _profile() == "avx2":
        return True if kept else rows >= 32 and macs >= 8_000_000
    return macs >= (300_000 if kept else 2_000_000)


def _linear(info: dict) -> tuple[str, str]:
    k, n = int(info["in_features"]), int(info["out_features"])
    prof = _profile()
    rows = info.get("rows")
    if rows is not None and not linear_prefers_int8(int(rows), k, n):
        measured = "int8 0.44-1.09x" if prof == "avx2" else "int8 0.76x"
        return "float", f"float faster on this CPU (linear M={rows} {k}->{n}: {measured})"
    if native_ops.available():
        if prof == "avx2":
            return "onednn", "int8 at every row count (avx2: the float path measured slower at M=1-32)"
        rule = "M*K*N>=300k or the input/output is int8"
    else:
        rule = "M>=32 and M*K*N>=8M" if prof == "avx2" else "M*K*N>=2M"
    return "onednn", f"int8 when {rule} ({prof}), float below: chosen per call by rows"


def _conv(info: dict) -> tuple[str, str]:
    c, o = int(info["in_channels"]), int(info["out_channels"])
    groups = int(info.get("groups", 1))
    kernel = info.get("kernel", 1)
    ks = (kernel,) if isinstance(kernel, int) else tuple(kernel)
    kdesc = "x".join(map(str, ks))
    reduction = c // groups * math.prod(ks)
    prof = _profile()
    # Depthwise and 3-channel stem convs were the ops int8 could lose alone (AVX2 0.88-1.4x, 3x3
    # stem natively 0.95x); in a static int8 model the float path would add a dequantize before
    # and a quantize after the op, and end to end int8 wins.
    if groups > 1 and groups == c == o:
        alone = "0.88-1.4x" if prof == "avx2" else "1.7-2.6x"
        return "onednn", f"int8 (depthwise {kdesc}: {alone} alone, faster end to end, {prof})"
    if reduction < _MIN_REDUCTION:
        alone = "1.2x" if prof == "avx2" else "0.95x"
        return "onednn", (f"int8 (conv {c}->{o} {kdesc}, reduction {reduction}: {alone} alone, "
                          f"faster end to end, {prof})")
    measured = "1.6-1.9x" if prof == "avx2" else "2.1-8x"
    return "onednn", f"int8 faster (conv {kdesc}, reduction {reduction}: int8 {measured}, {prof})"


def choose_backend(op_kind: str, shape_info: dict, requested: str) -> tuple[str, str]:
    """(backend, reason) for one op. ``requested`` is the config's "auto"|"reference"|"onednn":
    reference is always honoured, onednn is forced when asked (reference if it cannot run
    here), auto applies the measured rule where oneDNN works and the reference elsewhere."""
    if requested not in REQUESTS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {REQUESTS}")
    if op_kind not in ("linear", "conv1d", "conv2d"):
        raise ValueError(f"no int8 kernel for op kind {op_kind!r}")
    if requested == "reference":
        return "reference", "reference backend requested"
    if not onednn_available():
        return "reference", "oneDNN int8 kernels unavailable in this torch build"
    if requested == "onednn":
        return "onednn", "onednn backend requested"
    return _linear(shape_info) if op_kind == "linear" else _conv(shape_info)
