"""quantize_dynamic / quantize(mode="dynamic"): module swaps, plan, options and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.config import Override, QuantConfig
from quanta.debug.sqnr import sqnr
from quanta.errors import UnsupportedModelError
from quanta.modules.dynamic import DynamicQuantizedLinear, QuantizedEmbedding
from quanta.modules.dynamic_rnn import DynamicQuantizedLSTM


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.rnn = nn.LSTM(32, 48, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(96)
        self.head = nn.Linear(96, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(ids))
        return self.head(torch.relu(self.norm(y)))


@pytest.fixture
def model() -> Tagger:
    torch.manual_seed(0)
    return Tagger().eval()


def test_one_call_swaps_same_names_and_plans(model: Tagger) -> None:
    q = quanta.quantize(model, mode="dynamic")
    assert isinstance(model.head, nn.Linear)  # deep copy by default
    types = {n: type(m) for n, m in q.named_modules()}
    assert types["emb"] is QuantizedEmbedding and types["rnn"] is DynamicQuantizedLSTM
    assert types["head"] is DynamicQuantizedLinear and types["norm"] is nn.LayerNorm
    plan = q._quanta.plan
    assert plan.mode == "dynamic" and plan.input_meta == []
    assert {lp.name for lp in plan.int8_layers()} == {"emb", "rnn", "head"}
    assert plan.layers["norm"].precision == "float" and plan.layers["norm"].reason == "no dynamic int8 kernel"
    assert plan.layers["head"].backend and plan.layers["head"].weight_bits in (7, 8)
    assert q.state_dict()["head.weight"].dtype == torch.int8
    ids = torch.randint(0, 100, (2, 15))
    with torch.no_grad():
        assert sqnr(model(ids), q(ids)) >= 30.0
    rows = {r["name"]: r for r in quanta.report(q).to_dict()["layers"]}
    assert set(rows) >= {"emb", "rnn", "head", "norm"}


def test_modules_filter_skip_and_per_row(model: Tagger) -> None:
    q = quanta.quantize(model, mode="dynamic", modules={nn.Linear, nn.LSTM})
    assert isinstance(q.emb, nn.Embedding) and isinstance(q.rnn, DynamicQuantizedLSTM)
    assert q._quanta.plan.layers["emb"].reason == "not selected by modules="
    q2 = quanta.quantize_dynamic(model, skip=["rnn"], per_row=True)
    assert isinstance(q2.rnn, nn.LSTM) and "excluded by config" in q2._quanta.plan.layers["rnn"].reason
    assert q2.head.per_row and q2._quanta.config.dynamic_per_row
    q3 = quanta.quantize_dynamic(model, QuantConfig(dynamic_per_row=True))
    assert q3.head.per_row and q3._quanta.config.mode == "dynamic"
    overrides = (Override("rnn", backend="reference"), Override("head", backend="float"))
    q4 = quanta.quantize_dynamic(model, QuantConfig(overrides=overrides))
    assert q4.rnn.backend == "reference" and q4._quanta.plan.layers["rnn"].backend == "reference"
    assert isinstance(q4.head, nn.Linear) and "float requested" in q4._quanta.plan.layers["head"].reason


def test_inplace(model: Tagger) -> None:
    out = quanta.quantize_dynamic(model, inplace=True)
    assert out is model and isinstance(model.head, DynamicQuantizedLinear)
    with pytest.raises(UnsupportedModelError, match="already"):
        quanta.quantize_dynamic(model)


def test_nothing_to_quantize_says_so() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="found nothing to quantize in Sequential.*Linear, LSTM"):
        quanta.quantize(conv, mode="dynamic")
    with pytest.raises(UnsupportedModelError, match="not selected by modules="):
        quanta.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), modules={nn.LSTM})
    with pytest.raises(UnsupportedModelError, match="modules=.*Conv2d.*supports"):
        quanta.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), modules={nn.Conv2d})


def test_unsupported_variants_stay_float_with_reason() -> None:
    m = nn.ModuleDict({"a": nn.LSTM(4, 8, proj_size=2), "b": nn.Embedding(5, 3, max_norm=1.0),
                       "c": nn.Linear(4, 4)})
    q = quanta.quantize_dynamic(m)
    layers = q._quanta.plan.layers
    assert "proj_size" in layers["a"].reason and "max_norm" in layers["b"].reason
    assert isinstance(q["a"], nn.LSTM) and isinstance(q["c"], DynamicQuantizedLinear)
