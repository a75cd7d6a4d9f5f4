"""Runtime for functional call sites and the model-level hooks.

``QuantaState`` is attached to a prepared or quantized model as ``model._quanta``. It holds
the plan, the config and one ``QuantizedSite`` per int8 functional call site (``x + y``,
``torch.cat``), and installs the hooks that (a) key functional calls by call site through a
``TorchFunctionMode`` active only during the model's forward, (b) check model inputs, and
(c) return float tensors to the caller.
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
from quanta.config import QuantConfig, QuantSpec
from quanta.errors import NonFiniteInputError, QuantizedInputError
from quanta.kernels import eltwise, onednn, reference
from quanta.kernels import matmul as matmul_kernels
from quanta.modules import graph
from quanta.modules.float_inputs import forget_quantized_input, quantize_float_input
from quanta.modules.mapping import KEYED_OPS
from quanta.modules.quantized import QuantizedModule, bump_generation
from quanta.numerics.observers import make_observer
from quanta.qtensor import _METADATA, QTensor, dequantize_any


def site_module_key(key: str) -> str:
    """ModuleDict keys cannot contain dots (``site_key`` reverses it)."""
    return key.replace(".", "/")


def numerics_of(model: nn.Module) -> str:
    """The ``QuantConfig.numerics`` a quantized model was converted with ("onnxruntime" for a
    model quanta did not quantize): what an exporter checks against its runtime's rounding."""
    state = getattr(model, "_quanta", None)
    return getattr(getattr(state, "config", None), "numerics", "onnxruntime")


