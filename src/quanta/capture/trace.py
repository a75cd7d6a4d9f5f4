"""The forward of a quantized model as an FX graph, its functional calls keyed by call site.

The graph runtime (:mod:`quanta.modules.graph`) replays a model's forward as straight-line
code. This module only traces: ``torch.fx`` symbolic tracing with quanta's leaf rule, and the
call-site key (``"layer1.0:add#0"``, see :mod:`quanta.capture.callsites`) of every graph node
that the call-site mode would key in eager mode. Tracing fails loudly on data-dependent
control flow; the caller then keeps the eager runtime.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from quanta.capture.callsites import LeafMarker, canonical_op_name, is_leaf


class TraceFailed(Exception):
    """The forward cannot be captured as one graph (the reason is the message)."""


_TRACE_LOCK = threading.Lock()  # one trace at a time: FX patches torch.nn.Module process-wide


class _LeafTracer(fx.Tracer):
    """Leaves are quanta's leaves (its own modules, childless modules), plus torch.nn modules
    with children that hold no int8 call site (``nn.MultiheadAttention``: its Python forward
    branches on flags FX cannot trace).

    Thread-aware: while FX traces, it patches ``nn.Module.__call__`` and ``__getattr__`` for the
    whole process; module calls and attribute reads from other threads (any model running
    meanwhile, this one included) pass straight through instead of being recorded."""

    def __init__(self, site_prefixes: Iterable[str]) -> None:
        super().__init__()
        self.site_prefixes = tuple(site_prefixes)
        self.thread = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.site_prefixes and not isinstance(m, LeafMarker):
            return False  # a childless module whose weight op call is a site: traced through
        if is_leaf(m):
            return True
        if not super().is_leaf_module(m, module_qualified_name):
            return False
        inside = module_qualified_name + "."
        return not any(p == module_qualified_name or p.startswith(inside) for p in self.site_prefixes)


def bind_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's parameters bound to this call's values, defaults filled in."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def trace(model: nn.Module, inputs: dict[str, Any], site_keys: Iterable[str]) -> fx.Graph:
    """Symbolically trace ``model.forward``. Tensor inputs become graph inputs; every other
    input (None, flags, sizes) is fixed at the value it has in ``inputs``."""
    site_keys = list(site_keys)
    params = inspect.signature(model.forward).parameters
    for name in inputs:
        kind = params[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TraceFailed(f"forward takes *{name}; the graph runtime needs named inputs")
    concrete = {n: v for n, v in inputs.items() if not isinstance(v, torch.Tensor)}
    tracer = _LeafTracer(k.split(":")[0] for k in site_keys)
    try:
        with _TRACE_LOCK, _dtype_info_traced():
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any trace failure means: stay eager
        raise TraceFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for node in list(graph.nodes):  # FX asserts each fixed input's value; the runtime's guard does
        if node.op == "call_function" and node.target is torch._assert:
            condition = node.args[0]
            graph.erase_node(node)
            if isinstance(condition, fx.Node) and not condition.users:
                graph.erase_node(condition)
    return graph


@contextlib.contextmanager
def _dtype_info_traced() -> Iterator[None]:
    """``torch.finfo(x.dtype)`` / ``torch.iinfo`` of a traced value become graph nodes (FX
    cannot pass a Proxy to them; attention masks use ``torch.finfo(dtype).min`` everywhere)."""
    originals = {"finfo": torch.finfo, "iinfo": torch.iinfo}

    def traced(name: str) -> Callable:
        original = originals[name]

        def info(*args: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in args):
                proxy = next(a for a in args if isinstance(a, fx.Proxy))
                return proxy.tracer.create_proxy("call_function", original, args, {})
            return original(*args)
        return info

    torch.finfo, torch.iinfo = traced("finfo"), traced("iinfo")
    try:
        yield
    finally:
        torch.finfo, torch.iinfo = originals["finfo"], originals["iinfo"]


def placeholder_value(node: fx.Node, inputs: dict[str, Any]) -> Any:
    """A graph input's value: the call's, or for a fixed input the value it was fixed at."""
    if node.target in inputs:
        return inputs[node.target]
    return node.args[0] if node.args else None


def enclosing_module(node: fx.Node) -> str:
    """Qualified name of the innermost traced (non-leaf) module around a function node."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def call_frame(node: fx.Node) -> str:
    """The innermost module *call* around a node (a module called twice gives two frames)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else ""


def op_callable(node: fx.Node) -> Callable:
    """What eager mode calls for a function or method node."""
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target, None) or _Named(node.target)
    return node.target


class _Named:
    """Stands for a method torch.Tensor does not have (only its name is read)."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, self.__name__)(*args, **kwargs)


class SiteKeys:
    """Keys function/method nodes whose op is in ``ops`` exactly as the call-site mode does:
    counted per op inside each module call, only calls that reach torch with a tensor (decided
    on a concrete run, since ``size + 1`` is traced like ``x + 1``)."""

    def __init__(self, ops: Iterable[str]) -> None:
        self.ops = set(ops)
        self.counters: dict[tuple[str, str], int] = {}

    def key(self, node: fx.Node, has_tensor: bool) -> str | None:
        op = canonical_op_name(op_callable(node))
        if op not in self.ops or not has_tensor:
            return None
        frame = (call_frame(node), op)
        n = self.counters.get(frame, 0)
        self.counters[frame] = n + 1
        return f"{enclosing_module(node) or 'model'}:{op}#{n}"
