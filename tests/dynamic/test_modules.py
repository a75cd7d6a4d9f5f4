"""Each dynamic int8 module against its float module (SQNR) and against the integer reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from quanta.config import QuantSpec
from quanta.debug.sqnr import sqnr
from quanta.errors import QuantizedInputError, UnsupportedModelError
from quanta.kernels import cpu, reference
from quanta.kernels.dynamic import DynamicLinearKernel, clear_input_cache, quantize_input
from quanta.modules.dynamic import DynamicQuantizedLinear, QuantizedEmbedding, QuantizedEmbeddingBag
from quanta.modules.dynamic_rnn import (
    DynamicQuantizedGRU,
    DynamicQuantizedGRUCell,
    DynamicQuantizedLSTM,
    DynamicQuantizedLSTMCell,
)

pytestmark = pytest.mark.isa  # run natively and under scripts/as-avx2 (.ci/run)

WSPEC = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=cpu.weight_bits_for_cpu())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    clear_input_cache()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_linear_sqnr_and_reference(per_row: bool, rows: int) -> None:
    f = nn.Linear(96, 40)
    q = DynamicQuantizedLinear(f, WSPEC, per_row=per_row)
    x = torch.randn(rows, 96)
    with torch.no_grad():
        ref, out = f(x), q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert sqnr(ref, out) >= 30.0
    spec = q.kernel("weight").reference(x, q.bias, per_row)
    torch.testing.assert_close(out, spec, rtol=1e-5, atol=1e-5 * float(spec.abs().max()))


def test_linear_onednn_matches_integer_reference_exactly_per_tensor() -> None:
    if not cpu.onednn_available():
        pytest.skip("no oneDNN int8 here")
    hi = cpu.exact_weight_limit()  # the widest weights this CPU's kernels add exactly
    w = torch.randint(-hi, hi, (48, 200), dtype=torch.int8)
    ws = torch.rand(48) * 0.01 + 1e-3
    bias = torch.randn(48)
    kernel = DynamicLinearKernel(w, ws, "onednn")
    x = torch.randn(16, 200) * 3
    fast = kernel(x, bias)
    assert kernel.uses_onednn(16)
    spec = kernel.reference(x, bias)
    assert float((fast - spec).abs().max()) <= 1e-5 * float(spec.abs().max())  # float32 rounding only


@pytest.mark.parametrize("per_row", [False, True])
def test_wide_weights_take_the_exact_float_fallback(monkeypatch, per_row: bool) -> None:
    """8-bit weights on a CPU whose kernels add only |w| <= 64 exactly (AVX2 without VNNI): the
    layer runs the float fallback, which equals the integer reference up to float32 rounding
    (the sums are exact for K <= 514), and says so; the oneDNN kernel refuses the weights."""
    monkeypatch.setattr(cpu, "exact_weight_limit", lambda: cpu.NARROW_LIMIT)
    f = nn.Linear(200, 48)
    q = DynamicQuantizedLinear(f, QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=8),
                               per_row=per_row)
    assert cpu.weight_magnitude(q.weight) == 127
    x = torch.randn(16, 200) * 3
    with torch.no_grad():
        out, ref = q(x), f(x)
    kernel = q.kernel("weight")
    assert kernel.backend == "float"
    spec = kernel.reference(x, q.bias, per_row)
    assert float((out - spec).abs().max()) <= 1e-5 * float(spec.abs().max())
    assert sqnr(ref, out) >= 38.0
    if q.backend == "onednn":
        assert q.backend_label() == "float" and "|w| <= 64" in q.backend_reason()
        with pytest.raises(cpu.WeightRangeError):
            DynamicLinearKernel(q.weight, q.weight_scale, "onednn")


def test_linear_leading_dims_and_reference_backend() -> None:
    f = nn.Linear(32, 8)
    q = DynamicQuantizedLinear(f, WSPEC, backend="reference")
    assert q.backend == "reference"
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert sqnr(f(x), q(x)) >= 30.0
    assert q(x).shape == (2, 5, 8)


def test_quantize_dynamic_input_matches_definition() -> None:
    x = torch.randn(5, 33) * 4
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    q = reference.quantize_dynamic_input(x, scale, zp)
    expect = torch.clamp(torch.floor(x * torch.tensor(1 / scale) + zp + 0.5), 0, 255).to(torch.uint8)
    assert torch.equal(q, expect)
    assert int(q.min()) == 0 and int(q.max()) == 255


@pytest.mark.parametrize("per_row", [False, True])
def test_fast_input_quantization_bit_equal_to_reference(per_row: bool) -> None:
    x = torch.cat([torch.randn(6, 50) * 3, torch.rand(2, 50) + 1.0, torch.zeros(1, 50)])
    x[0, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5])  # halves
    x_q, scale, zero_point = quantize_input(x, per_row)
    assert x_q.dtype == torch.uint8
    assert torch.equal(x_q, reference.quantize_dynamic_input(x, scale, zero_point))
    deq = (x_q.float() - (zero_point.float()[:, None] if per_row else zero_point)) * (
        scale[:, None] if per_row else scale)
    assert float((deq - x).abs().max()) <= 0.51 * float(scale.max() if per_row else scale)


@pytest.mark.parametrize("layers,bidirectional,batch_first,with_state", [
    (1, False, False, False), (2, False, True, True), (2, True, False, True), (3, True, True, False),
])
def test_lstm_variants(layers: int, bidirectional: bool, batch_first: bool, with_state: bool) -> None:
    f = nn.LSTM(24, 32, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).eval()
    q = DynamicQuantizedLSTM(f, WSPEC)
    x = torch.randn(4, 9, 24) if batch_first else torch.randn(9, 4, 24)
    d = 2 if bidirectional else 1
    hx = (torch.randn(layers * d, 4, 32), torch.randn(layers * d, 4, 32)) if with_state else None
    with torch.no_grad():
        ref, (h_ref, c_ref) = f(x, hx)
        out, (h, c) = q(x, hx)
    assert out.shape == ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    assert sqnr(ref, out) >= 30.0 and sqnr(h_ref, h) >= 30.0 and sqnr(c_ref, c) >= 30.0


def test_lstm_unbatched_and_clear_errors() -> None:
    f = nn.LSTM(8, 16).eval()
    q = DynamicQuantizedLSTM(f, WSPEC, layer_name="enc.rnn")
    x = torch.randn(6, 8)
    with torch.no_grad():
        ref, _ = f(x)
        out, (h, _) = q(x)
    assert out.shape == ref.shape == (6, 16) and h.shape == (1, 16)
    assert sqnr(ref, out) >= 30.0
    packed = pack_padded_sequence(torch.randn(6, 2, 8), torch.tensor([6, 4]))
    with pytest.raises(UnsupportedModelError, match="enc.rnn.*PackedSequence"):
        q(packed)
    with pytest.raises(QuantizedInputError, match=r"enc.rnn.*expects \[seq, batch, 8\]"):
        q(torch.randn(6, 2, 5))
    with pytest.raises(QuantizedInputError, match="h0 must have shape"):
        q(torch.randn(6, 2, 8), (torch.zeros(1, 3, 16), torch.zeros(1, 3, 16)))
    with pytest.raises(QuantizedInputError, match="finite"):
        q(torch.full((6, 2, 8), float("nan")))
    with pytest.raises(UnsupportedModelError, match="proj_size"):
        DynamicQuantizedLSTM(nn.LSTM(8, 16, proj_size=4), WSPEC)


@pytest.mark.parametrize("cell_type,qtype", [(nn.LSTMCell, DynamicQuantizedLSTMCell),
                                             (nn.GRUCell, DynamicQuantizedGRUCell)])
def test_cells_over_a_sequence(cell_type: type, qtype: type) -> None:
    f = cell_type(20, 40)
    q = qtype(f, WSPEC)
    xs = torch.randn(12, 3, 20)
    lstm = cell_type is nn.LSTMCell
    state_f = state_q = (torch.zeros(3, 40), torch.zeros(3, 40)) if lstm else torch.zeros(3, 40)
    with torch.no_grad():
        for x in xs:
            state_f, state_q = f(x, state_f), q(x, state_q)
    hf, hq = (state_f[0], state_q[0]) if lstm else (state_f, state_q)
    assert sqnr(hf, hq) >= 30.0
    with torch.no_grad():  # unbatched and no initial state
        one_f, one_q = f(xs[0, 0]), q(xs[0, 0])
    assert sqnr(one_f[0] if lstm else one_f, one_q[0] if lstm else one_q) >= 30.0


@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True)])
def test_gru_variants(layers: int, bidirectional: bool, batch_first: bool) -> None:
    f = nn.GRU(16, 24, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).eval()
    q = DynamicQuantizedGRU(f, WSPEC)
    x = torch.randn(3, 10, 16) if batch_first else torch.randn(10, 3, 16)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 3, 24)
    with torch.no_grad():
        ref, h_ref = f(x, h0)
        out, h = q(x, h0)
    assert sqnr(ref, out) >= 30.0 and sqnr(h_ref, h) >= 30.0


def test_embedding_exact_vs_dequantized_table() -> None:
    f = nn.Embedding(50, 12, padding_idx=3)
    q = QuantizedEmbedding(f, WSPEC)
    assert q.weight_bits == cpu.weight_bits_for_cpu()
    idx = torch.randint(0, 50, (4, 7))
    assert torch.equal(q(idx), nn.functional.embedding(idx, q.dequantized_weight()))
    assert sqnr(f(idx).detach(), q(idx)) >= 30.0
    with pytest.raises(QuantizedInputError, match="integer indices"):
        q(torch.randn(3))
    with pytest.raises(UnsupportedModelError, match="max_norm"):
        QuantizedEmbedding(nn.Embedding(5, 3, max_norm=1.0), WSPEC)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_exact_vs_dequantized_table(mode: str) -> None:
    f = nn.EmbeddingBag(60, 10, mode=mode, padding_idx=0)
    q = QuantizedEmbeddingBag(f, QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=None))
    assert q.weight_bits == 8  # weight-only: no kernel saturation, 'auto' means 8
    idx = torch.tensor([1, 2, 0, 4, 5, 59, 0, 7, 7])
    offsets = torch.tensor([0, 3, 6])
    table = q.dequantized_weight()
    expect = nn.functional.embedding_bag(idx, table, offsets, mode=mode, padding_idx=0)
    assert torch.equal(q(idx, offsets), expect)
    assert sqnr(f(idx, offsets).detach(), q(idx, offsets)) >= 30.0
    if mode == "sum":
        w = torch.rand(idx.shape)
        expect_w = nn.functional.embedding_bag(idx, table, offsets, mode=mode, per_sample_weights=w,
                                               padding_idx=0)
        assert torch.equal(q(idx, offsets, w), expect_w)
        bags = torch.randint(1, 60, (3, 4))
        assert torch.equal(q(bags), nn.functional.embedding_bag(bags, table, mode=mode, padding_idx=0))
    with pytest.raises(QuantizedInputError, match="out of range"):
        q(torch.tensor([1, 60]), torch.tensor([0]))


def test_state_dict_dtypes_and_round_trip() -> None:
    f = nn.LSTM(6, 10, num_layers=2)
    q = DynamicQuantizedLSTM(f, WSPEC)
    sd = q.state_dict()
    assert sd["weight_ih_l0"].dtype == torch.int8 and sd["weight_hh_l1"].dtype == torch.int8
    assert sd["weight_ih_l0_scale"].dtype == torch.float32
    assert sd["weight_ih_l0_zero_point"].dtype == torch.int32
    assert sd["bias_ih_l0"].dtype == torch.float32
    assert not any(v.is_floating_point() and k.startswith("weight") and not k.endswith("_scale")
                   for k, v in sd.items())
    x = torch.randn(5, 2, 6)
    before = q(x)[0]
    other = DynamicQuantizedLSTM(nn.LSTM(6, 10, num_layers=2), WSPEC)
    other(x)  # builds (and must drop) kernels for the old weights
    other.load_state_dict(sd)
    assert torch.equal(other(x)[0], before)
