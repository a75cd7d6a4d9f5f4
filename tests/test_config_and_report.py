"""Config: frozen, versioned, round-trips; overrides by name and type. Report: rows and totals."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.config import CONFIG_VERSION, Override, QuantConfig, QuantSpec


def test_config_is_frozen_and_round_trips():
    config = QuantConfig(skip=("head",), overrides=(Override("Linear", weight=QuantSpec(
        dtype="int8", symmetric=True, per_channel=True, bits=4)),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "dynamic"
    again = QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.version == CONFIG_VERSION == 11


def test_newer_config_version_is_rejected():
    with pytest.raises(ValueError, match="newer"):
        QuantConfig.from_dict({**QuantConfig().to_dict(), "version": 99})


@pytest.mark.parametrize("bad", [dict(dtype="int4"), dict(bits=9), dict(observer="magic")])
def test_invalid_specs_say_what_is_wrong(bad):
    with pytest.raises(ValueError, match="QuantSpec"):
        QuantSpec(**bad)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_override_by_type_changes_weight_bits_and_by_name_skips():
    four_bit = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=4)
    config = QuantConfig(overrides=(Override("Conv2d", weight=four_bit),))
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    qmodel = quanta.quantize(Net().eval(), data, config=config, show_progress=False)
    assert qmodel.conv.weight_bits == 4 and int(qmodel.conv.weight.abs().max()) <= 8
    skip_head = QuantConfig(overrides=(Override("head", skip=True),))
    skipped = quanta.quantize(Net().eval(), data, config=skip_head, show_progress=False)
    assert isinstance(skipped.head, nn.Linear)


def test_activation_override_sets_that_layers_qparams():
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    symmetric = QuantSpec(symmetric=True, observer="minmax")
    config = QuantConfig(overrides=(Override("conv", activation=symmetric),))
    plain = quanta.quantize(Net().eval(), data, show_progress=False)
    qmodel = quanta.quantize(Net().eval(), data, config=config, show_progress=False)
    assert int(qmodel.conv.input_zero_point) == 128  # symmetric uint8: zero point mid-range
    assert int(plain.conv.input_zero_point) != 128
    assert int(qmodel.head.input_zero_point) == int(plain.head.input_zero_point)


@pytest.mark.parametrize("bad", [dict(dtype="int8", symmetric=True), dict(per_channel=True), dict(bits=4)])
def test_activation_specs_the_runtime_cannot_honour_are_rejected(bad):
    with pytest.raises(ValueError, match="activations are quantized as uint8 per tensor"):
        QuantConfig(activation=QuantSpec(**bad))
    with pytest.raises(ValueError, match="Override\\('head'\\).activation"):
        Override("head", activation=QuantSpec(**bad))


def test_report_rows_totals_and_json():
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    qmodel = quanta.quantize(Net().eval(), data, show_progress=False)
    rep = quanta.report(qmodel)
    d = json.loads(rep.to_json())
    rows = {r["name"]: r for r in d["layers"]}
    assert rows["conv"]["precision"] == "int8" and rows["conv"]["activation"] == "relu"
    assert rows["conv"]["quantized_type"] == "QuantizedConv2d"
    assert rows["head"]["input_qparams"] is not None and rows["conv"]["weight_bits"] in (7, 8)
    mean = [r for r in d["layers"] if r["op"] == "mean"][0]
    assert mean["precision"] == "float" and mean["reason"] == "no int8 kernel"
    s = d["summary"]
    assert s["int8"] == 2 and s["float"] == 1
    # conv emits float (its reader, mean, is a float op); head quantizes its float input
    assert s["quantize"] == 2 and s["dequantize"] == 2
    text = str(rep)
    assert "QuantizedConv2d" in text and "int8 ops: 2" in text


def test_report_on_a_float_model_is_a_clear_error():
    with pytest.raises(quanta.UnsupportedModelError, match="not prepared or quantized"):
        quanta.report(Net())
