"""Where int8 flows between the layers of a plan (step 4 of ``plan.plan_static``).

An int8 producer emits int8 (a QTensor) only when every op that finally reads it can take
int8; a module records the int8 producer it reads from (``input_from``); in static mode an
int8 producer read only by an int8 ``cat`` writes at the cat's output qparams (``output_from``).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from quanta.capture.record import DataflowRecord, Node

if TYPE_CHECKING:
    from quanta.capture.plan import Plan


def plan_int8_flow(record: DataflowRecord, plan: Plan, calls: dict[str, list[Node]], mode: str) -> None:
    """Which int8 producers emit int8, and where modules read int8 from. An int8 call site whose
    result is read in float gains nothing (and an additive attention mask of -inf-like values
    would wreck its range): it runs in float. Repeats until no site changes, since one site's
    precision decides what its producers may emit."""
    changed = True
    while changed:
        changed = False
        for lp in plan.layers.values():
            if lp.precision != "int8":
                continue
            nodes = calls.get(lp.name) or [n for n in record.nodes if n.name == lp.name]
            lp.output_int8 = bool(nodes) and not lp.weight_only and all(
                _reads_int8(record, plan, n, set()) for n in nodes)
            # a matmul keeps its int8 inputs and exact int32 sums with a float output
            if lp.kind == "site" and not lp.output_int8 and not lp.weight and lp.float_type != "matmul":
                lp.precision, lp.quantized_type = "float", ""
                lp.reason = "its result is read in float: no int8 gain"
                changed = True
    for lp in plan.layers.values():
        nodes = calls.get(lp.name) or ([n for n in record.nodes if n.name == lp.name] if lp.weight else [])
        if lp.precision == "int8" and (lp.kind == "module" or lp.weight) and nodes:
            origins = {_int8_origin(record, plan, i) for n in nodes for i in n.inputs}
            if len(origins) == 1:
                lp.input_from = origins.pop() or ""
    if mode == "static":
        _concat_in_place(record, plan)


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


def _concat_in_place(record: DataflowRecord, plan: Plan) -> None:
    """An int8 producer whose output only an int8 ``cat`` reads (through ops that keep qparams)
    writes at the cat's output qparams (``output_from``), so the cat joins the uint8 data as is
    instead of requantizing each input (SqueezeNet's fire modules, DenseNet, ShuffleNet)."""
    names = Counter(n.name for n in record.nodes)
    for n in record.nodes:
        lp = plan.layers.get(n.name)
        if n.kind != "function" or lp is None or lp.float_type != "cat" or lp.precision != "int8" \
                or names[n.name] != 1:
            continue
        for i in n.inputs:
            node = record.nodes[i]
            while _passes_int8(plan, node) and len(node.inputs) == 1:
                node = record.nodes[node.inputs[0]]
            source = plan.layers.get(node.name)
            if source is not None and source.precision == "int8" and source.output_int8 \
                    and names[node.name] == 1 and _only_reader(record, plan, node, n.id):
                source.output_from = n.name


def _only_reader(record: DataflowRecord, plan: Plan, node: Node, target: int) -> bool:
    """True if ``node``'s output reaches nothing but node ``target`` (through int8-native ops)."""
    if node.is_output:
        return False
    for c in node.consumers:
        cn = record.nodes[c]
        if c != target and not (_passes_int8(plan, cn) and _only_reader(record, plan, cn, target)):
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
