"""Graph runtime: a quantized model's forward replayed as straight-line Python.

Eager mode pays Python dispatch per op: the call-site mode sees every torch call, every int8
activation is wrapped in a QTensor, every module call runs its hooks. At batch 1 that glue
cost more than the int8 kernels (MNIST CNN: ~0.45 ms per forward, 0.12 ms of it in convs).
So on the first call in eval mode the forward is traced once (torch.fx,
:mod:`quanta.capture.trace`) and run once with QTensors to learn which values are int8 and at
which qparams (fixed after convert). From that a function is generated in which int8 values
are plain uint8 tensors, qparams are constants and each int8 op calls its kernel. Ops it does
not lower run as in eager mode, their int8 inputs wrapped in QTensors.

It must give the eager result bit for bit: that is checked on the call that builds it. A model
that does not trace, gives a different result, or is changed later (hooks added, modules
replaced, qparams or backends reset) runs eagerly; ``runtime_status(model)`` says which and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from quanta.capture import trace as tracing
from quanta.capture.callsites import LeafMarker
from quanta.errors import NonFiniteInputError
from quanta.modules import fused_linears, graph_guards, lowering, native_lowering, native_program
from quanta.modules.mapping import KEYED_OPS
from quanta.modules.quantized import generation
from quanta.qtensor import QTensor

EAGER = object()  # returned by GraphRuntime.__call__ when this call must run eagerly
_RAISED = object()


class GraphRuntime:
    """The generated forward of one model, with the guards that say when it still applies."""

    def __init__(self, model: nn.Module, fn: Callable, tensor_names: list[str], inputs: dict[str, Any],
                 positional: bool, n_args: int, kw_names: tuple[str, ...], lowered: int,
                 generic: int, native: Any = None) -> None:
        self.fn, self.tensor_names, self.lowered, self.generic = fn, tensor_names, lowered, generic
        self.native = native  # native_lowering.Programs: the forward as one C call, per input shape
        self.fixed = {k: v for k, v in inputs.items() if k not in tensor_names}
        # the building call passed only tensors, positionally (model(x)): a call like it takes
        # no binding step, its other inputs are the same defaults
        self.positional, self.n_args, self.kw_names = positional, n_args, kw_names
        self.model = model
        modules = list(model.modules())
        self.generation = generation()
        self._stamped = [m for m in modules if isinstance(m, LeafMarker)]  # quantized modules, sites
        self._stamps = [m.__dict__.get("_generation") for m in self._stamped]
        self._hook_dicts = graph_guards.hook_dicts(modules)
        self._hook_count = sum(map(len, self._hook_dicts))
        edges = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        self._parents = [e[0] for e in edges]
        self._names = [e[1] for e in edges]
        self._children = [e[2] for e in edges]

    def still_valid(self) -> bool:
        """No hook added or removed, no module replaced, no qparams/backend reset since the build."""
        return ((generation() == self.generation or self._same_stamps())
                and sum(map(len, self._hook_dicts)) == self._hook_count
                and list(map(dict.get, self._parents, self._names)) == self._children)

    def _same_stamps(self) -> bool:
        """Some quantized module was reset: this model's, or another model's (then still valid)."""
        if [m.__dict__.get("_generation") for m in self._stamped] != self._stamps:
            return False
        self.generation = generation()
        return True

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        """The generated forward on these inputs, or EAGER; the caller (:func:`run`) has checked
        :meth:`still_valid` (once per call: the walk over every child module is not free)."""
        if not kwargs and len(args) == self.n_args and self.positional:
            if all(type(a) is torch.Tensor for a in args):
                out = self.native(args[0]) if self.native is not None else None
                return self.fn(*args) if out is None else out
            return EAGER
        if tuple(sorted(kwargs)) != self.kw_names or len(args) != self.n_args:
            return EAGER
        bound = tracing.bind_inputs(self.model, args, kwargs)
        for name, value in self.fixed.items():
            plain = isinstance(value, (bool, int, float, str))
            same = bound[name] is value or (plain and bound[name] == value)
            if not same:
                return EAGER
        tensors = [bound[n] for n in self.tensor_names]
        if not all(type(t) is torch.Tensor for t in tensors):
            return EAGER
        return self.fn(*tensors)

    def status(self) -> str:
        note = self.native.note if self.native else "off: not one positional tensor input"
        return f"graph ({self.lowered} ops lowered to int8 kernels, {self.generic} run as in eager mode; " \
               f"native program {note})"


def build(model: nn.Module, sites: dict[str, Any], args: tuple, kwargs: dict, expected: Any,
          fuse: bool = True) -> GraphRuntime:
    """Trace, interpret and generate the graph runtime of ``model`` for calls shaped like
    ``model(*args, **kwargs)``; ``expected`` is the eager output of that call, which the
    generated forward must reproduce exactly. Raises TraceFailed with the reason otherwise.
    ``fuse``: sibling dynamic Linears as one GEMM (:mod:`.fused_linears`; built again without
    if the result differed)."""
    inputs = tracing.bind_inputs(model, args, kwargs)
    if any(isinstance(v, torch.Tensor) and type(v) is not torch.Tensor for v in inputs.values()):
        raise tracing.TraceFailed("an input is a tensor subclass")
    graph = tracing.trace(model, inputs, sites)
    values, keys = interpret(model, graph, inputs, sites)
    unused = set(sites) - set(keys.values())
    if unused:
        raise tracing.TraceFailed(f"call site {sorted(unused)[0]} is not in the traced graph")
    gen = lowering.Codegen()
    counts = {"lowered": 0, "generic": 0}
    tensor_names: list[str] = []
    last_use = last_users(graph)
    fused = fused_linears.groups(graph, model, values) if fuse else {}
    for node in graph.nodes:
        kind = _emit_fused(node, fused, gen, model) if node in fused else \
            _emit_node(node, values, keys, sites, inputs, tensor_names, gen, model)
        counts[kind] = counts.get(kind, 0) + 1
        # free what is no longer needed, as eager mode would (straight-line code otherwise keeps
        # every activation alive to the end: MiniLM at batch 8 ran 1.5x slower that way)
        free = {gen.var(n) for n in node.all_input_nodes if last_use[n] is node}
        if not node.users and node.op != "output":
            free.add(gen.var(node))
        if free and node.op != "output":
            gen.lines.append(f"del {', '.join(sorted(free))}")
    lowered, generic = counts["lowered"], counts["generic"]
    params = ", ".join(f"a{i}" for i in range(len(tensor_names)))
    src = f"def forward({params}):\n" + "".join(f"    {line}\n" for line in gen.lines)
    namespace = dict(gen.glob)
    exec(compile(src, "<quanta graph runtime>", "exec"), namespace)  # noqa: S102 - our own generated code
    fn = namespace["forward"]
    got = fn(*[inputs[n] for n in tensor_names])
    try:
        check_same(expected, got)
    except tracing.TraceFailed:
        if fused:
            return build(model, sites, args, kwargs, expected, fuse=False)
        raise
    positional = not kwargs and list(inputs)[:len(args)] == tensor_names
    native = None
    if positional and len(args) == 1 and len(tensor_names) == 1:
        rerun = lambda x: interpret(model, graph, {**inputs, tensor_names[0]: x}, sites)[0]  # noqa: E731
        native = native_program.Programs(native_lowering.build, graph, keys, sites, model, fn, rerun, args[0],
                                         values, got)
    return GraphRuntime(model, fn, tensor_names, inputs, positional, len(args), tuple(sorted(kwargs)),
                        lowered, generic, native)


def _emit_node(node: fx.Node, values: dict[fx.Node, Any], keys: dict[fx.Node, str], sites: dict[str, Any],
               inputs: dict[str, Any], tensor_names: list[str], gen: lowering.Codegen,
               model: nn.Module) -> str:
    """Emit one node's line; "lowered", "generic" or "other" (inputs, constants, the output)."""
    value = values.get(node)
    if node.op == "placeholder":
        if isinstance(inputs.get(node.target), torch.Tensor):
            gen.lines.append(f"{gen.var(node)} = a{len(tensor_names)}")  # not the user's names
            tensor_names.append(node.target)
        else:
            gen.lines.append(f"{gen.var(node)} = {gen.const(value)}")
        return "other"
    if node.op == "output":
        out = node.args[0]
        if isinstance(out, fx.Node) and not isinstance(values[out], (list, tuple, dict)):
            gen.lines.append(f"return {gen.expr(out, dequantize=True)}")
        else:
            gen.lines.append(f"return dequantize_any({gen.expr(out, dequantize=True)})")
        return "other"
    if node.op == "get_attr":
        gen.lines.append(f"{gen.var(node)} = {gen.const(value)}")
        return "other"
    site = sites.get(keys.get(node))
    if lowering.lower(node, values, gen, model, site):
        return "lowered"
    _emit_generic(node, value, gen, model, site)
    return "generic"


