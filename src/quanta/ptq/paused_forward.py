"""The int8 model's forward on each calibration batch, paused before a layer and resumed there.

Layer-by-layer corrections (AdaRound, bias correction) need each layer's inputs as the int8
model delivers them after every layer before it was corrected. Rerunning the model from its
input for each layer costs passes quadratic in depth: with 65 layers and 1,024 crops of
EfficientNet-Lite1 that was 75 % of AdaRound's time. Here the forward runs as its traced graph
(the graph runtime's trace, interpreted node by node as eager mode computes it), and each
batch keeps the live values at the node where it paused, so a pass runs only the nodes between
two layers. Exact: a batch resumes only where no layer changed before its pause point; else it
starts over. A model whose interpreted graph does not reproduce eager mode's output bit for
bit on the first batch, or whose forward changes Python attributes of its modules, is not paused
(``PausedForward.build`` returns None). The values kept between passes are capped (a quarter of
the machine's memory by default): a batch whose values would pass the cap starts over instead,
as with no pausing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from quanta.capture import trace as tracing
from quanta.capture.record import call_with
from quanta.modules import graph as graph_runtime
from quanta.modules import graph_guards
from quanta.modules.float_inputs import forget_quantized_input
from quanta.qtensor import QTensor


def default_hold_limit() -> int:
    """Bytes of paused values to keep: a quarter of physical memory (4 GiB where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def held_bytes(values: dict[fx.Node, Any]) -> int:
    """Bytes of the tensors in ``values`` (a QTensor counts its integer data)."""
    leaves = tree_leaves(list(values.values()))
    return sum(v.int_data.nbytes if isinstance(v, QTensor) else v.nbytes
               for v in leaves if isinstance(v, torch.Tensor))


class Pause(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a layer's pre-hook to stop the forward before that layer runs."""


class PausedForward:
    """Per batch: the node its forward paused at and the values live there."""

    def __init__(self, qmodel: nn.Module, graph: fx.Graph, keys: dict[fx.Node, str], inputs: dict[str, Any],
                 batches: Sequence[torch.Tensor], hold_limit: int | None = None) -> None:
        self.model, self.batches = qmodel, batches
        self.hold_limit = default_hold_limit() if hold_limit is None else hold_limit
        self.inputs = inputs
        self.input_name = next(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
        sites = qmodel._quanta.sites_by_key
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.site_of = [sites.get(keys[n]) if n in keys else None for n in self.nodes]
        index = {n: i for i, n in enumerate(self.nodes)}
        self.dead_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, user in graph_runtime.last_users(graph).items():
            if user in index:  # read by the output: kept to the end of the batch
                self.dead_after[index[user]].append(n)
        self.first_call: dict[int, int] = {}  # id(layer) -> index of the first node calling it
        for i, n in enumerate(self.nodes):
            layer = qmodel.get_submodule(n.target) if n.op == "call_module" else self.site_of[i]
            if layer is not None:
                self.first_call.setdefault(id(layer), i)
        self.paused: list[tuple[int, dict[fx.Node, Any]]] = [(0, {}) for _ in batches]

    @classmethod
    def build(cls, qmodel: nn.Module, batches: Sequence[Any],
              hold_limit: int | None = None) -> PausedForward | None:
        """For batches that are single tensors of one shape, when the model traces and its
        interpreted graph gives eager mode's output on the first batch; else None. At most
        ``hold_limit`` bytes of values are kept between passes (default: :func:`default_hold_limit`)."""
        if not batches or not all(type(b) is torch.Tensor for b in batches):
            return None
        if any(tuple(b.shape) != tuple(batches[0].shape) for b in batches):
            return None  # one graph, one shape: the trace fixed shape-dependent values
        sites = qmodel._quanta.sites_by_key
        inputs = tracing.bind_inputs(qmodel, (batches[0],), {})
        if sum(isinstance(v, torch.Tensor) for v in inputs.values()) != 1:
            return None
        try:
            graph = tracing.trace(qmodel, inputs, sites)
            with torch.no_grad(), graph_runtime.eager_runtime(qmodel):
                forget_quantized_input()
                values, keys = graph_runtime.interpret(qmodel, graph, inputs, sites)
                output = next(n for n in graph.nodes if n.op == "output")
                got = fx.node.map_arg(output.args[0], values.__getitem__)
                forget_quantized_input()
                before = graph_guards.python_state(qmodel)
                expected = call_with(qmodel, batches[0])
                if graph_guards.python_state(qmodel) != before:  # a counter, a cache: the trace froze it
                    return None
                graph_runtime.check_same(expected, got)
        except Exception:  # noqa: BLE001 - pausing is a speed-up: any doubt (TraceFailed too) means rerun
            return None
        return cls(qmodel, graph, keys, inputs, batches, hold_limit)

    def run(self, layers: Sequence[nn.Module]) -> None:
        """Run every batch from its pause point until a pre-hook raises :class:`Pause` (the batch
        pauses there, before that node) or to the end (the batch starts over next time). A batch
        paused past the first call of one of ``layers`` (those about to be read, then changed)
        starts over first; so does a batch whose values would take the kept total past the cap."""
        calls = [self.first_call.get(id(layer)) for layer in layers]
        first = 0 if None in calls else min(calls, default=len(self.nodes))
        held = 0
        with torch.no_grad():
            for b, batch in enumerate(self.batches):
                start, values = self.paused[b]
                if start > first:
                    start, values = 0, {}
                start, values = self._run(batch, start, values)
                size = held_bytes(values)
                if held + size > self.hold_limit:
                    start, values = 0, {}
                else:
                    held += size
                self.paused[b] = (start, values)

    def _run(self, batch: torch.Tensor, start: int, values: dict[fx.Node, Any]) -> tuple[int, dict]:
        forget_quantized_input()
        inputs = {**self.inputs, self.input_name: batch}
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            try:
                values[node] = tracing.placeholder_value(node, inputs) if node.op == "placeholder" else \
                    graph_runtime.node_value(self.model, node, values, self.site_of[i])
            except Pause:
                return i, values
            for dead in self.dead_after[i]:
                values.pop(dead, None)
        return 0, {}
