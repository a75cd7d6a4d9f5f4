"""CPU capability detection for the fast int8 path.

Why: on x86 without VNNI, oneDNN multiplies u8 x s8 with AVX2 ``vpmaddubsw``, which adds
pairs of products into a saturating int16; full-range 8-bit weights then give wrong
results (measured: up to ~20% output error). Weights restricted to 7 bits ([-64, 63]) keep
every pair sum inside int16 and are exact. With VNNI/AMX (``vpdpbusd`` accumulates into
int32) or on non-x86 CPUs the full 8-bit range is safe.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) whose int8 kernels have no VNNI instruction.
_NO_VNNI_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"})
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def is_x86() -> bool:
    """True on x86-64 / x86 hosts."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


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


def onednn_isa_cap() -> str | None:
    """The ISA cap set through ONEDNN_MAX_CPU_ISA (or legacy DNNL_MAX_CPU_ISA), upper-cased."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


def cpu_has_vnni() -> bool:
    """Whether the hardware has an int8 dot-product instruction (VNNI or AMX), ignoring caps."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    if check is not None:
        try:
            if check():
                return True
        except RuntimeError:
            pass
    return any(flag in _cpuinfo_flags() for flag in _VNNI_FLAGS)


def has_vnni() -> bool:
    """Whether oneDNN's int8 kernels will use VNNI/AMX here.

    False when the hardware lacks it, or when ONEDNN_MAX_CPU_ISA/DNNL_MAX_CPU_ISA caps oneDNN
    to an ISA without it (e.g. ``AVX2``): oneDNN then falls back to saturating vpmaddubsw.
    """
    cap = onednn_isa_cap()
    if cap is not None and cap in _NO_VNNI_ISAS:
        return False
    return cpu_has_vnni()


def weight_bits_for_cpu() -> int:
    """Weight bit width that is exact on the fast int8 path of this CPU: 7 on x86 without
    VNNI (u8 x s8 pair sums must fit int16), else 8."""
    if is_x86() and not has_vnni():
        return 7
    return 8


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
