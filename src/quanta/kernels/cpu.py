"""What this CPU's int8 kernels compute exactly, and the one rule that keeps them exact.

Why: on x86 without VNNI, oneDNN (like fbgemm and ONNX Runtime's MLAS) multiplies u8 x s8 with
AVX2 ``vpmaddubsw``, which adds pairs of products into a saturating int16. Full-range 8-bit
weights then give wrong results (measured: up to ~20% output error). Weights with
``|w| <= 64`` keep every pair sum within ``2 * 255 * 64 = 32640 <= 32767`` and are exact; 7-bit
weights ([-64, 63]) always are. With VNNI/AMX (``vpdpbusd`` accumulates into int32) or on
non-x86 CPUs any int8 weight is exact.

The facts come from what the kernels will use, not from /proc/cpuinfo (which an emulator or a
hypervisor may not match): oneDNN's own effective ISA when quanta's native library is loaded
(it honours ``ONEDNN_MAX_CPU_ISA``), else torch's cpuid check plus that ISA cap.

The invariant: no kernel computes on weights wider than :func:`exact_weight_limit`.
:func:`require_exact_weights` is the gate every oneDNN weight passes through (the Linear, Conv
and dynamic kernels' constructors call it); backend selection asks :func:`weights_fit` first
and runs wider weights on the exact float fallback instead.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) whose int8 kernels have no VNNI instruction.
_NO_VNNI_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"})
# dnnl_cpu_isa_t bits: 0x8 = avx2_vnni, 0x40 = avx512_core_vnni (every later ISA includes one)
_ISA_VNNI_BITS = 0x8 | 0x40
_ISA_NAMES = {0x0: "default", 0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0xF: "avx2_vnni", 0x1F: "avx2_vnni_2",
              0x27: "avx512_core", 0x67: "avx512_core_vnni", 0xE7: "avx512_core_bf16",
              0x1EF: "avx10_1_512", 0xFEF: "avx512_core_amx", 0x1FEF: "avx512_core_amx_fp16",
              0x201FF: "avx10_2", 0x22FFF: "avx10_2_amx_2"}
NARROW_LIMIT = 64  # largest |w| whose u8 x s8 pair sums fit int16 (AVX2 / AVX-512 without VNNI)
FULL_LIMIT = 128   # any int8 weight


class WeightRangeError(RuntimeError):
    """Weights wider than this CPU's int8 kernels sum exactly reached a kernel."""


def is_x86() -> bool:
    """True on x86-64 / x86 hosts."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def model_name() -> str:
    """The CPU's marketing name (/proc/cpuinfo "model name"), for benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onednn_isa_cap() -> str | None:
    """The ISA cap set through ONEDNN_MAX_CPU_ISA (or legacy DNNL_MAX_CPU_ISA), upper-cased."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


@functools.lru_cache(maxsize=1)
def effective_isa() -> int | None:
    """oneDNN's effective ISA here (``dnnl_get_effective_cpu_isa``: the hardware, capped by
    ONEDNN_MAX_CPU_ISA as oneDNN read it at start-up), or None without quanta's native library."""
    from quanta.kernels import native

    lib = native.load()
    return None if lib is None else int(lib.qk_effective_isa())


def cpu_has_vnni() -> bool:
    """Whether the hardware has an int8 dot-product instruction (VNNI or AMX) per cpuid,
    ignoring caps. /proc/cpuinfo is read only where torch has no cpuid check."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    return any(flag in _cpuinfo_flags() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni() -> bool:
    """Whether the int8 kernels here add u8 x s8 products without int16 saturation: x86 with
    VNNI/AMX in use (oneDNN's effective ISA, or cpuid under the ONEDNN_MAX_CPU_ISA cap)."""
    isa = effective_isa()
    if isa is not None and isa != 0:
        return bool(isa & _ISA_VNNI_BITS)
    cap = onednn_isa_cap()
    if cap is not None and cap in _NO_VNNI_ISAS:
        return False
    return cpu_has_vnni()


def exact_weight_limit() -> int:
    """Largest |w| the int8 kernels here sum exactly: 64 on x86 without VNNI, else 128."""
    return NARROW_LIMIT if is_x86() and not has_vnni() else FULL_LIMIT


def weight_bits_for_cpu() -> int:
    """Default weight bit width: 7 where the kernels are exact only for |w| <= 64, else 8."""
    return 7 if exact_weight_limit() == NARROW_LIMIT else 8


def weight_magnitude(w_q: torch.Tensor) -> int:
    """max |w| of an integer weight tensor (0 if empty)."""
    return int(w_q.to(torch.int16).abs().max()) if w_q.numel() else 0


def weights_fit(w_q: torch.Tensor) -> bool:
    """Whether this CPU's int8 kernels compute on ``w_q`` exactly."""
    return weight_magnitude(w_q) <= exact_weight_limit()


def require_exact_weights(w_q: torch.Tensor, what: str = "int8 kernel") -> torch.Tensor:
    """The gate in front of every oneDNN weight: ``w_q`` if the kernels here sum it exactly,
    else :class:`WeightRangeError` (callers choose the exact fallback before this)."""
    peak, limit = weight_magnitude(w_q), exact_weight_limit()
    if peak > limit:
        raise WeightRangeError(
            f"{what}: weights reach |w| = {peak}, but this CPU's int8 kernels ({isa_summary()}) "
            f"add u8 x s8 products exactly only for |w| <= {limit}; use the float or reference backend"
        )
    return w_q


def wide_weights_reason(w_q: torch.Tensor) -> str:
    """Why a layer whose weights are wider than this CPU tolerates runs the exact float fallback."""
    return (f"weights reach |w| = {weight_magnitude(w_q)}; this CPU's int8 kernels add u8 x s8 "
            f"exactly only for |w| <= {exact_weight_limit()} (no VNNI): exact float fallback "
            "(float32 op on the dequantized int8 values)")


def isa_summary() -> str:
    """One line for reports: the ISA the int8 kernels use and what it sums exactly."""
    isa = effective_isa()
    if isa is not None:
        name = _ISA_NAMES.get(isa, hex(isa))
        source = "oneDNN effective ISA"
    elif not is_x86():
        return f"{platform.machine()}: int8 dot products exact for any weight"
    else:
        cap = onednn_isa_cap()
        name = ("vnni" if cpu_has_vnni() else "no vnni") + (f", capped at {cap}" if cap else "")
        source = "cpuid"
    exact = "any int8 weight" if exact_weight_limit() == FULL_LIMIT else f"|w| <= {NARROW_LIMIT} (7-bit)"
    return f"{name} ({source}): int8 kernels exact for {exact}"


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether torch.ops.onednn.qlinear_pointwise exists and gives the right answer on a tiny call."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        ops = torch.ops.onednn
        w = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        ws = torch.ones(2)
        wz = torch.zeros(2, dtype=torch.int64)
        x = torch.tensor([[3, 5]], dtype=torch.uint8)
        packed = ops.qlinear_prepack(w, None)
        y = ops.qlinear_pointwise(x, 1.0, 1, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [], "")
        return bool(torch.equal(y, torch.tensor([[-6.0, 22.0]])))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
