"""The dataflow record: which op fed which, from one example forward, without tracing.

The model runs as written (Python control flow included) under a ``TorchFunctionMode`` plus
module hooks. Leaf modules become ``module`` nodes under their qualified names; functional
calls at the top level of a forward become ``function`` nodes keyed by call site (see
``callsites``). Tensors are followed by identity, so ``x + y`` knows both producers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from quanta.capture import weightops
from quanta.capture.callsites import SiteTracker, canonical_op_name, is_metadata
from quanta.errors import UnsupportedModelError


@dataclass
class Node:
    id: int
    kind: str  # "input" | "module" | "function"
    name: str  # module name, call-site key, or "input:N"
    op: str  # module class name or canonical function name
    inputs: list[int] = field(default_factory=list)
    consumers: list[int] = field(default_factory=list)
    is_output: bool = False
    func: Callable | None = None
    args: tuple = ()  # non-tensor arguments of function nodes (e.g. hardtanh bounds)
    params: list[str] = field(default_factory=list)  # model parameters read (function nodes)
    # weight ops (capture.weightops): the weight parameter, the bias parameter ("" if none),
    # the call's non-tensor arguments; and multiply-accumulates of weight ops (modules: inside)
    weight: str = ""
    bias: str = ""
    call: dict = field(default_factory=dict)
    macs: int = 0


@dataclass
class DataflowRecord:
    nodes: list[Node] = field(default_factory=list)
    input_meta: list[tuple[torch.dtype, int] | None] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)  # childless modules looked inside

    def module_nodes(self, name: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == "module" and n.name == name]

    def add(self, kind: str, name: str, op: str, inputs: list[int], **extra: Any) -> Node:
        node = Node(len(self.nodes), kind, name, op, inputs, **extra)
        self.nodes.append(node)
        for i in inputs:
            if node.id not in self.nodes[i].consumers:
                self.nodes[i].consumers.append(node.id)
        return node


def call_with(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a Tensor as model(x), a tuple/list as model(*x), a dict as
    model(**x)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def first_batch(calibration_data: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """(the first batch, or None if there is none; the data to iterate from its start): a
    one-shot iterator gets the batch taken from it put back in front."""
    iterator = iter(calibration_data)
    batch = next(iterator, None)
    if iterator is calibration_data and batch is not None:
        calibration_data = itertools.chain([batch], iterator)
    return batch, calibration_data


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(batch)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self, tracker: SiteTracker, record: DataflowRecord, params: dict[int, str]) -> None:
        super().__init__()
        self.tracker = tracker
        self.record = record
        self.params = params
        self.producer: dict[int, int] = {}
        self.keepalive: list[Any] = []
        self._leaf_macs = 0

    def producers(self, obj: Any) -> list[int]:
        ids: list[int] = []
        for t in batch_tensors(obj):
            node = self.producer.get(id(t))
            if node is not None and node not in ids:
                ids.append(node)
        return ids

    def produced(self, node: Node, out: Any) -> None:
        for t in batch_tensors(out):
            self.producer[id(t)] = node.id
        self.keepalive.append(out)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if is_metadata(func):
            return out
        op = canonical_op_name(func)
        if self.tracker.active:
            consts = tuple(a for a in args if not isinstance(a, torch.Tensor))
            read = [self.params[id(t)] for t in batch_tensors((args, kwargs)) if id(t) in self.params]
            node = self.record.add(
                "function", self.tracker.next_key(op), op, self.producers((args, kwargs)),
                func=func, args=consts, params=read, **self._weight_op(op, args, kwargs, out),
            )
            self.produced(node, out)
        elif self.tracker.leaf_depth and op in weightops.WEIGHT_OPS:  # inside a module: its MACs
            self._leaf_macs += self._weight_op(op, args, kwargs, out).get("macs", 0)
        return out

    def _weight_op(self, op: str, args: tuple, kwargs: dict, out: Any) -> dict[str, Any]:
        """The weight-op fields of a call whose weight operand is a parameter of the model."""
        if op not in weightops.WEIGHT_OPS:
            return {}
        x, w, b = weightops.operands(op, args, kwargs)
        name = self.params.get(id(w)) if isinstance(w, torch.Tensor) else None
        if name is None:
            return {}
        bias = self.params.get(id(b), "") if isinstance(b, torch.Tensor) else ""
        return {"weight": name, "bias": bias, "call": weightops.call_args(op, args, kwargs),
                "macs": weightops.macs(op, x, w, out)}

    def on_leaf(self, phase: str, name: str, module: nn.Module, args: Any, out: Any) -> None:
        if phase == "pre":
            self._pending = self.producers(args)
            self._leaf_macs = 0
            return
        node = self.record.add("module", name, type(module).__name__, self._pending, macs=self._leaf_macs)
        self.produced(node, out)


def capture(model: nn.Module, example_inputs: Any, mode: str = "static") -> DataflowRecord:
    """Run ``model`` once on ``example_inputs`` and return its dataflow record."""
    record = DataflowRecord(opened=weightops.opened_modules(model, mode))
    tracker = SiteTracker(record.opened)
    recorder = _Recorder(tracker, record, weightops.parameter_names(model))
    for i, t in enumerate(batch_tensors(example_inputs)):
        record.input_meta.append((t.dtype, t.dim()))
        node = record.add("input", f"input:{i}", "input", [])
        recorder.producer[id(t)] = node.id
    tracker.install(model, on_leaf=recorder.on_leaf)
    try:
        with torch.no_grad(), recorder:
            out = call_with(model, example_inputs)
    except Exception as e:
        raise UnsupportedModelError(
            f"the model failed on example_inputs during prepare ({type(e).__name__}: {e}); "
            "check that example_inputs match what model.forward expects"
        ) from e
    finally:
        tracker.remove()
    for node_id in recorder.producers(out):
        record.nodes[node_id].is_output = True
    return record
