"""int8 activation x activation matmuls (attention's Q.K^T and P.V), QuantConfig(activation_matmul="int8").

A softmax attention block whose Q, K, V reach the matmuls as int8 from their Linears and whose
softmax output is quantized at the site's calibrated qparams; float by default."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.debug.sqnr import sqnr
from quanta.errors import QuantizedInputError

INT8 = quanta.QuantConfig(activation_matmul="int8")


class Attention(nn.Module):
    def __init__(self, hidden: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(hidden, hidden) for _ in range(4))
        self.heads, self.head_dim = heads, hidden // heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1)
        return self.out(torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h))


class Core(nn.Module):
    """Attention without Linears: every matmul operand arrives in float."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(q @ k.transpose(-1, -2), dim=-1), v)


def _attention() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = Attention().eval()
    return model, [torch.randn(2, 24, 64) for _ in range(4)], torch.randn(3, 24, 64)


def _rows(qmodel: nn.Module, op: str) -> list[dict]:
    return [r for r in quanta.report(qmodel).to_dict()["layers"] if r["op"] == op]


def test_float_by_default_and_int8_when_asked() -> None:
    model, calib, x = _attention()
    default = quanta.quantize(model, calib, show_progress=False)
    assert [r["precision"] for r in _rows(default, "matmul")] == ["float", "float"]
    assert "activation_matmul='int8'" in _rows(default, "matmul")[0]["reason"]
    qmodel = quanta.quantize(model, calib, config=INT8, show_progress=False)
    assert [r["precision"] for r in _rows(qmodel, "matmul")] == ["int8", "int8"]
    assert all(r["precision"] == "int8" for r in _rows(qmodel, "Linear"))  # 4 of 4 Linears int8
    with torch.no_grad():
        ref, y = model(x), qmodel(x)
    assert sqnr(ref, y) > 30.0, sqnr(ref, y)  # measured 37 dB (float matmuls: 38 dB)


def test_qat_keeps_the_matmuls_float() -> None:
    model, _, x = _attention()
    qat = quanta.prepare_qat(model.train(), (x,), dataclasses.replace(INT8, mode="qat"))
    rows = _rows(qat, "matmul")
    assert len(rows) == 2
    assert all(r["precision"] == "float" and "static mode only" in r["reason"] for r in rows)


def test_fast_site_equals_the_reference_site_bit_for_bit() -> None:
    torch.manual_seed(1)
    shape = (2, 4, 20, 16)
    calib = [tuple(torch.randn(shape) for _ in range(3)) for _ in range(3)]
    inputs = tuple(torch.randn(shape) for _ in range(3))
    fast = quanta.quantize(Core(), calib, config=INT8, show_progress=False)
    ref = quanta.quantize(Core(), calib, config=dataclasses.replace(INT8, backend="reference"),
                          show_progress=False)
    assert [r["backend"] for r in _rows(fast, "matmul")] == ["onednn", "onednn"]
    assert [r["backend"] for r in _rows(ref, "matmul")] == ["reference", "reference"]
    with torch.no_grad():
        assert torch.equal(fast(*inputs), ref(*inputs))
        assert sqnr(Core()(*inputs), fast(*inputs)) > 25.0


def test_nonfinite_operand_is_named_or_propagated() -> None:
    torch.manual_seed(2)
    shape = (1, 2, 8, 8)
    calib = [tuple(torch.randn(shape) for _ in range(3)) for _ in range(2)]
    qmodel = quanta.quantize(Core(), calib, config=INT8, show_progress=False)
    q, k, v = (torch.randn(shape) for _ in range(3))
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantizedInputError, match="matmul"):
        qmodel(q, k, v)
    loose = quanta.quantize(Core(), calib, config=dataclasses.replace(INT8, nonfinite="propagate"),
                            show_progress=False)
    assert torch.isnan(loose(q, k, v)).any()


def test_save_load_keeps_the_operand_qparams(tmp_path: Path) -> None:
    model, calib, x = _attention()
    qmodel = quanta.quantize(model, calib, config=INT8, show_progress=False)
    path = quanta.save(qmodel, tmp_path / "attention.quanta.safetensors")
    loaded = quanta.load(path, _attention()[0])
    assert [r["precision"] for r in _rows(loaded, "matmul")] == ["int8", "int8"]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_onnx_export_runs_like_quanta(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, calib, x = _attention()
    qmodel = quanta.quantize(model, calib, config=INT8, show_progress=False)
    path = quanta.export_onnx(qmodel, (x,), tmp_path / "attention.onnx")
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert nodes.count("MatMul") == 6 and nodes.count("QuantizeLinear") >= 8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        y = qmodel(x)
    # same int8 values; only float rounding in the float-output Q.K^T and the softmax differs
    assert float((torch.from_numpy(out) - y).abs().max()) < 1e-4 * float(y.abs().max())


def test_executorch_export_runs_like_quanta(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    from quanta.io.executorch_export import load_pte, run_pte

    model, calib, x = _attention()
    qmodel = quanta.quantize(model, calib, config=INT8, show_progress=False)
    path = quanta.export_executorch(qmodel, (x,), tmp_path / "attention.pte")
    with torch.no_grad():
        y = qmodel(x)
    got = run_pte(load_pte(path), x)
    assert float((got - y).abs().max()) < 1e-4 * float(y.abs().max())  # measured 1.2e-7 of 0.44