class QuantizedSite(LeafMarker, nn.Module):
    """One functional call site: observes its output while calibrating, runs int8 after."""

    def __init__(self, key: str, op: str, activation: str, spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.key, self.op, self.activation = key, op, activation
        self.spec = spec
        self.observer = make_observer(spec, f"{key} ({op})") if spec is not None else None
        self.register_buffer("output_scale", torch.tensor(1.0))
        self.register_buffer("output_zero_point", torch.tensor(0, dtype=torch.int32))
        if op == "matmul":  # qparams for an operand that arrives in float (a softmax's output)
            self.register_buffer("input_scale", torch.ones(2))
            self.register_buffer("input_zero_point", torch.zeros(2, dtype=torch.int32))
            self.input_observers = None if spec is None else nn.ModuleList(
                make_observer(spec, f"{key} ({op} operand {i})") for i in range(2))
        self.converted = False
        self.output_int8 = True
        self.backend = "reference"  # "onednn": fused one-pass int8 add (set by select_backends)
        self.fake_quant = False  # QAT: the observer is a FakeQuantize and its output is returned
        self.nonfinite = "raise"  # QuantConfig.nonfinite, set with the backend
        self.numerics = "onnxruntime"  # QuantConfig.numerics, set with the backend

    def set_qparams(self, scale: float, zero_point: int) -> None:
        self.output_scale.fill_(scale)
        self.output_zero_point.fill_(zero_point)
        self.__dict__.pop("_qp", None)
        self.converted = True
        self.observer = None
        bump_generation(self)

    def set_input_qparams(self, qparams: list[tuple[float, int]]) -> None:
        """The (scale, zero point) each matmul operand is quantized at when it arrives in float."""
        for i, (scale, zero_point) in enumerate(qparams):
            self.input_scale[i] = scale
            self.input_zero_point[i] = zero_point
        self.__dict__.pop("_input_qp", None)
        self.input_observers = None
        bump_generation(self)

    def run(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.converted:
            if self.op == "matmul" and self.input_observers is not None:
                for observer, operand in zip(self.input_observers, args, strict=False):
                    observer(dequantize_any(operand))
            out = func(*args, **kwargs)
            if self.activation != "none":  # fused: a replaced ReLU module after it no longer runs
                out = reference.apply_activation(dequantize_any(out), self.activation)
            if self.observer is not None:
                observed = self.observer(dequantize_any(out))
                if self.fake_quant:
                    return observed
            return out
        scale, zp = self.qparams()
        if self.op == "matmul":
            return self._matmul(func, args, kwargs, scale, zp)
        q = self._int8(func, args, kwargs, scale, zp)
        if q is None:
            y = func(*dequantize_any(args), **dequantize_any(kwargs))
            y = reference.apply_activation(y, self.activation)
            if not bool(torch.isfinite(y).all()):
                return self._nonfinite(y)
            if self.backend != "reference":
                # An input arrived in float (its producer runs float): no int8 kernel runs here.
                # Requantize only for an int8 consumer; a float consumer gets the float result
                # (differs from the reference by < 1/2 output quantum, or less where it clamps).
                if not self.output_int8:
                    return y
                return QTensor(onednn.quantize_uint8(y, scale, zp, numerics=self.numerics), scale, zp)
            q = reference.quantize_per_tensor(y, scale, zp, numerics=self.numerics)
        out = QTensor(q, scale, zp)
        return out if self.output_int8 else out.dequantize()

    def _matmul(self, func: Callable, args: tuple, kwargs: dict, scale: float, zp: int) -> Any:
        """int8 x int8 with an exact int32 accumulator; the output int8 for an int8 reader, else
        float straight from the accumulator (no output rounding for a softmax or a scale)."""
        operands = [self._operand(i, t) for i, t in enumerate(args)] if len(args) == 2 and not kwargs else []
        if len(operands) != 2 or None in operands:
            y = func(*dequantize_any(args), **dequantize_any(kwargs))
            if not bool(torch.isfinite(y).all()):
                return self._nonfinite(y)
            q = reference.quantize_per_tensor(y, scale, zp, numerics=self.numerics)
            return QTensor(q, scale, zp) if self.output_int8 else y
        (a, sa, za), (b, sb, zb) = operands
        kernel = matmul_kernels.matmul if self.backend != "reference" else reference.matmul
        if self.output_int8:
            return QTensor(kernel(a, sa, za, b, sb, zb, scale, zp), scale, zp)
        return kernel(a, sa, za, b, sb, zb)

    def _operand(self, i: int, t: Any) -> tuple[torch.Tensor, float, int] | None:
        """An operand's (codes, scale, zero point): a QTensor's own, or a finite float tensor
        quantized at this site's calibrated qparams for operand ``i``."""
        if isinstance(t, QTensor):
            return t.int_data, t.scale, t.zero_point
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        qp = self.__dict__.get("_input_qp")
        if qp is None:
            qp = self.__dict__["_input_qp"] = [(float(s), int(z)) for s, z in
                                                zip(self.input_scale, self.input_zero_point, strict=True)]
        scale, zp = qp[i]
        try:
            return quantize_float_input(t, scale, zp, self.backend, self.numerics), scale, zp
        except NonFiniteInputError:  # the float fallback names it, or propagates it
            return None

    def _nonfinite(self, y: torch.Tensor) -> torch.Tensor:
        """NaN/Inf in a float input: a clear error, or (``nonfinite="propagate"``) the float result."""
        if self.nonfinite == "propagate":
            return y
        raise QuantizedInputError(
            f"call site {self.key} ({self.op}): its float input holds NaN/Inf; int8 cannot carry them. "
            "Pass finite inputs, or QuantConfig(nonfinite='propagate') to get them back as float does"
        )

    def _int8(self, func: Callable, args: tuple, kwargs: dict, scale: float, zp: int) -> Any:
        if self.op == "add":
            if kwargs or len(args) != 2 or not all(isinstance(a, QTensor) for a in args):
                return None
            a, b = args
            add = eltwise.add_uint8 if self.backend == "onednn" else reference.add
            return add(a.int_data, a.scale, a.zero_point, b.int_data, b.scale, b.zero_point,
                       scale, zp, self.activation, self.numerics)
        if self.op == "mul":  # an int8 activation times a float (or int8) one: a channel gate
            if kwargs or len(args) != 2:
                return None
            a, b = args if isinstance(args[0], QTensor) else args[::-1]
            if not isinstance(a, QTensor) or not isinstance(b, torch.Tensor):
                return None
            b = b.dequantize() if isinstance(b, QTensor) else b
            mul = eltwise.mul_uint8 if self.backend == "onednn" else reference.mul
            return mul(a.int_data, a.scale, a.zero_point, b, scale, zp, self.activation)
        if self.op == "cat":
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if not all(isinstance(t, QTensor) for t in tensors) or self.activation != "none":
                return None
            requantize = eltwise.requantize_uint8 if self.backend == "onednn" else reference.requantize
            parts = [requantize(t.int_data, t.scale, t.zero_point, scale, zp) for t in tensors]
            return torch.cat(parts, dim)
        return None

    def qparams(self) -> tuple[float, int]:
        """Output (scale, zero point) as python numbers, cached (read on every call)."""
        qp = self.__dict__.get("_qp")
        if qp is None:
            qp = self.__dict__["_qp"] = (float(self.output_scale), int(self.output_zero_point))
        return qp

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_qp", None)
        self.__dict__.pop("_input_qp", None)
        bump_generation(self)

    def extra_repr(self) -> str:
        return f"{self.key}, op={self.op}, activation={self.activation}"


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
