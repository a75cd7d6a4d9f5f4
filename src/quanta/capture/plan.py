"""Planning on the dataflow record: what runs in int8, what fuses, where int8 flows.

Decisions are made once, on the record of one example forward, and stored in a ``Plan``
that is plain data (it goes into the saved manifest and the report):
- Conv/Linear followed by BatchNorm (and nothing else reading the conv output) fold;
- a ReLU/ReLU6 (module or functional) that is the only reader of a quantized producer's
  output folds into that producer's output range;
- a quantized producer emits int8 (a QTensor) only when every op that finally reads it can
  take int8; otherwise its kernel emits float32 directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

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


@dataclass
class Plan:
    mode: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    input_meta: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "layers": [dataclasses.asdict(p) for p in self.layers.values()],
            "input_meta": [None if m is None else [str(m[0]).replace("torch.", ""), m[1]]
                           for m in self.input_meta],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        layers = {}
        for p in d["layers"]:
            for key in ("input_qparams", "output_qparams"):
                if p.get(key) is not None:
                    p[key] = (float(p[key][0]), int(p[key][1]))
            layers[p["name"]] = LayerPlan(**p)
        return cls(d["mode"], layers, [None if m is None else tuple(m) for m in d.get("input_meta", [])])

    def int8_layers(self) -> list[LayerPlan]:
        return [p for p in self.layers.values() if p.precision == "int8" and p.kind == "module"]

    def activation_layers(self) -> list[LayerPlan]:
        """Int8 modules with activation qparams (observed while calibrating, fake-quantized in
        QAT); weight-only layers (embeddings) are converted directly."""
        return [p for p in self.int8_layers() if not p.weight_only]


def _relu_kind(node: Node, modules: dict[str, nn.Module]) -> str:
    if node.kind == "module":
        m = modules.get(node.name)
        if isinstance(m, nn.ReLU6):
            return "relu6"
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0):
            return "relu6"
        return ""
    if node.op == "relu":
        return "relu"
    if node.op == "relu6" or (node.op == "hardtanh" and tuple(node.args[:2]) == (0.0, 6.0)):
        return "relu6"
    return ""


def _gelu_kind(record: DataflowRecord, node: Node, modules: dict[str, nn.Module], lp: LayerPlan) -> str:
    """GELU folds into a Linear only as an ``nn.GELU`` module called once: the module is
    then replaced by Identity. Unlike ReLU, GELU is not idempotent, so a functional call or a
    shared module (which still runs on the int8 result) must stay a separate float op."""
    m = modules.get(node.name) if node.kind == "module" else None
    if lp.kind != "module" or not isinstance(m, nn.GELU) or len(record.module_nodes(node.name)) != 1 \
            or lp.float_type != "Linear":  # oneDNN's int8 conv has no GELU post-op
        return ""
    return "gelu_tanh" if m.approximate == "tanh" else "gelu"


def _sole_consumer(record: DataflowRecord, node: Node) -> Node | None:
    if node.is_output or len(node.consumers) != 1:
        return None
    return record.nodes[node.consumers[0]]


def plan_static(model: nn.Module, record: DataflowRecord, config: QuantConfig) -> Plan:
    """Decide, for every leaf module and call site, its precision, fusion and int8 flow."""
    mode = config.mode
    modules = dict(model.named_modules())
    plan = Plan(mode, input_meta=list(record.input_meta))
    calls: dict[str, list[Node]] = {}
    for n in record.nodes:
        if n.kind == "module":
            calls.setdefault(n.name, []).append(n)

    # 1. Modules: candidates for int8, or float with a reason.
    for name, m in modules.items():
        if name == "" or next(m.children(), None) is not None or name.endswith("_quanta"):
            continue
        if name.startswith("_quanta."):
            continue
        target = mapping.quantized_type(m, mode)
        lp = LayerPlan(name, "module", type(m).__name__, "float")
        skipped, wspec, _, why = config.for_module(name, m)
        if target is None:
            native = isinstance(m, mapping.INT8_NATIVE_MODULES)
            lp.reason = "runs on int8 data natively" if native else "no int8 kernel"
            lp.precision = "native" if native else "float"
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
                lp.reason = "not in the example forward: no fusion, float output"
        if name not in calls and lp.precision != "int8":
            lp.reason = "not called in the example forward"
        plan.layers[name] = lp

    # 2. Call sites: int8 add/cat, int8-native ops, float ops.
    for n in record.nodes:
        if n.kind != "function":
            continue
        lp = LayerPlan(n.name, "site", n.op, "float", reason="no int8 kernel")
        if n.func in _NATIVE:
            lp.precision, lp.reason = "native", "runs on int8 data natively"
        elif n.op in mapping.INT8_SITE_OPS and len(n.inputs) >= 2 and not config.for_module(n.name, model)[0]:
            lp.precision, lp.quantized_type, lp.reason = "int8", f"int8 {n.op}", ""
        plan.layers[n.name] = lp

    # 3. Fusion: BatchNorm folding, then ReLU/ReLU6 folding into the producer's output range.
    for name, nodes in calls.items():
        lp = plan.layers.get(name)
        if lp is None or lp.precision != "int8" or len(nodes) != 1 or lp.weight_only:
            continue
        tail = nodes[0]
        bn = _sole_consumer(record, tail)
        foldable = mapping.FOLDABLE_BATCHNORM.get(type(modules[name]), ())
        if bn is not None and bn.kind == "module" and isinstance(modules.get(bn.name), foldable) \
                and len(calls.get(bn.name, [])) == 1:
            lp.fused.append(bn.name)
            plan.layers[bn.name].folded_into = name
            plan.layers[bn.name].precision, plan.layers[bn.name].reason = "folded", f"folded into {name}"
            tail = bn
        _fuse_activation(record, plan, modules, lp, tail)
    for n in record.nodes:
        lp = plan.layers.get(n.name)
        if n.kind == "function" and lp is not None and lp.precision == "int8":
            _fuse_activation(record, plan, modules, lp, n)

    # 4. int8 flow: which int8 producers emit int8, and where modules read int8 from. An
    #    int8 call site whose result is read in float gains nothing (and an additive attention
    #    mask of -inf-like values would wreck its range): it runs in float. Repeat until no
    #    site changes, since one site's precision decides what its producers may emit.
    changed = True
    while changed:
        changed = False
        for lp in plan.layers.values():
            if lp.precision != "int8":
                continue
            nodes = calls.get(lp.name) or [n for n in record.nodes if n.name == lp.name]
            lp.output_int8 = bool(nodes) and not lp.weight_only and all(
                _reads_int8(record, plan, n, set()) for n in nodes)
            if lp.kind == "site" and not lp.output_int8:
                lp.precision, lp.quantized_type = "float", ""
                lp.reason = "its result is read in float: no int8 gain"
                changed = True
    for lp in plan.layers.values():
        if lp.precision == "int8" and lp.kind == "module" and lp.name in calls:
            nodes = calls[lp.name]
            origins = {_int8_origin(record, plan, i) for n in nodes for i in n.inputs}
            if len(origins) == 1:
                lp.input_from = origins.pop() or ""
    # Rows in execution order; modules never called go last.
    first = {}
    for n in record.nodes:
        first.setdefault(n.name, n.id)
    order = sorted(plan.layers, key=lambda k: first.get(k, len(record.nodes)))
    plan.layers = {k: plan.layers[k] for k in order}
    return plan


def _fuse_activation(record: DataflowRecord, plan: Plan, modules: dict[str, nn.Module],
                     lp: LayerPlan, tail: Node) -> None:
    act = _sole_consumer(record, tail)
    if act is None:
        return
    kind = _relu_kind(act, modules) or _gelu_kind(record, act, modules, lp)
    if kind:
        lp.activation = kind
        lp.fused.append(act.name)
        ap = plan.layers[act.name]
        ap.folded_into = f"{ap.folded_into}, {lp.name}" if ap.folded_into else lp.name
        ap.precision, ap.reason = "folded", f"folded into {ap.folded_into} ({kind})"


def _passes_int8(plan: Plan, node: Node) -> bool:
    lp = plan.layers.get(node.name)
    return lp is not None and lp.precision in ("native", "folded")


def _reads_int8(record: DataflowRecord, plan: Plan, node: Node, seen: set[int]) -> bool:
    """True if every op that finally consumes ``node``'s output accepts int8."""
    if node.is_output:
        return False
    for c in node.consumers:
        if c in seen:
            continue
        seen.add(c)
        cn = record.nodes[c]
        if _passes_int8(plan, cn):
            if not _reads_int8(record, plan, cn, seen):
                return False
            continue
        lp = plan.layers.get(cn.name)
        if lp is None or lp.precision != "int8":
            return False
    return True


def _int8_origin(record: DataflowRecord, plan: Plan, node_id: int) -> str | None:
    """Name of the int8 producer whose QTensor reaches this input, or '' for a float input."""
    node = record.nodes[node_id]
    while _passes_int8(plan, node) and len(node.inputs) == 1:
        node = record.nodes[node.inputs[0]]
    lp = plan.layers.get(node.name)
    if lp is not None and lp.precision == "int8" and lp.output_int8:
        return lp.name
    return ""
