"""quanta.debug.compare on the pretrained MNIST CNN and real held-out images."""

import dataclasses
import json
import math

import pytest

import quanta
from quanta.config import Override
from quanta.kernels.cpu import weight_bits_for_cpu

# per-channel weight SQNR floor: 8-bit weights, or the 7-bit ones of AVX2 without VNNI (6 dB less;
# measured 37.5-43.6 dB there)
WEIGHT_SQNR_FLOOR = 40.0 if weight_bits_for_cpu() == 8 else 34.0


@pytest.mark.isa  # the weight SQNR follows the CPU's weight bits
def test_compare_figures_on_real_images(mnist_debug):
    model, qmodel, images, _ = mnist_debug
    result = quanta.debug.compare(model, qmodel, [images[:100], images[100:]], show_progress=False)
    int8 = [r["name"] for r in quanta.report(qmodel).to_dict()["layers"] if r["precision"] == "int8"]
    assert sorted(s.name for s in result.sites) == sorted(int8) and len(int8) == 10
    isolated = [s.isolated_sqnr for s in result.sites]
    assert isolated == sorted(isolated)  # worst first
    assert 30.0 <= min(isolated) and max(isolated) <= 60.0, isolated
    # accumulated SQNR agrees with the independent per-layer hook measurement
    per_layer = quanta.layer_sqnr(model, qmodel, images)
    sites = result.by_name()
    for name in ("block1.conv1", "block2.conv2", "fc1", "classifier"):
        assert sites[name].accumulated_sqnr == pytest.approx(per_layer[name], abs=0.05)
    assert result.output_sqnr == pytest.approx(per_layer["<output>"], abs=0.05)
    # the last layer's accumulated error is the output's; error accumulates past a site's own
    assert sites["classifier"].accumulated_sqnr < sites["classifier"].isolated_sqnr
    for s in result.sites:
        if s.op in ("Conv2d", "Linear"):
            assert WEIGHT_SQNR_FLOOR <= s.weight_sqnr <= 55.0, (s.name, s.weight_sqnr)
        else:
            assert s.weight_sqnr is None
        if s.clipped_range is not None:
            assert 0.0 <= s.clipped_values <= s.clipped_range <= 0.5
    assert sites["classifier"].clipped_range is None  # float output: no output qparams
    hist = sites["conv1"].histogram
    assert sum(hist["counts"]) > 1000 and hist["q_lo"] <= 0.0 < hist["q_hi"]
    data = json.loads(result.to_json())
    assert len(data["sites"]) == 10 and data["sites"][0]["name"] == result.sites[0].name
    text = str(result)
    assert "isolated dB" in text and "block2.conv2" in text


@pytest.mark.isa
def test_compare_finds_a_planted_bad_layer(mnist_debug):
    model, _, images, _ = mnist_debug
    from quanta.zoo.mnist import load_mnist

    train_x, _ = load_mnist("train")
    weight = dataclasses.replace(quanta.QuantConfig().weight, bits=2)
    config = quanta.QuantConfig(overrides=(Override("block1.conv2", weight=weight),))
    qmodel = quanta.quantize(model, [train_x[:100]], config=config, show_progress=False)
    result = quanta.debug.compare(model, qmodel, images[:100], show_progress=False)
    worst = result.sites[0]
    assert worst.name == "block1.conv2", [(s.name, s.isolated_sqnr) for s in result.sites[:3]]
    assert worst.isolated_sqnr < 15.0 and worst.weight_sqnr < 15.0
    others = [s.weight_sqnr for s in result.sites if s.weight_sqnr is not None and s.name != worst.name]
    assert min(others) > WEIGHT_SQNR_FLOOR
    # the sites after it carry its error: accumulated far below their own isolated figure
    after = result.by_name()["block2.conv1"]
    assert after.accumulated_sqnr < after.isolated_sqnr - 10 and not math.isinf(after.accumulated_sqnr)
