"""Shared helpers for the io tests: rewrite a quanta file's manifest or metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch

from quanta.io import format as fmt


def read_parts(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + size])["__metadata__"]
    return meta, safetensors.torch.load(data)


def rewrite(src: Path, dst: Path, edit_manifest: Callable[[dict], Any] | None = None,
            edit_meta: Callable[[dict], Any] | None = None) -> Path:
    """Copy a quanta file with its manifest and/or raw metadata edited (a crafted file)."""
    meta, blobs = read_parts(src)
    if edit_manifest is not None:
        manifest = fmt.decode_manifest(meta["manifest"])
        edit_manifest(manifest)
        meta["manifest"] = fmt.encode_manifest(manifest)
    if edit_meta is not None:
        edit_meta(meta)
    dst.write_bytes(safetensors.torch.save(blobs, metadata=meta))
    return dst
