"""The quanta file format (version 1): one safetensors file, no pickle.

Layout:
- safetensors metadata: ``format = "quanta"``, ``format_version``, and ``manifest``: the JSON
  manifest, zlib-compressed and base64-encoded (zlib's checksum doubles as a corruption check;
  compression keeps small models within the size budget). ``read_manifest`` decodes it.
- tensors: one flat 1-d tensor per dtype, ``"quanta.int8"``, ``"quanta.float32"``, ...: the
  state_dict tensors of that dtype concatenated in state_dict order. Packing keeps the
  safetensors header small (a named entry costs ~80 bytes; MNIST-sized models have 70+ tiny
  qparam tensors). Integer tensors that are all zero (symmetric weight zero points) are not
  stored. The manifest's ``tensors`` table maps each state_dict name to
  ``[dtype, shape, offset]`` (offset ``None``: all zeros), and ``data_sha256`` covers the blobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import zlib
from typing import Any

import torch

from quanta.errors import FormatError

FORMAT_NAME = "quanta"
FORMAT_VERSION = 1
BLOB_PREFIX = "quanta."
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_NUMEL = 2**40

DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"cannot save tensors of dtype {dtype}") from None


def pack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[Any]]]:
    """state_dict -> (one flat blob per dtype, table name -> [dtype, shape, offset | None])."""
    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    table: dict[str, list[Any]] = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        dt = dtype_name(t.dtype)
        offset: int | None = None
        if t.is_floating_point() or t.numel() == 0 or bool(t.any()):
            offset = sizes.get(dt, 0)
            parts.setdefault(dt, []).append(t.reshape(-1))
            sizes[dt] = offset + t.numel()
        table[name] = [dt, list(t.shape), offset]
    blobs = {BLOB_PREFIX + dt: torch.cat(ts) for dt, ts in parts.items()}
    return blobs, table


def data_digest(blobs: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(blobs):
        t = blobs[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_manifest(manifest: dict[str, Any]) -> str:
    raw = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_manifest(text: str) -> dict[str, Any]:
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_MANIFEST_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise FormatError("the manifest is truncated or larger than 64 MiB")
        manifest = json.loads(raw.decode("utf-8"))
    except FormatError:
        raise
    except (UnicodeError, binascii.Error, zlib.error, ValueError, RecursionError) as e:
        raise FormatError(f"the manifest is corrupted ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise FormatError("the manifest is corrupted: it is not a JSON object")
    return manifest


def check_table(table: Any) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    """Validate the manifest's tensor table; return name -> (dtype, shape, offset)."""
    if not isinstance(table, dict):
        raise FormatError("manifest field 'tensors' must be an object")
    out = {}
    for name, entry in table.items():
        if not (isinstance(entry, list) and len(entry) == 3):
            raise FormatError(f"manifest entry for tensor {name!r} must be [dtype, shape, offset]")
        dt, shape, offset = entry
        if not isinstance(dt, str) or dt not in DTYPES:
            raise FormatError(f"tensor {name!r}: unknown dtype {dt!r} in the manifest")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < MAX_NUMEL for d in shape):
            raise FormatError(f"tensor {name!r}: invalid shape {shape!r} in the manifest")
        if math.prod(shape) > MAX_NUMEL:
            raise FormatError(f"tensor {name!r}: shape {shape} is implausibly large")
        if offset is not None and not (_is_int(offset) and offset >= 0):
            raise FormatError(f"tensor {name!r}: invalid offset {offset!r} in the manifest")
        out[name] = (dt, tuple(shape), offset)
    return out


def check_blobs(table: dict[str, tuple[str, tuple[int, ...], int | None]],
                blobs: dict[str, torch.Tensor], digest: Any) -> None:
    """The blobs hold exactly the table's stored tensors, back to back, and match the digest."""
    expected: dict[str, int] = {}
    for name, (dt, shape, offset) in table.items():
        if offset is None:
            continue
        if offset != expected.get(dt, 0):
            raise FormatError(f"tensor {name!r}: offset {offset} does not follow the previous tensor")
        expected[dt] = offset + math.prod(shape)
    wanted = {BLOB_PREFIX + dt for dt in expected}
    if set(blobs) != wanted:
        extra, missing = sorted(set(blobs) - wanted), sorted(wanted - set(blobs))
        raise FormatError(
            f"the file's tensor blobs do not match the manifest (extra: {extra}, missing: {missing})"
        )
    for dt, size in expected.items():
        blob = blobs[BLOB_PREFIX + dt]
        if blob.dtype != DTYPES[dt] or blob.dim() != 1 or blob.numel() != size:
            raise FormatError(
                f"blob {BLOB_PREFIX + dt}: expected {dt} [{size}], found {dtype_name(blob.dtype)} "
                f"{list(blob.shape)}: the file is corrupted"
            )
    if digest != data_digest(blobs):
        raise FormatError("tensor data checksum mismatch: the file is corrupted")


def unpack(table: dict[str, tuple[str, tuple[int, ...], int | None]],
           blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack`` (call ``check_blobs`` first)."""
    out = {}
    for name, (dt, shape, offset) in table.items():
        if offset is None:
            out[name] = torch.zeros(shape, dtype=DTYPES[dt])
        else:
            out[name] = blobs[BLOB_PREFIX + dt][offset:offset + math.prod(shape)].reshape(shape)
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
