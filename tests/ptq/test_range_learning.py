"""Learned activation ranges (quanta.ptq.range_learning): the learned fake quantization is exactly
the int8 quantization of its range, the int8 model takes the learned qparams, and on the real
MNIST CNN with 4-bit weights the learned ranges and biases lower the output error on held-out
images (EfficientNet-Lite1 figures: docs/ptq.md)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import quanta
from quanta.api import get_state
from quanta.config import ACTIVATION_UINT8
from quanta.debug.sqnr import sqnr
from quanta.modules.qat import FakeQuantize
from quanta.numerics.qparams import choose_qparams, fake_quantize
from quanta.ptq.range_learning import LearnedRange, learn_ranges
from quanta.zoo import mnist

FOUR_BIT = quanta.QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=4)


@pytest.mark.parametrize("lo,hi", [(-1.3, 2.7), (0.0, 6.0), (-0.01, 0.02)])
def test_learned_fake_quant_is_the_int8_quantization_of_its_range(lo: float, hi: float) -> None:
    learned = LearnedRange(torch.tensor(lo), torch.tensor(hi))
    with torch.no_grad():
        learned.log_factors.copy_(torch.tensor([0.1, -0.2]))
    x = torch.linspace(-2 * abs(lo) - 0.1, 2 * hi, 5001).requires_grad_(True)
    got = learned.fake_quant(x, ACTIVATION_UINT8)
    a, b = learned.bounds()
    scale, zero_point = choose_qparams(a.detach(), b.detach(), ACTIVATION_UINT8)
    want = fake_quantize(x.detach(), scale, zero_point, ACTIVATION_UINT8)
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(scale)), float((got - want).abs().max())
    got.pow(2).sum().backward()  # the range gets a gradient (clipped values pull it outward)
    assert learned.log_factors.grad is not None and learned.log_factors.grad[1].abs() > 0
    if lo < 0:
        assert learned.log_factors.grad[0].abs() > 0


def test_fake_quantize_follows_a_learned_range() -> None:
    fq = FakeQuantize(ACTIVATION_UINT8, "site")
    fq(torch.linspace(-1, 1, 100))
    fq.learned_range = LearnedRange(torch.tensor(-0.5), torch.tensor(3.0))
    assert [float(v) for v in fq.range()] == [-0.5, 3.0]
    scale, zero_point = fq.calculate_qparams()
    assert torch.equal(scale, choose_qparams(torch.tensor(-0.5), torch.tensor(3.0), ACTIVATION_UINT8)[0])
    assert int(zero_point) == 36


@pytest.fixture(scope="module")
def data(mnist_data: dict) -> dict:
    return mnist_data


def test_learned_ranges_lower_the_output_error_and_convert_to_their_qparams(data: dict) -> None:
    plain = quanta.quantize(data["model"], data["calib"], config=quanta.QuantConfig(weight=FOUR_BIT),
                            show_progress=False)
    learned, result = learn_ranges(data["model"], plain, data["calib"], seconds=0, steps=60,
                                   show_progress=False)  # steps, not seconds: a loaded machine took 22
    with torch.no_grad():
        plain_db, learned_db = sqnr(data["ref"], plain(data["x"])), sqnr(data["ref"], learned(data["x"]))
    acc = mnist.evaluate(learned, data["x"], data["y"])
    plain_acc = mnist.evaluate(plain, data["x"], data["y"])
    print(f"4-bit MNIST: plain {plain_acc:.1f} % {plain_db:.2f} dB, learned ranges {acc:.1f} % "
          f"{learned_db:.2f} dB; {result.summary()}")
    assert result.steps > 5 and result.ranges >= 8 and result.biases == 8 and result.kept
    assert result.error_after < 0.8 * result.error_before
    assert learned_db > plain_db + 1.0 and acc >= plain_acc
    report = quanta.report(learned)
    assert report.coverage.share == 1.0  # every conv/linear still int8
    # the int8 model runs the learned ranges: its qparams are not the calibrated ones
    plan, plain_plan = get_state(learned).plan, get_state(plain).plan
    moved = [n for n, lp in plan.layers.items()
             if lp.output_qparams and lp.output_qparams != plain_plan.layers[n].output_qparams]
    assert len(moved) >= 3, moved


@pytest.mark.parametrize("bits", [4])
def test_range_learning_keeps_adarounds_weights(data: dict, bits: int) -> None:
    """Range learning converts its simulation again, from the dequantized int8 weights.
    AdaRound's codes must imply the scales they use, or that convert re-rounds them on another
    grid (it did: 1.5 % of EfficientNet-Lite1's channels, undoing part of AdaRound, -0.8 dB at
    the logits). The simulation is converted as range learning does when it keeps its result
    (with zero steps it would keep the model it was given, and convert nothing)."""
    from quanta.modules.quantized import QuantizedModule
    from quanta.ptq.adaround import adaround
    from quanta.ptq.range_learning import _layers, _reconvert, _simulation

    spec = dataclasses.replace(FOUR_BIT, bits=bits)
    config = quanta.QuantConfig(weight=spec)
    q = quanta.quantize(data["model"], data["calib"], config=config, show_progress=False)
    results = adaround(data["model"], q, data["calib"], iterations=300, show_progress=False)
    assert sum(r.kept for r in results) >= 4 and max(r.flipped for r in results) > 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error", quanta.QuantaWarning)  # it warns when it re-rounds weights
        sim, _, _ = _simulation(data["model"], q, data["calib"])
        again = _reconvert(sim, q, config)
    before, after = _layers(q, QuantizedModule), _layers(again, QuantizedModule)
    assert before.keys() == after.keys() and len(before) == 8
    for name, layer in before.items():
        assert torch.equal(layer.weight, after[name].weight), name
        assert torch.allclose(layer.weight_scale, after[name].weight_scale, rtol=1e-6, atol=0), name
    with torch.no_grad():
        assert sqnr(q(data["x"]), again(data["x"])) > 60


def test_range_learning_that_raises_the_error_is_not_kept(data: dict, monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """After AdaRound, range learning can make the model worse (EfficientNet-Lite1: -1.0 dB on
    the crops it learned from). Then the int8 model it was given comes back unchanged."""
    from quanta.ptq import range_learning

    plain = quanta.quantize(data["model"], data["calib"], config=quanta.QuantConfig(weight=FOUR_BIT),
                            show_progress=False)
    with torch.no_grad():
        before = plain(data["x"][:64]).clone()

    class Ascent(torch.optim.SGD):  # steps up the gradient: the error can only rise
        def __init__(self, groups: list) -> None:
            super().__init__(groups, lr=0.0)

        @torch.no_grad()
        def step(self) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(0.2 * p.grad.sign())

    monkeypatch.setattr(range_learning.torch.optim, "Adam", Ascent)
    back, result = learn_ranges(data["model"], plain, data["calib"], seconds=0, steps=4, show_progress=False)
    assert not result.kept and result.error_after > result.error_before
    assert back is plain and "not kept" in result.summary()
    with torch.no_grad():
        assert torch.equal(back(data["x"][:64]), before)


def test_quantize_with_learn_ranges_reports_it_and_survives_save_load(data: dict, tmp_path) -> None:
    config = quanta.QuantConfig(weight=FOUR_BIT, learn_ranges=True, learn_ranges_seconds=3,
                                bias_correction=True)
    q = quanta.quantize(data["model"], data["calib"], config=config, show_progress=False)
    done = quanta.ptq.corrections_of(q)
    assert done.ranges is not None and done.bias and "range learning" in done.summary()
    assert get_state(q).config.learn_ranges
    path = tmp_path / "m.quanta.safetensors"
    quanta.save(q, path)
    loaded = quanta.load(path, data["model"])
    with torch.no_grad():
        assert torch.equal(q(data["x"][:64]), loaded(data["x"][:64]))


def test_learn_ranges_config_is_checked() -> None:
    with pytest.raises(ValueError, match="learn_ranges_seconds"):
        quanta.QuantConfig(learn_ranges=True, learn_ranges_seconds=0)
    with pytest.raises(ValueError, match="static mode only"):
        quanta.QuantConfig(mode="dynamic", learn_ranges=True)
    old = dataclasses.asdict(quanta.QuantConfig())
    del old["learn_ranges"], old["learn_ranges_seconds"]
    old["version"] = 4
    assert not quanta.QuantConfig.from_dict(old).learn_ranges
