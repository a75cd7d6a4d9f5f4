"""What quanta attaches to a model, and how functional calls reach their call sites.

``QuantaState`` is attached to a prepared or quantized model as ``model._quanta``. It holds
the plan, the config and one ``QuantizedSite`` per int8 functional call site (``x + y``,
``torch.cat``), and installs the hooks that (a) key functional calls by call site through a
``TorchFunctionMode`` (``_SiteMode``) active only during the model's forward, (b) check model
inputs, and (c) return float tensors to the caller. ``_EagerCall`` runs the forward (eager or
through the graph runtime) outside ``torch.compile`` tracing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from quanta.capture.callsites import LeafMarker, SiteTracker, canonical_op_name
from quanta.capture.plan import Plan
from quanta.capture.record import batch_tensors
from quanta.config import QuantConfig
from quanta.errors import QuantizedInputError
from quanta.modules import graph
from quanta.modules.float_inputs import forget_quantized_input
from quanta.modules.mapping import KEYED_OPS
from quanta.modules.quantized import QuantizedModule
from quanta.qtensor import _METADATA, QTensor, dequantize_any


def site_module_key(key: str) -> str:
    """ModuleDict keys cannot contain dots (``QuantaState.sites_by_key`` reverses it)."""
    return key.replace(".", "/")


def numerics_of(model: nn.Module) -> str:
    """The ``QuantConfig.numerics`` a quantized model was converted with ("onnxruntime" for a
    model quanta did not quantize): what an exporter checks against its runtime's rounding."""
    state = getattr(model, "_quanta", None)
    return getattr(getattr(state, "config", None), "numerics", "onnxruntime")


def _never_calls_site_ops(module: nn.Module) -> bool:
    """Leaves whose forward never calls add/cat where the site mode sees it: static int8
    modules (their kernels run with torch functions disabled) and plain single-op torch layers."""
    return isinstance(module, QuantizedModule) or type(module) in _SITE_FREE_LEAVES


_SITE_FREE_LEAVES = frozenset({
    nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Dropout, nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.Embedding,
})


class _EagerCall:
    """Runs a quanta model's forward outside ``torch.compile`` tracing (installed as the model's
    ``_call_impl``), so compiling a quantized model works and gives the eager result.

    Why not traced: QTensor is a wrapper subclass carrying int8 data; as a traceable subclass,
    AOT autograd's metadata pass runs its ``__torch_function__`` under the functional mode, where
    dequantizing (``Tensor.to``) fails; made opaque, Dynamo cannot trace
    ``_make_wrapper_subclass`` and recurses. Tracing would need every int8 op as a registered
    custom op. A callable object (not a closure) so ``copy.deepcopy`` rebinds it to the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        state = model.__dict__.get("_quanta")
        forget_quantized_input()
        if state is not None:
            state._modes.error = None
        try:
            if model.training or state is None or state.config.runtime != "graph" or torch.jit.is_tracing():
                return nn.Module._call_impl(model, *args, **kwargs)
            return graph.run(state, model, args, kwargs, lambda: nn.Module._call_impl(model, *args, **kwargs))
        except TypeError as e:
            pending = getattr(state._modes, "error", None) if state is not None else None
            if pending is None or pending is e:
                raise
            raise pending from None


_SITE_OP_OF: dict[Callable, str | None] = {}  # torch function -> its site op name, None if not one


class _SiteMode(TorchFunctionMode):
    def __init__(self, state: QuantaState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        tracker = self.state.tracker
        if tracker.leaf_depth or not tracker.stack or func in _METADATA:
            return _call(func, types, args, kwargs)
        try:
            op = _SITE_OP_OF[func]
        except (KeyError, TypeError):  # TypeError: an unhashable callable
            op = canonical_op_name(func)
            op = op if op in KEYED_OPS else None
            try:
                _SITE_OP_OF[func] = op
            except TypeError:
                pass
        if op is None:
            return _call(func, types, args, kwargs)
        site = self.state.sites_by_key.get(tracker.next_key(op))
        if site is None:
            return _call(func, types, args, kwargs)
        try:
            return site.run(func, args, kwargs)
        except QuantizedInputError as e:
            # inside an operator (x + y, q @ k) torch turns a TypeError into NotImplemented and
            # Python into "unsupported operand": kept here so _EagerCall raises this one instead
            self.state._modes.error = e
            raise


_QTENSOR_ONLY = (QTensor,)


def _call(func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` as torch would dispatch it with this mode popped: when QTensor is
    the only tensor subclass involved, its ``__torch_function__`` directly (saves a second pass
    through torch's Python dispatch, ~5 us per functional call on a QTensor)."""
    if tuple(types) == _QTENSOR_ONLY:
        return QTensor.__torch_function__(func, types, args, kwargs)
    return func(*args, **kwargs)