def _emit_fused(node: fx.Node, fused: dict[fx.Node, tuple[list[fx.Node], int]], gen: lowering.Codegen,
                model: nn.Module) -> str:
    """One member of a group of sibling int8 Linears: the first runs the group's GEMM."""
    members, position = fused[node]
    result = f"fused_{gen.var(members[0])}"
    if position == 0:
        modules = [model.get_submodule(n.target) for n in members]
        if isinstance(modules[0], fused_linears.QuantizedLinear):
            kernels = [lowering.float_input_kernel(m) for m in modules]
            runner = fused_linears.FusedStaticLinears(modules, kernels)
        else:
            runner = fused_linears.FusedDynamicLinears(modules)
        gen.lines.append(f"{result} = {gen.const(runner, 'fl')}({gen.var(node.args[0])})")
    gen.lines.append(f"{gen.var(node)} = {result}[{position}]")
    if position == len(members) - 1:
        gen.lines.append(f"del {result}")
    return "lowered"


def _emit_generic(node: fx.Node, value: Any, gen: lowering.Codegen, model: nn.Module, site: Any) -> None:
    """The node exactly as eager mode runs it (int8 inputs as QTensors; a call site through
    its ``run``); an int8 result is unwrapped to its data."""
    if site is not None:
        call = f"{gen.const(site.run, 'site')}({gen.const(tracing.op_callable(node))}, " \
               f"{gen.expr(tuple(node.args))}, {gen.expr(dict(node.kwargs))})"
    elif node.op == "call_module":
        call = gen.call(gen.const(model.get_submodule(node.target), "m"), node.args, node.kwargs)
    elif node.op == "call_method":
        call = gen.call(f"{gen.expr(node.args[0])}.{node.target}", node.args[1:], node.kwargs)
    else:
        call = gen.call(gen.const(node.target, "f"), node.args, node.kwargs)
    if isinstance(value, QTensor):
        gen.q[node] = (value.scale, value.zero_point)
        call += ".int_data"
    gen.lines.append(f"{gen.var(node)} = {call}")


