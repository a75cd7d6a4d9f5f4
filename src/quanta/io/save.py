"""``quanta.save``: a quantized model to one safetensors file with a JSON manifest.

What is stored: every tensor of the model's ``state_dict`` (int8 weights, float scales,
integer zero points, int32 biases, call-site qparams under ``_quanta.sites``, and the weights
of layers that stay float), plus the manifest: format and library versions, mode, the
``QuantConfig``, the ``Plan`` (per-layer precision, fusion, qparams, replaced modules,
backends), the quantized module classes and the tensor table. See ``quanta.io.format``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from quanta.errors import UnsupportedModelError
from quanta.io import format as fmt
from quanta.io.atomic import atomic_write_bytes
from quanta.modules.mapping import MAPPING
from quanta.modules.observed import ObservedModule
from quanta.modules.state import QuantaState


def quantized_classes() -> dict[str, type[nn.Module]]:
    """Every quantized module class the mapping table can produce, by class name."""
    return {cls.__name__: cls for modes in MAPPING.values() for cls in modes.values()}


def converted_state(model: nn.Module) -> QuantaState:
    """The model's QuantaState, checking the model is converted (not merely prepared)."""
    state = getattr(model, "_quanta", None)
    if not isinstance(model, nn.Module) or not isinstance(state, QuantaState):
        raise UnsupportedModelError(
            f"quanta.save() needs a model quantized by quanta, got {type(model).__name__}"
        )
    observing = [n for n, m in model.named_modules() if isinstance(m, ObservedModule)]
    observing += [s.key for s in state.sites.values() if not getattr(s, "converted", True)]
    if observing:
        raise UnsupportedModelError(
            f"quanta.save() needs a converted model, but {observing[0]} is still observing: "
            "call quanta.convert(prepared) first"
        )
    return state


def build_manifest(model: nn.Module, table: dict[str, list[Any]], digest: str) -> dict[str, Any]:
    import quanta

    state = converted_state(model)
    classes = quantized_classes()
    modules = {n: type(m).__name__ for n, m in model.named_modules()
               if classes.get(type(m).__name__) is type(m)}
    return {
        "format_version": fmt.FORMAT_VERSION,
        "quanta_version": quanta.__version__,
        "torch_version": torch.__version__,
        "mode": state.plan.mode,
        "config": state.config.to_dict(),
        "plan": state.plan.to_dict(),
        "modules": modules,
        # Linears SmoothQuant wrapped (quanta.ptq.smoothquant): load wraps them again
        "smoothed": [n for n, m in model.named_modules() if type(m).__name__ == "SmoothedLinear"],
        # Linears whose input the residual-stream rotation turns at run time (quanta.ptq.rotation):
        # name -> the rotation's two factor sizes; load wraps them again
        "rotated": {n: list(m.rotation.factors) for n, m in model.named_modules()
                    if type(m).__name__ == "RotatedLinear"},
        "tensors": table,
        "data_sha256": digest,
    }


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a quantized ``model`` to ``path`` atomically (safetensors, no pickle).

    Load it back with ``quanta.load(path, float_model)``; no calibration is replayed.
    Under an initialized torch.distributed process group only rank 0 writes (every rank gets the
    path back; not a collective, so ``if rank == 0: save(...)`` works too).
    """
    converted_state(model)
    from quanta.distributed.collective import rank

    if rank() != 0:
        return Path(path)
    blobs, table = fmt.pack(model.state_dict())
    manifest = build_manifest(model, table, fmt.data_digest(blobs))
    metadata = {
        "format": fmt.FORMAT_NAME,
        "format_version": str(fmt.FORMAT_VERSION),
        "manifest": fmt.encode_manifest(manifest),
    }
    data = safetensors.torch.save(blobs, metadata=metadata)
    return atomic_write_bytes(path, data)