class QuantaState(LeafMarker, nn.Module):
    """Everything quanta attaches to a model: plan, config, call sites and hooks.

    It is stored as ``model._quanta`` but not registered as a child module, so containers
    that iterate their children (``nn.Sequential``, ``nn.ModuleList``) are unaffected; its
    tensors still appear in ``model.state_dict()`` under ``_quanta.`` through state-dict hooks.
    """

    def __init__(self, plan: Plan, config: QuantConfig) -> None:
        super().__init__()
        self.plan = plan
        self.config = config
        self.sites = nn.ModuleDict()  # int8 add/cat call sites (QuantizedSite) by site_module_key
        # weight op call sites (a conv/linear call outside a quantized module): the same layer
        # classes as modules (ObservedModule, QAT*, Quantized*), by site_module_key
        self.op_sites = nn.ModuleDict()
        self.tracker = SiteTracker(plan.opened)
        self._modes = threading.local()  # per thread: the site mode its forward entered
        self._root_handles: list = []
        self._eager: _EagerCall | None = None
        self._graph: Any = None  # graph.GraphRuntime | graph.Off | None (not built yet)
        self._graph_builds = 0

    @property
    def sites_by_key(self) -> dict[str, nn.Module]:
        """Every call site by key: int8 add/cat sites and weight op sites (both have ``run``)."""
        cache = self.__dict__.get("_site_cache")
        if cache is None or len(cache) != len(self.sites) + len(self.op_sites):
            cache = {s.key: s for s in self.sites.values()}
            cache.update((k.replace("/", "."), m) for k, m in self.op_sites.items())
            self.__dict__["_site_cache"] = cache
        return cache

    def set_op_site(self, key: str, layer: nn.Module) -> None:
        """Put ``layer`` (observed, QAT or int8) at weight op call site ``key``."""
        self.op_sites[site_module_key(key)] = layer
        self.__dict__.pop("_site_cache", None)

    def attach(self, model: nn.Module) -> None:
        """(Re)install the hooks on ``model``; called after prepare, convert and load."""
        self.detach()
        object.__setattr__(model, "_quanta", self)
        if self.sites or self.op_sites:  # call-site keys are only read when there are sites to run
            self.tracker.install(model, skip_leaf=_never_calls_site_ops)
        self._root_handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, always_call=True),
            model._register_state_dict_hook(self._add_state),
            model._register_load_state_dict_pre_hook(self._load_state, with_module=True),
        ]
        self._eager = _EagerCall(model)
        model.__dict__["_call_impl"] = self._eager
        self._graph, self._graph_builds = None, 0

    def detach(self) -> None:
        if self._eager is not None:
            self._eager.model.__dict__.pop("_call_impl", None)
            self._eager = None
        self.tracker.remove()
        for h in self._root_handles:
            h.remove()
        self._root_handles = []

    def __getstate__(self) -> dict[str, Any]:
        # the graph runtime holds the model's modules and generated code: rebuilt, never copied
        return {**self.__dict__, "_graph": None, "_graph_builds": 0, "_modes": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {k: v for k, v in state.items() if k != "_mode"}  # pickled by an older quanta
        state["_modes"] = threading.local()
        super().__setstate__(state)
        self.__dict__.setdefault("_graph", None)  # pickled by a quanta without the graph runtime
        self.__dict__.setdefault("_graph_builds", 0)

    def _add_state(self, model: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        if prefix == "":
            state_dict.update(self.state_dict(prefix="_quanta."))

    def _load_state(self, model: nn.Module, state_dict: dict, prefix: str, local_metadata: Any,
                    strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix != "":
            return
        self._graph, self._graph_builds = None, 0
        ours = {k[len("_quanta."):]: state_dict.pop(k) for k in list(state_dict) if k.startswith("_quanta.")}
        result = self.load_state_dict(ours, strict=False)
        missing_keys.extend("_quanta." + k for k in result.missing_keys)
        unexpected_keys.extend("_quanta." + k for k in result.unexpected_keys)

    def _enter(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self._check_inputs(args, kwargs)
        if self.training != model.training:  # not a child: follow model.train()/eval() here (QAT)
            self.train(model.training)
        if (self.sites or self.op_sites) and getattr(self._modes, "mode", None) is None:
            mode = self._modes.mode = _SiteMode(self)
            mode.__enter__()

    def _exit(self, model: nn.Module, args: tuple, out: Any) -> Any:
        mode = getattr(self._modes, "mode", None)
        if mode is not None:
            self._modes.mode = None
            mode.__exit__(None, None, None)
        return dequantize_any(out)

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        if not kwargs and all(type(a) is torch.Tensor for a in args):
            tensors = args  # the common call, model(x): no tree walk (~8 us at batch 1)
        else:
            tensors = batch_tensors((args, kwargs))
        for i, (t, meta) in enumerate(zip(tensors, self.plan.input_meta, strict=False)):
            if meta is None or isinstance(t, QTensor):
                continue
            dtype, rank = meta
            want_float = str(dtype).replace("torch.", "").startswith(("float", "bfloat"))
            if want_float != t.is_floating_point():
                raise QuantizedInputError(
                    f"model input {i}: expected a {str(dtype).replace('torch.', '')} tensor like the "
                    f"example inputs, got {str(t.dtype).replace('torch.', '')}"
                )
            if t.dim() != rank:
                raise QuantizedInputError(
                    f"model input {i}: expected rank {rank} like the example inputs, got shape "
                    f"{tuple(t.shape)}"
                )
