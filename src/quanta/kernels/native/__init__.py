"""Build and load quanta's native int8 kernels: oneDNN primitives kept per shape
(``primitives.c``), elementwise loops (``elementwise.c``), uint8 pooling (``pooling.c``),
dynamic quantization passes (``dynamic.c``), weight-only GEMVs (``weight_only.c``,
``weight_only_q8.c``) and the executor that runs a whole converted forward in one call
(``program.c``), one shared library; ``onednn.c`` binds the oneDNN inside torch for them.

Why: ``torch.ops.onednn`` rebuilds the oneDNN primitive descriptor on every call, a fixed
~30-60 us per op that dominates batch-1 latency. ``primitives.c`` builds each primitive once.

How it finds oneDNN: torch's ``libtorch_cpu.so`` contains oneDNN's full C API but does not
export it. Its symbol table (``.symtab``) still names every function; :func:`_elf_symbols`
reads their offsets, and the C side adds the library's load address. The result is torch's
own oneDNN: same version, same OpenMP thread pool, same kernels as ``torch.ops.onednn``.

The C files are compiled once per torch build with the system C compiler into a cache
directory (``$QUANTA_CACHE_DIR``, else ``~/.cache/quanta``), atomically. Anything that fails
(no compiler, a stripped torch, a oneDNN major version other than the headers') leaves
:func:`load` returning None with the reason in :func:`unavailable_reason`; callers then use
``torch.ops.onednn``. ``QUANTA_NATIVE=0`` disables the native path.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

_SOURCES = [Path(__file__).with_name(name)
            for name in ("onednn.c", "primitives.c", "elementwise.c", "pooling.c", "dynamic.c",
                         "weight_only.c", "weight_only_q8.c", "program.c")]
# in the build key, not on the command line
_HEADERS = [Path(__file__).with_name(name) for name in ("common.h", "onednn.h", "weight_only.h")]
_LIBRARY = "libtorch_cpu.so"
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False
_load_lock = threading.Lock()


class Epilogue(ctypes.Structure):
    """Mirror of ``qk_epilogue`` in primitives.c."""

    _fields_ = [("dst_f32", ctypes.c_int), ("activation", ctypes.c_int), ("alpha", ctypes.c_float),
                ("beta", ctypes.c_float), ("src_scale", ctypes.c_int), ("dst_scale", ctypes.c_int),
                ("src_zp", ctypes.c_int), ("dst_zp", ctypes.c_int)]


def _elf_symbols(path: Path, names: list[str]) -> list[int]:
    """st_value of each of ``names`` in the ELF64 ``.symtab`` of ``path`` (0 where missing)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    header = data[:64].tobytes()
    if header[:4] != b"\x7fELF" or header[4] != 2:
        raise OSError(f"{path} is not a 64-bit ELF file")
    shoff = int.from_bytes(header[40:48], "little")
    shentsize, shnum = (int.from_bytes(header[i:i + 2], "little") for i in (58, 60))
    sections = np.frombuffer(data[shoff:shoff + shentsize * shnum].tobytes(), dtype=np.dtype([
        ("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
        ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("align", "<u8"), ("entsize", "<u8")]))
    symtab = sections[sections["type"] == 2]  # SHT_SYMTAB
    if len(symtab) == 0:
        raise OSError(f"{path} has no symbol table (stripped)")
    strtab = sections[int(symtab["link"][0])]
    s_off, s_size = int(symtab["offset"][0]), int(symtab["size"][0])
    symbols = np.frombuffer(data[s_off:s_off + s_size], dtype=np.dtype([
        ("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
        ("size", "<u8")]))
    strings = data[int(strtab["offset"]):int(strtab["offset"]) + int(strtab["size"])].tobytes()
    is_function = (symbols["info"] & 0xF) == 2  # STT_FUNC
    offsets = []
    defined = is_function & (symbols["shndx"] != 0) & (symbols["value"] != 0)
    for name in names:  # a name may also be the tail of a longer string (suffix sharing)
        key = name.encode() + b"\0"
        starts, at = [], strings.find(key)
        while at >= 0:
            starts.append(at)
            at = strings.find(key, at + 1)
        hits = symbols[defined & np.isin(symbols["name"], starts)]
        offsets.append(int(hits["value"][0]) if len(hits) else 0)
    return offsets


def _cache_dir() -> Path:
    root = os.environ.get("QUANTA_CACHE_DIR") or Path.home() / ".cache" / "quanta"
    return Path(root)


def _compile(include: Path) -> Path:
    source = b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    key = hashlib.sha256(source + torch.__version__.encode() + str(include).encode()).hexdigest()[:16]
    target = _cache_dir() / f"qkernels-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # -fopenmp: libgomp.so.1 resolves to the one torch already loaded (one thread pool)
        cmd = [compiler, "-O2", "-fopenmp", "-shared", "-fPIC", f"-I{include}", *map(str, _SOURCES),
               "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"compiling the native kernels failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cached_offsets(torch_lib: Path, names: list[str]) -> list[int]:
    """:func:`_elf_symbols`, remembered per torch library file (reading .symtab takes ~2 s)."""
    st = torch_lib.stat()
    key = hashlib.sha256(f"{torch_lib}:{st.st_size}:{st.st_mtime_ns}:{names}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"symbols-{key}.json"
    try:
        return [int(v) for v in json.loads(path.read_text())]
    except (OSError, ValueError):
        pass
    offsets = _elf_symbols(torch_lib, names)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(offsets, f)
    os.replace(tmp, path)
    return offsets


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
    lib.qk_symbol_names.restype = ctypes.c_char_p
    lib.qk_last_error.restype = ctypes.c_char_p
    lib.qk_init.argtypes = [ctypes.c_char_p, p, ctypes.c_int]
    lib.qk_conv_create.restype = p
    lib.qk_conv_create.argtypes = [p, i64, i64, i64, i64, p, p, p, p, ctypes.POINTER(Epilogue), i32]
    lib.qk_linear_create.restype = p
    lib.qk_linear_create.argtypes = [i64, i64, i64, p, p, p, ctypes.POINTER(Epilogue), i32]
    lib.qk_run.argtypes = [p, p, p, f32, i32, f32, i32]
    lib.qk_destroy.argtypes = [p]
    lib.qk_impl_name.argtypes = [p]
    lib.qk_impl_name.restype = ctypes.c_char_p
    lib.qk_add_u8.argtypes = [p, p, p, i64, f32, f32, f32, f32, f32]
    lib.qk_add_fixed_u8.argtypes = [p, p, p, i64, *[i32] * 7]
    lib.qk_quantize_u8.argtypes = [p, p, i64, i64, i64, f32, i32, ctypes.c_int, f32]
    lib.qk_quantize_u8.restype = ctypes.c_int
    lib.qk_max_pool_u8.argtypes = [p, p, *[i64] * 12]
    lib.qk_adaptive_avg_pool_u8.argtypes = [p, p, *[i64] * 6, i32]
    lib.qk_min_max_f32.argtypes = [p, i64, p]
    lib.qk_mul_channel_u8.argtypes = [p, p, p, i64, i64, i64, i64, f32, i32, f32, i32, f32, f32]
    lib.qk_mul_channel_gate_u8.argtypes = [p, p, p, i64, i64, i64, i64, f32, i32, f32, i32, f32, i32, f32,
                                           f32]
    lib.qk_mul_channel_gate_u8.restype = ctypes.c_int
    lib.qk_effective_isa.restype = ctypes.c_int
    lib.qk_quantize_dynamic_u8.argtypes = [p, p, i64, f32, f32]
    lib.qk_quantize_rows_u8.argtypes = [p, p, p, p, i64, i64, ctypes.c_double]
    lib.qk_quantize_rows_u8.restype = ctypes.c_int
    lib.qk_rows_epilogue.argtypes = [p, i64, i64, p, p, p, p]
    lib.qk_wo_linear_s8.argtypes = [p, i64, i64, p, p, i64, p, p, ctypes.c_int]
    lib.qk_wo_linear_u4.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p, ctypes.c_int]
    lib.qk_wo_linear_u4_q8.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p, ctypes.c_int]
    lib.qk_wo_quantize_blocks.argtypes = [p, i64, i64, p, p, ctypes.c_int]
    lib.qk_wo_quantize_blocks.restype = ctypes.c_int
    lib.qk_wo_dequant_s8.argtypes = [p, p, i64, i64, p, ctypes.c_int]
    lib.qk_wo_dequant_u4.argtypes = [p, p, p, i64, i64, i64, p, ctypes.c_int]
    lib.qk_program_run.argtypes = [p, i64, p, p]


def _load() -> ctypes.CDLL:
    torch_lib = Path(torch.__file__).parent / "lib" / _LIBRARY
    include = Path(torch.__file__).parent / "include"
    if not torch_lib.exists() or not (include / "oneapi" / "dnnl" / "dnnl.h").exists():
        raise OSError("this torch build has no oneDNN headers or libtorch_cpu.so")
    lib = ctypes.CDLL(str(_compile(include)))
    _bind(lib)
    names = lib.qk_symbol_names().decode().split()
    offsets = np.array(_cached_offsets(torch_lib, names), dtype=np.uint64)
    missing = [n for n, o in zip(names, offsets, strict=True) if o == 0]
    if missing:
        raise OSError(f"oneDNN functions not found in {_LIBRARY}: {', '.join(missing)}")
    if lib.qk_init(_LIBRARY.encode(), offsets.ctypes.data, len(names)) == 0:
        raise OSError(lib.qk_last_error().decode())
    return lib


def load() -> ctypes.CDLL | None:
    """The native kernel library, built on first use; None if unavailable (see unavailable_reason)."""
    global _lib, _reason, _loaded
    if _loaded:
        return _lib
    with _load_lock:  # a second thread waits for the first load instead of seeing None
        if not _loaded:
            if os.environ.get("QUANTA_NATIVE", "1") == "0":
                _reason = "disabled by QUANTA_NATIVE=0"
            else:
                try:
                    _lib = _load()
                except Exception as e:  # noqa: BLE001 - optional fast path: any failure means torch.ops
                    _reason = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e)
            _loaded = True
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None, or None if the native kernels are available."""
    load()
    return _reason


def last_error() -> str:
    lib = load()
    return lib.qk_last_error().decode() if lib is not None else (_reason or "")
