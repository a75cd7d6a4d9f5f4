"""Sibling dynamic Linears (attention's query/key/value) run as one GEMM in the graph runtime, with
the same output as eager mode bit for bit."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.modules import fused_linears, graph
from quanta.zoo.minilm import load_minilm, load_polarity_sentences, tokenize


class Siblings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 64)
        self.other = nn.Linear(64, 128, bias=False)  # same input, no bias: not in their group
        self.out = nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        mixed = torch.cat([q * v, k, k], dim=-1) + self.other(x)
        return self.out(torch.relu(mixed))


def _eager(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    other._quanta.config = dataclasses.replace(other._quanta.config, runtime="eager")
    return other


@pytest.mark.parametrize("per_row", [True, False])
def test_siblings_fuse_and_equal_eager(per_row):
    torch.manual_seed(0)
    model = Siblings().eval()
    config = quanta.QuantConfig(mode="dynamic", dynamic_per_row=per_row)
    q = quanta.quantize(model, mode="dynamic", config=config)
    eager = _eager(q)
    with torch.no_grad():
        for shape in ((2, 40, 64), (1, 64), (3, 64)):  # the small calls fall back to the layers one by one
            x = torch.randn(*shape)
            assert torch.equal(q(x), eager(x)), shape
    runtime = q._quanta._graph
    assert isinstance(runtime, graph.GraphRuntime) and runtime.lowered == 3, graph.runtime_status(q)


def test_fused_runner_returns_the_layers_outputs():
    torch.manual_seed(1)
    q = quanta.quantize(Siblings().eval(), mode="dynamic")
    runner = fused_linears.FusedDynamicLinears([q.q, q.k, q.v])
    x = torch.randn(50, 64)
    with torch.no_grad():
        for got, layer in zip(runner(x), (q.q, q.k, q.v), strict=True):
            assert torch.equal(got, layer(x))
        x[3, 5] = float("nan")  # NaN: each layer decides (the default raises, naming the layer)
        with pytest.raises(quanta.QuantizedInputError, match="q"):
            runner(x)


@pytest.mark.slow
def test_minilm_dynamic_fuses_query_key_value():
    model, tokenizer = load_minilm()
    sentences, _ = load_polarity_sentences()
    q = quanta.quantize(model, mode="dynamic")
    eager = _eager(q)
    batch = tokenize(tokenizer, sentences[:8])
    with torch.no_grad():
        assert torch.equal(q(**batch), eager(**batch))
    assert q._quanta._graph.lowered == 18  # 6 layers x query, key, value


def _runners(q: nn.Module) -> list[str]:
    return [type(v).__name__ for k, v in q._quanta._graph.fn.__globals__.items() if k.startswith("fl")]


class Attention(nn.Module):
    """q, k, v read one tensor and feed float matmuls: static int8 Linears with float outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(64, 64) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8.0, dim=-1)
        return self.out(scores @ self.v(x))


def test_static_siblings_with_float_outputs_fuse_and_equal_eager():
    torch.manual_seed(2)
    q = quanta.quantize(Attention().eval(), [torch.randn(4, 40, 64) for _ in range(3)], show_progress=False)
    eager = _eager(q)
    with torch.no_grad():
        for shape in ((2, 40, 64), (1, 3, 64), (3, 30, 64)):  # (1, 3): too small for int8, one by one
            x = torch.randn(*shape)
            assert torch.equal(q(x), eager(x)), shape
    assert _runners(q) == ["FusedStaticLinears"], graph.runtime_status(q)
