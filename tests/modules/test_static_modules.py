"""One shared test for every static quantized module: int8 vs float SQNR on calibrated inputs.

Each case is (float module, input shape); the module is quantized inside a container, as a
user would, and must keep SQNR >= 30 dB against its float self, with int8 weights in the
state_dict and the expected quantized type under the original name.
"""

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.debug.sqnr import sqnr

CASES = {
    "linear": (lambda: nn.Linear(64, 32), (16, 64)),
    "linear_no_bias": (lambda: nn.Linear(64, 32, bias=False), (16, 64)),
    "linear_3d": (lambda: nn.Linear(48, 24), (4, 10, 48)),
    "conv1d": (lambda: nn.Conv1d(8, 16, 5, padding=2), (4, 8, 50)),
    "conv1d_strided_dilated": (lambda: nn.Conv1d(8, 16, 3, stride=2, dilation=2), (4, 8, 50)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1), (4, 8, 16, 16)),
    "conv2d_stride2_no_bias": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), (4, 8, 16, 16)),
    "conv2d_dilated": (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2), (4, 8, 16, 16)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (4, 8, 16, 16)),
    "conv2d_depthwise": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (4, 16, 16, 16)),
    "conv2d_1x1": (lambda: nn.Conv2d(16, 32, 1), (4, 16, 8, 8)),
}
EXPECTED = {"linear": "QuantizedLinear", "conv1d": "QuantizedConv1d", "conv2d": "QuantizedConv2d"}


def _quantize(module: nn.Module, shape, activation=None, backend="auto"):
    torch.manual_seed(0)
    layers = [module] + ([activation] if activation is not None else [])
    model = nn.Sequential(*layers).eval()
    calib = [torch.randn(shape) for _ in range(8)]
    config = quanta.QuantConfig(backend=backend)
    return model, quanta.quantize(model, calib, config=config, show_progress=False)


ACTIVATIONS = {"none": None, "relu": nn.ReLU(), "relu6": nn.ReLU6(), "gelu": nn.GELU(),
               "gelu_tanh": nn.GELU("tanh"), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
               "sigmoid": nn.Sigmoid(), "hardsigmoid": nn.Hardsigmoid()}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_module_sqnr(case, kind):
    """Every activation after a conv or linear folds into it (a oneDNN post-op), as a module."""
    make, shape = CASES[case]
    activation = ACTIVATIONS[kind]
    torch.manual_seed(0)
    float_model, qmodel = _quantize(make(), shape, activation)
    x = torch.randn(shape)
    assert sqnr(float_model(x), qmodel(x)) >= 30.0
    qtype = type(qmodel[0]).__name__
    assert qtype == EXPECTED[case.split("_")[0]]
    assert qmodel[0].activation == kind
    if activation is not None:
        assert isinstance(qmodel[1], nn.Identity)
    state = qmodel.state_dict()
    assert state["0.weight"].dtype == torch.int8
    assert state["0.weight_scale"].dtype == torch.float32
    assert state["0.input_zero_point"].dtype == torch.int32
    if make().bias is not None:
        assert state["0.bias"].dtype == torch.int32


class _GeluTwice(nn.Module):
    """A GELU module called twice and a functional GELU: neither may be fused (GELU is not
    idempotent, and the module or call would still run on the fused result)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.act = nn.GELU()

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc2(self.act(self.fc1(x))))
        return self.fc3(h + self.act(x.sum(-1, keepdim=True)))


def test_gelu_fuses_only_when_safe():
    torch.manual_seed(0)
    model = _GeluTwice().eval()
    calib = [torch.randn(32, 16) for _ in range(4)]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    assert qmodel.fc1.activation == "none" and qmodel.fc2.activation == "none"
    assert isinstance(qmodel.act, nn.GELU)
    x = torch.randn(64, 16)
    assert sqnr(model(x), qmodel(x)) >= 25.0


def test_int8_chain_keeps_activations_int8():
    """conv -> relu -> conv: the first conv emits a QTensor consumed directly by the second."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    assert qmodel[0].output_int8 and not qmodel[2].output_int8
    assert qmodel[2]._in == qmodel[0]._out  # the consumer reads the producer's qparams as is
    x = torch.randn(2, 3, 16, 16)
    out = qmodel(x)
    assert type(out) is torch.Tensor and sqnr(model(x), out) >= 30.0


class _SwitchedOff(nn.Module):
    """An ``nn.Identity`` where a layer is switched off and an eval Dropout sit between a conv
    and its activation, as real models build them (optional BatchNorm, classifier dropout)."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.drop = nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.Dropout(0.2)
        self.act, self.head = activation, nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.act(self.drop(self.norm(self.conv(x)))))


@pytest.mark.parametrize("kind", ["relu6", "silu"])
def test_activation_fuses_through_identities(kind):
    """The activation folds into the conv across the identities: its int8 output grid covers
    the activation's range (ReLU6: [0, 6] at zero point 0), not the pre-activation one."""
    torch.manual_seed(0)
    model = _SwitchedOff(ACTIVATIONS[kind]).eval()
    calib = [4 * torch.randn(4, 3, 16, 16) for _ in range(4)]  # pre-activations well past [0, 6]
    qmodel = quanta.quantize(model, calib, show_progress=False)
    assert qmodel.conv.activation == kind
    scale, zero_point = qmodel.conv._out
    if kind == "relu6":
        assert zero_point == 0 and scale <= 6 / 255 * 1.01
    else:  # SiLU's minimum is -0.278: a few codes below zero, none for the clipped negatives
        assert zero_point <= 16 and isinstance(qmodel.act, nn.Identity)
    x = 4 * torch.randn(2, 3, 16, 16)
    assert sqnr(model(x), qmodel(x)) >= 30.0


def test_training_dropout_is_not_seen_through_in_qat():
    """In QAT the Dropout trains (it scales what it keeps), and ReLU6 does not commute with that
    scaling: the ReLU6 stays outside the conv."""
    torch.manual_seed(0)
    model = _SwitchedOff(nn.ReLU6()).train()
    qat = quanta.prepare_qat(model, torch.randn(2, 3, 16, 16))
    qmodel = quanta.convert(qat.eval())
    assert qmodel.conv.activation == "none"
