"""Taps: the inputs and outputs of named sites in a float model and in its quantized model.

A site is a leaf module (``"layer1.0.conv1"``) or a functional call site
(``"layer1.0:add#0"``, ``"block.conv:conv2d#0"``), keyed exactly as quanta keys them when it
prepares a model (``capture.callsites``). The float model is tapped with the same site tracker
and a ``TorchFunctionMode``; the quantized model with forward hooks on its int8 modules and a
wrapper around each call site's ``run``, in eager mode (the graph runtime skips both).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from quanta.capture.callsites import SiteTracker, canonical_op_name, is_metadata
from quanta.capture.plan import Plan
from quanta.capture.record import call_with
from quanta.modules import graph
from quanta.qtensor import QTensor, dequantize_any


@dataclass
class Call:
    """One call of a site: its arguments and output (float copies), the torch function for a call
    site, and for the quantized model the (scale, zero point) of each QTensor argument."""

    args: tuple
    kwargs: dict
    out: Any
    func: Callable | None = None
    arg_qparams: list[tuple[float, int] | None] = dataclasses.field(default_factory=list)


def _copy(x: Any) -> Any:
    """Float copies of every tensor in ``x`` (QTensors dequantized; in-place ops later in the
    forward must not change what was recorded)."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, dequantize_any(x))


def _qparams_of(args: Any) -> list[tuple[float, int] | None]:
    leaves, _ = tree_flatten(args)
    return [(t.scale, t.zero_point) if isinstance(t, QTensor) else None
            for t in leaves if isinstance(t, torch.Tensor)]


def tensors(x: Any) -> list[torch.Tensor]:
    """The float tensors in a (nested) output, flattened."""
    leaves, _ = tree_flatten(dequantize_any(x))
    return [t.detach().float().reshape(-1) for t in leaves if isinstance(t, torch.Tensor)]


class _FloatTap(TorchFunctionMode):
    def __init__(self, tracker: SiteTracker, names: set[str], calls: dict[str, list[Call]],
                 on_call: Callable[[str, Any], None] | None = None) -> None:
        super().__init__()
        self.tracker, self.names, self.calls, self.on_call = tracker, names, calls, on_call

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if not self.tracker.active or is_metadata(func):
            return func(*args, **kwargs)
        key = self.tracker.next_key(canonical_op_name(func))
        if self.on_call is not None:
            out = func(*args, **kwargs)
            if key in self.names:
                self.on_call(key, out)
            return out
        recorded = (_copy(args), _copy(kwargs)) if key in self.names else None
        out = func(*args, **kwargs)
        if recorded is not None:
            self.calls[key].append(Call(recorded[0], recorded[1], _copy(out), func))
        return out


def tap_float(model: nn.Module, plan: Plan, names: set[str], batch: Any,
              on_call: Callable[[str, Any], None] | None = None) -> tuple[dict[str, list[Call]], Any]:
    """Every call of the named sites of float ``model`` on ``batch``, and the model's output.
    With ``on_call``, each call's output is passed to ``on_call(name, out)`` instead of recorded
    (no copies: for statistics over many batches)."""
    calls: dict[str, list[Call]] = defaultdict(list)
    tracker = SiteTracker(plan.opened)

    def on_leaf(phase: str, name: str, module: nn.Module, args: Any, out: Any) -> None:
        if phase == "post" and name in names:
            if on_call is not None:
                on_call(name, out)
            else:
                calls[name].append(Call(_copy(args), {}, _copy(out)))

    tracker.install(model, on_leaf=on_leaf)
    try:
        with torch.no_grad(), _FloatTap(tracker, names, calls, on_call):
            out = call_with(model, batch)
    finally:
        tracker.remove()
    return calls, _copy(out)


class _RunTap:
    """Wraps a call site's ``run`` to record its arguments and output."""

    def __init__(self, site: nn.Module, calls: list[Call]) -> None:
        self.run, self.calls = site.run, calls

    def __call__(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        out = self.run(func, args, kwargs)
        self.calls.append(Call((), {}, _copy(out), func, _qparams_of(args)))
        return out


def tap_quantized(qmodel: nn.Module, names: set[str], batch: Any) -> tuple[dict[str, list[Call]], Any]:
    """Every call of the named int8 sites of a quanta model on ``batch`` (outputs dequantized,
    arguments as their qparams only), run eagerly, and the model's output."""
    state = qmodel._quanta
    calls: dict[str, list[Call]] = defaultdict(list)
    modules = dict(qmodel.named_modules())
    handles, wrapped = [], []
    for name in names:
        site = state.sites_by_key.get(name)
        if site is not None:
            site.__dict__["run"] = _RunTap(site, calls[name])
            wrapped.append(site)
        elif name in modules:
            def hook(module: nn.Module, args: Any, out: Any, name: str = name) -> None:
                calls[name].append(Call((), {}, _copy(out), None, _qparams_of(args)))
            handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad(), graph.eager_runtime(qmodel):
            out = call_with(qmodel, batch)
    finally:
        for h in handles:
            h.remove()
        for site in wrapped:
            site.__dict__.pop("run", None)
    return calls, _copy(out)
