"""Planning on the dataflow record: what runs in int8, what fuses, where int8 flows.

Decisions are made once, on the record of one example forward, and stored in a ``Plan``
that is plain data (it goes into the saved manifest and the report):
- Conv/Linear followed by BatchNorm (and nothing else reading the conv output) fold;
- a ReLU/ReLU6 (module or functional) that is the only reader of a quantized producer's
  output folds into that producer's output range;
- a quantized producer emits int8 (a QTensor) only when every op that finally reads it can
  take int8; otherwise its kernel emits float32 directly (``capture.int8_flow``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from quanta.capture import activations, weightops
from quanta.capture.int8_flow import plan_int8_flow
from quanta.capture.record import DataflowRecord, Node
from quanta.config import QuantConfig
from quanta.modules import mapping
from quanta.qtensor import _NATIVE


@dataclass
class LayerPlan:
    """One module of the model, or one functional call site (``kind == "site"``)."""

    name: str
    kind: str  # "module" | "site"
    float_type: str
    precision: str  # "int8" | "float"
    quantized_type: str = ""
    reason: str = ""
    activation: str = "none"
    fused: list[str] = field(default_factory=list)
    folded_into: str = ""
    output_int8: bool = False
    input_from: str = ""
    weight_bits: int | None = None
    input_qparams: tuple[float, int] | None = None
    output_qparams: tuple[float, int] | None = None
    backend: str = ""
    backend_reason: str = ""  # why this kernel was chosen (dispatch rule, override, CPU limit)
    replaced: bool = False  # module swapped for nn.Identity (folded BN, fully fused ReLU)
    weight_only: bool = False  # int8 weights, float activations (embeddings)
    output_from: str = ""  # the cat call site whose output qparams this layer writes at
    macs: int = 0  # multiply-accumulates of its weight ops on the example input
    float_macs: int = 0  # of those, the ones an int8 layer still runs in float (set with the backend)
    # weight op call sites (capture.weightops): the weight and bias parameters it reads, and
    # the call's non-tensor arguments; empty for modules and other call sites
    weight: str = ""
    bias: str = ""
    call: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    mode: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    input_meta: list[Any] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)  # childless modules whose weight ops are sites
    # the weight/bias parameters of op sites -> every layer reading them (modules.opsites)
    weight_readers: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "layers": [dataclasses.asdict(p) for p in self.layers.values()],
            "input_meta": [None if m is None else [str(m[0]).replace("torch.", ""), m[1]]
                           for m in self.input_meta],
            "opened": list(self.opened),
            "weight_readers": {k: list(v) for k, v in self.weight_readers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        layers = {}
        for p in d["layers"]:
            for key in ("input_qparams", "output_qparams"):
                if p.get(key) is not None:
                    p[key] = (float(p[key][0]), int(p[key][1]))
            layers[p["name"]] = LayerPlan(**p)
        readers = {str(k): [str(r) for r in v] for k, v in d.get("weight_readers", {}).items()}
        return cls(d["mode"], layers, [None if m is None else tuple(m) for m in d.get("input_meta", [])],
                   [str(n) for n in d.get("opened", [])], readers)

    def int8_layers(self) -> list[LayerPlan]:
        return [p for p in self.layers.values() if p.precision == "int8" and p.kind == "module"]

    def op_sites(self) -> list[LayerPlan]:
        """Int8 weight op call sites (a conv or linear call outside a quantized module)."""
        return [p for p in self.layers.values() if p.precision == "int8" and p.kind == "site" and p.weight]

    def activation_layers(self) -> list[LayerPlan]:
        """Int8 modules with activation qparams (observed while calibrating, fake-quantized in
        QAT); weight-only layers (embeddings) are converted directly."""
        return [p for p in self.int8_layers() if not p.weight_only]

    def weight_layers(self) -> list[LayerPlan]:
        """Every module or call site that runs a weight op (MACs > 0), int8 or float."""
        return [p for p in self.layers.values() if p.macs > 0 and p.precision != "folded"]


def _activation_kind(node: Node, modules: dict[str, nn.Module]) -> str:
    """The activation ``node`` computes, if it can fold into the int8 op before it
    (``capture.activations``; a functional call folds only when it is a clamp, since it still runs)."""
    if node.kind == "module":
        return activations.module_kind(modules[node.name]) if node.name in modules else ""
    kind = activations.function_kind(node.op, node.args)
    return kind if kind in activations.IDEMPOTENT else ""


def _unfuse_partial(record: DataflowRecord, plan: Plan, modules: dict[str, nn.Module]) -> None:
    """An activation module that is not a clamp folds only where every call of it is fused (it is
    then replaced by Identity): a call left outside would run it twice on a fused result."""
    fused = Counter(name for lp in plan.layers.values() for name in lp.fused)
    for name, count in fused.items():
        m = modules.get(name)
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        kind = activations.module_kind(m) if m is not None and not is_bn else ""
        calls = len(record.module_nodes(name))
        if not kind or kind in activations.IDEMPOTENT or count == calls:
            continue
        for lp in plan.layers.values():
            if name in lp.fused:
                lp.fused.remove(name)
                lp.activation = "none"
        ap = plan.layers[name]
        ap.precision, ap.folded_into = "float", ""
        ap.reason = f"no int8 kernel ({kind} module called {calls} times, not all after an int8 op)"


def _is_pass_through(node: Node, modules: dict[str, nn.Module], mode: str) -> bool:
    """A module call that returns its input unchanged; Dropout only outside QAT (training runs it,
    and a fused ReLU6 or SiLU does not commute with its scaling)."""
    m = modules.get(node.name) if node.kind == "module" else None
    if m is None:
        return False
    dropout = activations.is_dropout(m) and mode != "qat"
    return dropout or activations.returns_its_input(m)  # nn.Identity included


def _sole_consumer(record: DataflowRecord, node: Node) -> Node | None:
    if node.is_output or len(node.consumers) != 1:
        return None
    return record.nodes[node.consumers[0]]


# why a matmul of two activations stays float, by whether the mode is static
_MATMUL_FLOAT = {True: "activation x activation matmul: int8 with QuantConfig(activation_matmul='int8')",
                 False: "activation x activation matmul: int8 in static mode only"}


def plan_static(model: nn.Module, record: DataflowRecord, config: QuantConfig) -> Plan:
    """Decide, for every leaf module and call site, its precision, fusion and int8 flow."""
    mode = config.mode
    modules = dict(model.named_modules())
    plan = Plan(mode, input_meta=list(record.input_meta), opened=list(record.opened))
    calls: dict[str, list[Node]] = {}
    for n in record.nodes:
        if n.kind == "module":
            calls.setdefault(n.name, []).append(n)

    params = weightops.parameter_names(model)
    readers = _parameter_readers(record, modules, params)
    # 1. Modules: candidates for int8, or float with a reason.
    for name, m in modules.items():
        if name == "" or next(m.children(), None) is not None or name.endswith("_quanta"):
            continue
        if name.startswith("_quanta.") or name in record.opened:  # opened: its calls are sites
            continue
        target = mapping.quantized_type(m, mode)
        lp = LayerPlan(name, "module", type(m).__name__, "float")
        skipped, wspec, _, why = config.for_module(name, m)
        if target is None:
            native = isinstance(m, mapping.INT8_NATIVE_MODULES) or activations.is_dropout(m)
            same = not native and activations.returns_its_input(m)
            lp.reason = "runs on int8 data natively" if native else \
                "returns its input (an identity): int8 data passes through" if same else \
                mapping.float_reason(m, "no int8 kernel")
            lp.precision = "native" if native or same else "float"
        elif skipped:
            lp.reason = why
        elif getattr(m, "padding_mode", "zeros") != "zeros":
            lp.reason = f"padding_mode={m.padding_mode!r} has no int8 kernel"
        else:
            lp.precision, lp.quantized_type, lp.weight_bits = "int8", target.__name__, wspec.bits
            if mapping.is_weight_only(target):
                lp.weight_only = True
                lp.reason = "weight-only int8 (one scale per row), float output"
            elif name not in calls:
                read_by = sorted({r for p in m.parameters(recurse=False) for r in readers[params[id(p)]]})
                if read_by:  # its weights are used functionally: they are quantized at those call sites
                    lp.precision, lp.quantized_type = "float", ""
                    lp.reason = f"not called; its parameters are read by {', '.join(read_by[:3])}"
                else:
                    lp.reason = "not in the example forward: no fusion, float output"
        if name not in calls and lp.precision != "int8":
            lp.reason = "not called in the example forward"
        lp.macs = sum(n.macs for n in calls.get(name, ()))
        plan.layers[name] = lp

    # 2. Call sites: weight ops (conv/linear on a parameter), int8 add/cat, int8-native ops, float ops.
    for n in record.nodes:
        if n.kind != "function":
            continue
        if n.weight:
            _plan_weight_op(plan, model, n, config, mode, params)
            continue
        lp = LayerPlan(n.name, "site", n.op, "float", reason="no int8 kernel")
        if n.func in _NATIVE:
            lp.precision, lp.reason = "native", "runs on int8 data natively"
        elif n.op in mapping.INT8_SITE_OPS and len(n.inputs) >= 2 and not config.for_module(n.name, model)[0]:
            lp.precision, lp.quantized_type, lp.reason = "int8", f"int8 {n.op}", ""
            if n.op == "matmul" and (mode != "static" or config.activation_matmul != "int8"):
                lp.precision, lp.quantized_type, lp.reason = "float", "", _MATMUL_FLOAT[mode == "static"]
        plan.layers[n.name] = lp

    # 3. Fusion: BatchNorm folding, then ReLU/ReLU6 folding into the producer's output range.
    #    BatchNorm folds only into a layer that is the sole reader of its weight (a shared weight
    #    would change under its other readers).
    for name, nodes in calls.items():
        lp = plan.layers.get(name)
        if lp is None or lp.precision != "int8" or len(nodes) != 1 or lp.weight_only:
            continue
        foldable = mapping.FOLDABLE_BATCHNORM.get(mapping.mapped_type(modules[name]), ())
        own = {params[id(p)] for p in modules[name].parameters(recurse=False)}
        _fuse(record, plan, modules, lp, nodes[0], foldable, all(readers[p] == {name} for p in own), calls)
    sites = [lp for lp in plan.layers.values() if lp.kind == "site" and lp.weight]
    order: dict[str, int] = {}
    for i, node in enumerate(record.nodes):
        order.setdefault(node.name, i)
    plan.weight_readers = {p: sorted(readers[p], key=lambda r: order.get(r, len(order)))
                           for p in sorted({p for lp in sites for p in (lp.weight, lp.bias) if p})}
    site_calls = Counter(n.name for n in record.nodes if n.kind == "function")
    for n in record.nodes:
        lp = plan.layers.get(n.name)
        if n.kind == "function" and lp is not None and lp.precision == "int8":
            # QAT keeps a BatchNorm after an op site (training would need its parameters, which
            # live in the model, inside the site, which is not part of the model's parameters)
            foldable = mapping.FOLDABLE_BATCHNORM.get(weightops.WEIGHT_OPS.get(n.op), ()) \
                if n.weight and mode != "qat" else ()
            sole = site_calls[n.name] == 1 and all(
                readers[p] == {n.name} for p in (n.weight, n.bias) if p)
            _fuse(record, plan, modules, lp, n, foldable, sole, calls)

    _unfuse_partial(record, plan, modules)

    plan_int8_flow(record, plan, calls, mode)  # 4. which int8 producers emit int8
    # Rows in execution order; modules never called go last.
    first = {}
    for n in record.nodes:
        first.setdefault(n.name, n.id)
    order = sorted(plan.layers, key=lambda k: first.get(k, len(record.nodes)))
    plan.layers = {k: plan.layers[k] for k in order}
    return plan


def _plan_weight_op(plan: Plan, model: nn.Module, n: Node, config: QuantConfig, mode: str,
                    params: dict[int, str]) -> None:
    """The plan of one weight op call site: int8 through the mapped module class of the op, or
    float with the reason (no int8 kernel for this op, excluded by the config)."""
    lp = plan.layers.get(n.name)
    if lp is not None:  # the same site in another call of its module
        lp.macs += n.macs
        return
    lp = LayerPlan(n.name, "site", n.op, "float", weight=n.weight, bias=n.bias, call=dict(n.call),
                   macs=n.macs)
    plan.layers[n.name] = lp
    weight = model.get_parameter(n.weight)
    skipped, wspec, _, why = config.for_layer(n.name, n.op)
    reason = weightops.int8_reason(n.op, weight, n.call)
    target = mapping.MAPPING.get(weightops.WEIGHT_OPS.get(n.op), {}).get(mode)
    if reason or target is None:
        lp.reason = reason or f"no {mode} int8 kernel ({n.op})"
    elif skipped:
        lp.reason = why
    else:
        lp.precision, lp.quantized_type, lp.weight_bits = "int8", target.__name__, wspec.bits


def _parameter_readers(record: DataflowRecord, modules: dict[str, nn.Module],
                       params: dict[int, str]) -> defaultdict[str, set[str]]:
    """Parameter name -> the layers (module calls, call sites) that read it in the forward."""
    readers: defaultdict[str, set[str]] = defaultdict(set)
    for n in record.nodes:
        if n.kind == "module":
            for p in modules[n.name].parameters():
                readers[params[id(p)]].add(n.name)
        elif n.kind == "function":
            for p in n.params:
                readers[p].add(n.name)
    return readers


def _fuse(record: DataflowRecord, plan: Plan, modules: dict[str, nn.Module], lp: LayerPlan, tail: Node,
          foldable: tuple[type[nn.Module], ...], sole_reader: bool, calls: dict[str, list[Node]]) -> None:
    """Fold a BatchNorm that is the only reader of ``tail`` (when ``lp`` alone reads its weights),
    then the activation after it."""
    bn = _sole_consumer(record, tail)
    if foldable and sole_reader and bn is not None and bn.kind == "module" \
            and isinstance(modules.get(bn.name), foldable) and len(calls.get(bn.name, [])) == 1:
        lp.fused.append(bn.name)
        plan.layers[bn.name].folded_into = lp.name
        plan.layers[bn.name].precision, plan.layers[bn.name].reason = "folded", f"folded into {lp.name}"
        tail = bn
    _fuse_activation(record, plan, modules, lp, tail)


def _fuse_activation(record: DataflowRecord, plan: Plan, modules: dict[str, nn.Module],
                     lp: LayerPlan, tail: Node) -> None:
    """Fold the activation that alone reads ``tail``, seen through identities between them (an
    ``nn.Identity`` where a model switched a layer off, Dropout outside training)."""
    act = _sole_consumer(record, tail)
    while act is not None and _is_pass_through(act, modules, plan.mode):
        act = _sole_consumer(record, act)
    if act is None:
        return
    kind = _activation_kind(act, modules)
    if kind:
        lp.activation = kind
        lp.fused.append(act.name)
        ap = plan.layers[act.name]
        ap.folded_into = f"{ap.folded_into}, {lp.name}" if ap.folded_into else lp.name
        ap.precision, ap.reason = "folded", f"folded into {ap.folded_into} ({kind})"