def last_users(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Each node read by another: the last node (in graph order) that reads it, after which its
    value can be freed."""
    return {n: user for user in graph.nodes for n in user.all_input_nodes}


@contextmanager
def eager_runtime(model: nn.Module) -> Iterator[None]:
    """Run the quanta ``model`` in eager mode meanwhile: the graph runtime skips module hooks
    and call-site taps."""
    state = model._quanta
    config = state.config
    state.config = dataclasses.replace(config, runtime="eager")
    try:
        yield
    finally:
        state.config = config


def interpret(model: nn.Module, graph: fx.Graph, inputs: dict[str, Any],
              sites: dict[str, Any]) -> tuple[dict[fx.Node, Any], dict[fx.Node, str]]:
    """Run the graph once as eager mode would (QTensors between int8 ops), keying call sites."""
    values: dict[fx.Node, Any] = {}
    keys: dict[fx.Node, str] = {}
    keyer = tracing.SiteKeys(KEYED_OPS)
    for node in graph.nodes:
        if node.op == "placeholder":
            values[node] = tracing.placeholder_value(node, inputs)
            continue
        site = None
        if node.op in ("call_function", "call_method"):
            flat = tree_flatten(fx.node.map_arg((node.args, node.kwargs), values.__getitem__))[0]
            key = keyer.key(node, any(isinstance(t, torch.Tensor) for t in flat))
            if key is not None:
                keys[node] = key
                site = sites.get(key)
        if node.op != "output":
            values[node] = node_value(model, node, values, site)
    return values, keys


def node_value(model: nn.Module, node: fx.Node, values: dict[fx.Node, Any], site: Any) -> Any:
    """One node's value (not a placeholder's or the output's) from the values of the nodes it
    reads, as eager mode computes it; ``site``: the int8 call site this node's key names, if any."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    if node.op == "get_attr":
        obj = model
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    if site is not None:
        return site.run(tracing.op_callable(node), args, kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def check_same(expected: Any, got: Any) -> None:
    want, _ = tree_flatten(expected)
    have, _ = tree_flatten(got)
    if len(want) != len(have):
        raise tracing.TraceFailed("the graph returns a different structure than eager mode")
    for w, h in zip(want, have, strict=True):
        if isinstance(w, torch.Tensor):
            same = isinstance(h, torch.Tensor) and w.dtype == h.dtype and w.shape == h.shape \
                   and bool(torch.equal(w, h) or torch.allclose(w, h, rtol=0, atol=0, equal_nan=True))
        else:
            same = type(w) is type(h) and (w is h or w == h)
        if not same:
            raise tracing.TraceFailed("the graph's output differs from eager mode's on the first call")


class Off:
    """The graph runtime does not apply to this model (``reason``). ``hooks``: the hook count
    when it was refused for a foreign hook; it is retried once that count changes."""

    def __init__(self, reason: str, hooks: int | None = None) -> None:
        self.reason, self.hooks = reason, hooks


MAX_BUILDS = 8  # a model that keeps changing (hooks added per call) stays eager after this


def run(state: Any, model: nn.Module, args: tuple, kwargs: dict, eager: Callable[[], Any]) -> Any:
    """``model(*args, **kwargs)`` through the graph runtime where it applies, else ``eager()``.
    The first call in eval mode runs eagerly and builds the runtime against that result."""
    rt = state._graph
    if type(rt) is GraphRuntime:
        if rt.still_valid():
            state._check_inputs(args, kwargs)
            try:
                out = rt(args, kwargs)
            except NonFiniteInputError:  # NaN/Inf input: each layer's own rule, in eager mode
                out = EAGER
            except Exception:  # noqa: BLE001 - answered below by eager mode, outside this block
                out = _RAISED
            if out is EAGER:
                return eager()
            if out is _RAISED:
                out = eager()  # bad input: eager mode raises its own error, without the graph's
                state._graph = Off("the graph raised where eager mode ran")
            return out
        state._graph = None
    elif type(rt) is Off:
        if rt.hooks is None or rt.hooks == graph_guards.hook_total(model):
            return eager()
        state._graph = None
    before = graph_guards.python_state(model)
    out = eager()
    if graph_guards.python_state(model) != before:
        state._graph = Off("the forward changes Python attributes of its modules (a counter, a cache), "
                           "which a traced graph would do only once")
        return out
    state._graph = _try_build(state, model, args, kwargs, out)
    return out


def _try_build(state: Any, model: nn.Module, args: tuple, kwargs: dict, out: Any) -> GraphRuntime | Off:
    from quanta.modules.observed import ObservedModule

    state._graph_builds += 1
    if state._graph_builds > MAX_BUILDS:
        return Off(f"rebuilt {MAX_BUILDS} times: the model keeps changing (hooks, modules, qparams)")
    if any(not site.converted for site in state.sites.values()) \
            or any(isinstance(m, ObservedModule) for m in [*model.modules(), *state.op_sites.values()]):
        return Off("the model is prepared, not converted")
    foreign = graph_guards.foreign_hook(state, model)
    if foreign:
        return Off(f"{foreign} (eager mode runs it)", graph_guards.hook_total(model))
    try:
        return build(model, state.sites_by_key, args, kwargs, out)
    except tracing.TraceFailed as exc:
        return Off(str(exc))
    except Exception as exc:  # noqa: BLE001 - the runtime is an optimization: never fail the call
        return Off(f"{type(exc).__name__} while building: {exc}")


def runtime_status(model: nn.Module) -> str:
    """Which runtime ``model`` uses in eval mode and why: the graph runtime or eager mode."""
    state = getattr(model, "_quanta", None)
    if state is None:
        return "not a quanta model"
    if state.config.runtime == "eager":
        return "eager (config runtime='eager')"
    rt = state._graph
    if type(rt) is GraphRuntime:
        return rt.status()
    if type(rt) is Off:
        return f"eager: {rt.reason}"
    return "graph runtime not built yet (built on the first call in eval mode)"
