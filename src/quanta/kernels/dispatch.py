"""Per-op backend choice: oneDNN int8, the integer reference, or float on dequantized weights.

Why: int8 is not always faster. The rule below comes from ``benchmarks/kernel_table.py`` at
2 threads (torch 2.13, oneDNN 3.12), int8 uint8->uint8 time vs fp32 eager:

AVX2 without VNNI (ONEDNN_MAX_CPU_ISA=AVX2, 7-bit weights):
  conv 3x3 1.5-1.7x, 1x1 1.1-1.8x, 7x7 stem (3->64) 1.3x; depthwise 3x3 0.47-0.87x (1.2x once),
  3x3 stem (3->32) 0.84-0.91x; Linear 0.25-0.83x for M<=8, 0.84-1.25x at M=32, 1.3-1.6x at M=128.
VNNI/AMX (this machine natively):
  conv 3x3 5-8x, 1x1 2.8-4x (one outlier: 160->960 @7x7 batch 1 0.35x), 7x7 stem 2.8-3.2x,
  depthwise 0.98-1.9x, 3x3 stem 0.74-0.78x;
  Linear 0.34-0.73x when M*K*N < ~1.2M MACs, 1.3-9x above ~2M.

oneDNN has a fixed ~30 us cost per call, so small Linear calls lose. For Linear, M (rows) is
known only at run time: ``choose_backend`` returns "onednn" and the module should call
:func:`linear_prefers_int8` per call, running the float op on dequantized weights (kept
beside the int8 ones) when it returns False. "float" is only returned for Linear when
``shape_info`` carries ``rows``.

shape_info keys: linear: in_features, out_features, optional rows (M); conv1d/conv2d:
in_channels, out_channels, kernel (int or tuple), groups.
"""

from __future__ import annotations

import math

from quanta.kernels.cpu import has_vnni, is_x86, onednn_available

BACKENDS = ("onednn", "reference", "float")
REQUESTS = ("auto", "reference", "onednn")
_MIN_REDUCTION = 64  # conv C/groups*kh*kw below this: int8 loses (3x3 stem K=27; 7x7 stem K=147 wins)


def _profile() -> str:
    return "vnni" if has_vnni() or not is_x86() else "avx2"


def linear_prefers_int8(rows: int, in_features: int, out_features: int) -> bool:
    """Whether the oneDNN int8 Linear beats fp32 for an [rows, in_features] input here."""
    macs = rows * in_features * out_features
    if _profile() == "avx2":
        return rows >= 32 and macs >= 8_000_000
    return macs >= 2_000_000


def conv_prefers_int8(macs: int) -> bool:
    """Whether a oneDNN int8 conv call of ``macs`` multiply-accumulates beats fp32 here.

    The ~30-35 us fixed cost per oneDNN call dominates tiny convs: measured natively (1 thread)
    3x3 16->16 at 14x14 (0.45M MACs) int8 37 us vs fp32 23 us; 32->32 at 7x7 42 vs 29 us;
    64->64 at 56x56 (116M MACs) 118 us vs ~1 ms. AVX2 threshold is scaled like Linear's."""
    return macs >= (8_000_000 if _profile() == "avx2" else 2_000_000)


def _linear(info: dict) -> tuple[str, str]:
    k, n = int(info["in_features"]), int(info["out_features"])
    prof = _profile()
    rows = info.get("rows")
    if rows is not None and not linear_prefers_int8(int(rows), k, n):
        measured = "int8 0.25-0.84x" if prof == "avx2" else "int8 0.34-0.73x"
        return "float", f"float faster on this CPU (linear M={rows} {k}->{n}: {measured})"
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
    # Depthwise and 3-channel stem convs lose alone on AVX2 (int8 0.47-0.91x), but in a static
    # int8 model the float path adds a dequantize before and a quantize after the op, and end
    # to end int8 wins: MobileNetV2 b1 on AVX2 (emulated) 0.70x with them float, 1.15x int8.
    if groups > 1 and groups == c == o:
        alone = "0.47-0.87x" if prof == "avx2" else "0.98-1.9x"
        return "onednn", f"int8 (depthwise {kdesc}: {alone} alone, faster end to end, {prof})"
    if reduction < _MIN_REDUCTION:
        alone = "0.84-0.91x" if prof == "avx2" else "0.74-0.78x"
        return "onednn", (f"int8 (conv {c}->{o} {kdesc}, reduction {reduction}: {alone} alone, "
                          f"faster end to end, {prof})")
    measured = "1.1-1.8x" if prof == "avx2" else "2.8-8x"
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
