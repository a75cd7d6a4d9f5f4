"""Turning command-line strings into models and data: ``MODEL`` factories and ``--calib`` sources.

A MODEL spec is ``path/to/file.py:factory`` or ``package.module:factory``. The factory is
called with no arguments and returns the float model, a ``(model, calibration_data)`` tuple,
or a dict ``{"model": ..., "calib": ..., "example_inputs": ..., "train": ..., "eval": ...}``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quanta.config import QuantConfig

SPEC_HELP = "'path/to/file.py:factory' or 'package.module:factory'"


class UsageError(Exception):
    """The command line itself is wrong (exit code 2)."""


class CommandError(Exception):
    """The command could not be carried out (exit code 1)."""


@dataclass(frozen=True)
class Factory:
    """What a MODEL factory provided."""

    model: nn.Module
    calib: Iterable[Any] | None = None
    example_inputs: Any = None
    train: Callable[[nn.Module], Any] | None = None
    eval: Callable[[nn.Module], float] | None = None  # the accuracy target's metric (--max-drop)


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr.isidentifier():
        raise UsageError(f"{what} must be {SPEC_HELP}, got {spec!r}")
    return source, attr


def _import_source(source: str) -> Any:
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise CommandError(f"file not found: {source}")
        name = "quanta_user_" + path.stem.replace("-", "_")
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise CommandError(f"cannot import {source}: not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise CommandError(f"importing {source} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        raise CommandError(f"cannot import module {source!r}: {e}") from e
    except Exception as e:
        raise CommandError(f"importing {source} failed: {type(e).__name__}: {e}") from e


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function named by ``spec`` (``file.py:name`` or ``module:name``)."""
    source, attr = _split_spec(spec, what)
    module = _import_source(source)
    fn = getattr(module, attr, None)
    if fn is None:
        raise CommandError(f"{source} has no attribute {attr!r}")
    if not callable(fn):
        raise CommandError(f"{source}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def _call_user(fn: Callable[..., Any], spec: str, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        raise CommandError(f"{spec} raised {type(e).__name__}: {e}") from e


def load_factory(spec: str) -> Factory:
    """Call the MODEL factory and normalize what it returns."""
    out = _call_user(load_callable(spec, "MODEL"), spec)
    if isinstance(out, nn.Module):
        return Factory(out)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        return Factory(out[0], calib=out[1])
    if isinstance(out, dict) and isinstance(out.get("model"), nn.Module):
        unknown = sorted(set(out) - {"model", "calib", "example_inputs", "train", "eval"})
        if unknown:
            raise CommandError(f"{spec} returned unknown keys {unknown}: "
                               "expected 'model', 'calib', 'example_inputs', 'train', 'eval'")
        for key in ("train", "eval"):
            if out.get(key) is not None and not callable(out[key]):
                raise CommandError(f"{spec} returned a {key!r} entry that is not a function")
        return Factory(out["model"], out.get("calib"), out.get("example_inputs"), out.get("train"),
                       out.get("eval"))
    raise CommandError(
        f"{spec} returned {type(out).__name__}: expected an nn.Module, a (model, calibration_data) "
        "tuple or a dict with a 'model' key"
    )


def split_batches(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if data.dim() == 0 or data.shape[0] == 0:
        raise CommandError(f"calibration tensor of shape {list(data.shape)} has no samples")
    return list(torch.split(data, batch_size))


def load_calib(spec: str, batch_size: int) -> list[Any] | Iterable[Any]:
    """Calibration batches from a .pt/.npy file of a tensor (split into batches) or ``MODULE:fn``."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    suffix = Path(spec).suffix.lower()
    if suffix in (".pt", ".pth", ".npy"):
        path = Path(spec)
        if not path.is_file():
            raise CommandError(f"calibration file not found: {spec}")
        data = _read_tensor_file(path)
    else:
        data = _call_user(load_callable(spec, "--calib"), spec)
    if isinstance(data, torch.Tensor):
        return split_batches(data, batch_size)
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return list(data)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        return data
    raise CommandError(f"--calib {spec} gave {type(data).__name__}: expected a tensor or batches")


def _read_tensor_file(path: Path) -> Any:
    try:
        if path.suffix.lower() == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise CommandError(f"cannot read calibration data {path}: {type(e).__name__}: {e}") from e


def load_config(text: str | None, mode: str) -> QuantConfig:
    """``--config``: a JSON file or inline JSON object (QuantConfig.to_dict() form); mode wins."""
    if text is None:
        return QuantConfig(mode=mode)
    path = Path(text)
    if not text.lstrip().startswith("{"):
        if not path.is_file():
            raise CommandError(f"config file not found: {text}")
        text = path.read_text()
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("the config must be a JSON object")
        return QuantConfig.from_dict({**d, "mode": mode})
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"invalid --config: {type(e).__name__}: {e}") from e


def parse_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 1,1,28,28`` -> (1, 1, 28, 28)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be integers like 1,3,224,224, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def example_from(factory: Factory, calib: Iterable[Any] | None, shape: tuple[int, ...] | None) -> Any:
    """Example inputs: ``--input-shape`` (random), the factory's, or the first calibration batch."""
    if shape is not None:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if factory.example_inputs is not None:
        return factory.example_inputs
    for source in (calib, factory.calib):
        if source is not None and not isinstance(source, torch.Tensor):
            for batch in source:
                return batch
    return None
