"""SmoothQuant (quanta.ptq.smoothquant): an exact float rewrite, chosen per layer, that makes static
int8 of the real all-MiniLM-L6-v2 encoder as close to float as dynamic int8 is."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.config import QuantConfig
from quanta.ptq import SmoothedLinear, corrections_of, smooth
from quanta.zoo.minilm import (
    MiniLMConfig,
    embed,
    load_minilm,
    load_polarity_sentences,
    minilm_encoder_random,
    tokenize,
)

SMALL = MiniLMConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     max_position_embeddings=32)


def _small_model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    model = minilm_encoder_random(SMALL, seed=3)
    with torch.no_grad():  # outlier input channels, as trained transformers have
        model.embeddings.norm.weight[:4] = 20.0
    gen = torch.Generator().manual_seed(0)
    return model, [torch.randint(1, 100, (2, 12), generator=gen) for _ in range(3)]


def test_smoothing_is_an_exact_rewrite_of_the_float_model():
    model, batches = _small_model_and_batches()
    smoothed = minilm_encoder_random(SMALL, seed=3)
    smoothed.load_state_dict(model.state_dict())
    result = smooth(smoothed, batches, QuantConfig(), alpha=0.5)
    assert len(result.layers) == 12 and all(lay.alpha == 0.5 for lay in result.layers)
    assert isinstance(smoothed.layers[0].query, SmoothedLinear)
    with torch.no_grad():
        for ids in batches:
            torch.testing.assert_close(smoothed(ids), model(ids), rtol=1e-4, atol=1e-4)


def test_skipped_layers_are_not_smoothed_and_the_search_can_decline():
    model, batches = _small_model_and_batches()
    result = smooth(model, batches, QuantConfig(skip=("layers.1",)))
    assert {lay.name.split(".")[1] for lay in result.layers} == {"0"}
    assert all(type(m) is nn.Linear for m in model.layers[1].modules() if isinstance(m, nn.Linear))
    for lay in result.layers:  # the chosen candidate (or none) never does worse than plain int8
        assert lay.error_smoothed <= lay.error_plain


def test_config_checks_and_save_load_round_trip(tmp_path):
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        QuantConfig(smoothquant=True, smoothquant_alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant: static or dynamic"):
        QuantConfig(mode="weight_only", smoothquant=True)
    model, batches = _small_model_and_batches()
    config = QuantConfig(smoothquant=True, backend="reference")  # int8 even where float is faster
    qmodel = quanta.quantize(model, batches, config=config, show_progress=False)
    assert "SmoothQuant:" in corrections_of(qmodel).summary()
    path = quanta.save(qmodel, tmp_path / "smoothed.quanta")
    again = quanta.load(path, model)
    with torch.no_grad():
        assert torch.equal(again(batches[0]), qmodel(batches[0]))
    assert again._quanta.config == qmodel._quanta.config and again._quanta.config.smoothquant


@pytest.mark.slow
@pytest.mark.isa  # the weights are 7-bit on AVX2 without VNNI: .ci/run's capped step checks that case
def test_static_minilm_with_smoothquant_is_as_close_as_dynamic():
    model, tokenizer = load_minilm()
    sentences, _ = load_polarity_sentences()
    calib, held_out = sentences[:64], sentences[64:]  # measured on sentences calibration never saw
    batches = [tokenize(tokenizer, calib[i:i + 8]) for i in range(0, len(calib), 8)]
    reference = embed(model, tokenizer, held_out)

    def min_cosine(qmodel: nn.Module) -> float:
        return float((reference * embed(qmodel, tokenizer, held_out)).sum(1).min())

    plain = quanta.quantize(model, batches, show_progress=False)
    smoothed = quanta.quantize(model, batches, config=QuantConfig(smoothquant=True), show_progress=False)
    rows = quanta.report(smoothed).to_dict()["layers"]
    linears = [r for r in rows if r["op"] == "Linear"]
    assert len(linears) == 36 and all(r["precision"] == "int8" for r in linears)  # every Linear stays int8
    # measured on the Xeon (8-bit weights): plain 0.9848, smoothed 0.9952 (issue 13's target: >= 0.99)
    before, after = min_cosine(plain), min_cosine(smoothed)
    assert after >= 0.99 and after > before + 0.004, (before, after)


def test_dynamic_mode_smooths_from_calibration_data(tmp_path):
    model, batches = _small_model_and_batches()
    config = QuantConfig(mode="dynamic", smoothquant=True, backend="reference")
    with pytest.raises(quanta.CalibrationError, match="needs calibration_data"):
        quanta.quantize(model, mode="dynamic", config=config)
    qmodel = quanta.quantize(model, batches, mode="dynamic", config=config)
    assert "SmoothQuant: " in corrections_of(qmodel).summary()
    assert isinstance(qmodel.layers[0].query, SmoothedLinear) and type(model.layers[0].query) is nn.Linear
    with torch.no_grad():
        want, got = model(batches[0]), qmodel(batches[0])
        assert float((got - want).norm() / want.norm()) < 0.05
        again = quanta.load(quanta.save(qmodel, tmp_path / "dynamic.quanta"), model)
        assert torch.equal(again(batches[0]), got)


def test_unused_tied_and_top_level_linears():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            self.unused = nn.Linear(16, 16)  # never called: nothing to learn its inputs from
            self.head = nn.Linear(16, 16)
            self.tail = nn.Linear(16, 16)
            self.tail.weight = self.head.weight  # tied: smoothing one would change the other

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tail(self.head(self.body(x)))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.body[0].weight[:, :2] *= 30.0  # outlier input columns
    x = torch.randn(64, 16)
    x[:, 3] *= 25.0  # an outlier input channel
    want = model(x)
    result = smooth(model, [x], QuantConfig(), alpha=0.6)
    assert [lay.name for lay in result.layers] == ["body.0", "body.2"]
    assert result.tied == ["head", "tail"] and "2 left alone" in result.summary()
    assert isinstance(model.body[0], SmoothedLinear) and type(model.unused) is nn.Linear
    assert model.tail.weight is model.head.weight
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_smoothed_model_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, batches = _small_model_and_batches()
    qmodel = quanta.quantize(model, batches, config=QuantConfig(smoothquant=True, backend="reference"),
                             show_progress=False)
    path = quanta.export_onnx(qmodel, (batches[0],), tmp_path / "smoothed.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: batches[0].numpy()})[0]
    with torch.no_grad():
        want = qmodel(batches[0]).numpy()
    assert abs(got - want).max() <= 1e-5 * max(1.0, abs(want).max())  # measured 1e-6 on MiniLM-size
